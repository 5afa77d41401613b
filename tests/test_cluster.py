"""bulwark.cluster: memory plan, ds_config batch check, sbatch rendering under a fake SLURM, presets."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from bulwark.cluster import plan as planmod
from bulwark.cluster.checks import check_ds_batch_sizes
from bulwark.cluster.cli import plan_run, register
from bulwark.cluster.plan import (
    GIB,
    KNOWN_MODELS,
    count_lora_params,
    count_params,
    plan_memory,
    resolve_model_config,
)
from bulwark.cluster.slurm import render_sbatch, submit
from bulwark.errors import BulwarkInputError

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))
TINY = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 8,
    "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False,
}
SMOLLM2 = KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"]
LLAMA70 = KNOWN_MODELS["meta-llama/Llama-2-70b-hf"]


def _hf_count(cfg: dict) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


# --- parameter count -------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {},
    {"tie_word_embeddings": True},
    {"num_key_value_heads": 8},
    {"head_dim": 16, "attention_bias": True, "mlp_bias": True},
])
def test_param_count_matches_transformers(extra):
    cfg = {**TINY, **extra}
    assert count_params(cfg) == _hf_count(cfg)


def test_param_count_smollm2_and_llama2():
    assert count_params(SMOLLM2) == _hf_count(SMOLLM2) == 134_515_008
    assert count_params(resolve_model_config("embedded")) == 134_515_008
    # Published sizes: 6.74B, 13.0B, 69.0B.
    assert count_params(resolve_model_config("llama2-7b")) == 6_738_415_616
    assert count_params(resolve_model_config("meta-llama/Llama-2-13b-hf")) == 13_015_864_320
    assert count_params(LLAMA70) == 68_976_648_192


def test_lora_count_matches_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY)),
                           LoraConfig(r=4, target_modules=["q_proj", "k_proj", "down_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = {"enabled": True, "r": 4, "target_modules": ["q_proj", "k_proj", "down_proj"]}
    assert count_lora_params(TINY, lora) == trainable


def test_model_config_from_local_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    assert count_params(resolve_model_config(str(tmp_path))) == count_params(TINY)
    with pytest.raises(BulwarkInputError, match="not a known model"):
        resolve_model_config("someone/unknown-model")


# --- plan arithmetic -------------------------------------------------------------------------


def _plan(**kw):
    args = dict(nodes=1, gpus_per_node=1, zero_stage=3, dtype="bf16", defense="lisa",
                micro_batch_size=1, seq_len=512, gpu_mem_gib=80.0)
    args.update(kw)
    return plan_memory(resolve_model_config("llama2-7b"), **args)


def test_sharded_states_scale_with_world_size():
    one, eight, sixteen = _plan(), _plan(gpus_per_node=8), _plan(nodes=2, gpus_per_node=8)
    p = count_params(resolve_model_config("llama2-7b"))
    assert one.optimizer_bytes == 12 * p and one.defense_bytes == 4 * p  # Lisa anchor: fp32 copy
    assert one.params_bytes == 2 * p and one.grads_bytes == 4 * p
    for attr in ("params_bytes", "grads_bytes", "optimizer_bytes", "defense_bytes"):
        assert getattr(eight, attr) == getattr(one, attr) // 8
        assert getattr(sixteen, attr) == getattr(one, attr) // 16
    assert eight.activation_bytes == one.activation_bytes  # per-rank micro batch


def test_fp32_training_bytes_and_sft_has_no_defense_buffer():
    p = count_params(resolve_model_config("llama2-7b"))
    plan = _plan(dtype="fp32", defense="sft")
    assert (plan.params_bytes, plan.grads_bytes, plan.optimizer_bytes) == (4 * p, 4 * p, 8 * p)
    assert plan.defense_bytes == 0


def test_matches_deepspeed_zero3_estimator():
    # deepspeed estimate_zero3_model_states_mem_needs (no offload): 4 * largest_layer + 18 * P / gpus
    cfg = resolve_model_config("llama2-7b")
    plan = _plan(gpus_per_node=8, defense="sft")
    largest = cfg["vocab_size"] * cfg["hidden_size"]
    ds_gpu = 4 * largest + int(18 * count_params(cfg) / 8)
    ours = plan.params_bytes + plan.grads_bytes + plan.optimizer_bytes + plan.buffer_bytes - planmod.RUNTIME_RESERVE_BYTES
    assert abs(ours - ds_gpu) <= 8


def test_offload_moves_states_to_host():
    plan = _plan(gpus_per_node=8, offload_optimizer=True, offload_param=True)
    assert plan.params_bytes == plan.grads_bytes == plan.optimizer_bytes == plan.defense_bytes == 0
    p = count_params(resolve_model_config("llama2-7b"))
    # 2 + 4 + 12 + 4 (anchor) bytes per parameter on the host, times DeepSpeed's 1.5 buffer factor
    assert plan.cpu_bytes_per_node == pytest.approx(22 * p * 1.5, rel=1e-6)


def test_lora_shrinks_trainable_states():
    full, lora = _plan(), _plan(lora={"enabled": True, "r": 16})
    assert lora.trainable_params < full.trainable_params / 100
    assert lora.optimizer_bytes < full.optimizer_bytes / 100


def test_70b_full_finetune_on_one_gpu_does_not_fit():
    plan = plan_memory(LLAMA70, nodes=1, gpus_per_node=1, zero_stage=3, dtype="bf16", defense="lisa",
                       micro_batch_size=1, seq_len=1024, gpu_mem_gib=80)
    assert not plan.fits
    assert plan.over_bytes == plan.total_bytes - 80 * GIB > 1000 * GIB
    text = "\n".join(plan.advice)
    assert "offload" in text and "nodes" in text and "LoRA" in text


def test_plan_rejects_bad_input():
    with pytest.raises(BulwarkInputError, match="nodes and gpus per node must be >= 1"):
        _plan(nodes=0)
    with pytest.raises(BulwarkInputError, match="nodes and gpus per node must be >= 1"):
        _plan(gpus_per_node=0)
    with pytest.raises(BulwarkInputError, match=r"'tvaccine' is not a registered defense; registered: .*t-vaccine"):
        _plan(defense="tvaccine")  # the old table's name: plan now knows the registry's names only


# --- defense costs come from the registry --------------------------------------------------------


def test_every_registered_defense_plans_with_its_declared_cost():
    from bulwark.defenses import REGISTRY

    cfg = resolve_model_config("llama2-7b")
    p = count_params(cfg)
    s, b, h, layers, vocab = 512, 1, 4096, 32, 32000
    sft = _plan(defense="sft", gpus_per_node=8)
    assert {"t-vaccine", "vaccine-random", "booster+vaccine", "refusal_ul"} <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        cost = cls.memory
        plan = _plan(defense=name, gpus_per_node=8)
        assert plan.defense_bytes == int(cost.fp32_copies * p * 4) // 8 + int(cost.dtype_copies * p * 2) // 8, name
        extra = (sft.activation_bytes * (cost.activation_factor - 1)
                 + layers * s * b * h * (cost.layer_outputs * 2 + cost.layer_outputs_fp32 * 4)
                 + s * b * vocab * 4 * (cost.logits_fp32 + cost.logits_fp32_per_layer * layers))
        assert plan.activation_bytes == pytest.approx(sft.activation_bytes + extra, abs=2), name
        assert f"defense {name}: {cost.what}" in plan.notes
    # the corrected figures the issue names: Booster's harmful phase holds 6 fp32 shard copies and the
    # saved 16-bit partitions (was 2 fp32); Vaccine's offsets are in the activations' dtype (was fp32)
    booster = _plan(defense="booster", gpus_per_node=8)
    assert booster.defense_bytes == (6 * 4 * p) // 8 + (2 * p) // 8
    vaccine = _plan(defense="vaccine", gpus_per_node=8)
    assert vaccine.activation_bytes - sft.activation_bytes == layers * s * b * h * 2
    # where the copies live: fp32 ones beside the fp32 master (host under optimizer offload), 16-bit ones
    # beside the 16-bit partitions (host under parameter offload)
    off_opt = _plan(defense="booster", gpus_per_node=8, offload_optimizer=True)
    assert off_opt.defense_bytes == (2 * p) // 8
    assert _plan(defense="booster", gpus_per_node=8, offload_optimizer=True, offload_param=True).defense_bytes == 0
    # SMART's ZeRO-1/2 path rebuilds whole EMA weights in the model's dtype, on every rank
    smart2 = _plan(defense="smart", gpus_per_node=8, zero_stage=2)
    assert smart2.defense_bytes == (4 * p) // 8 + 2 * p


def test_a_defense_registered_outside_cluster_is_planned_with_its_own_cost():
    """A new defense declares `memory` in its own module; plan.py needs no edit to plan it."""
    from bulwark.defenses.base import REGISTRY, Defense, MemoryCost, register

    @register
    class Fake(Defense):
        name = "test-fake-defense"
        memory = MemoryCost(fp32_copies=3, dtype_copies=0.5, activation_factor=1.5, layer_outputs=2,
                            logits_fp32=1, what="three anchors, for the test")

    try:
        p = count_params(resolve_model_config("llama2-7b"))
        s, b, h, layers, vocab = 512, 1, 4096, 32, 32000
        sft, fake = _plan(defense="sft", gpus_per_node=4), _plan(defense="test-fake-defense", gpus_per_node=4)
        assert fake.defense_bytes == (3 * 4 * p) // 4 + p // 4
        assert fake.activation_bytes == pytest.approx(
            sft.activation_bytes * 1.5 + layers * s * b * h * 2 * 2 + s * b * vocab * 4, abs=2)
        assert "defense test-fake-defense: three anchors, for the test" in fake.notes
    finally:
        REGISTRY.pop(Fake.name, None)
    with pytest.raises(BulwarkInputError, match="not a registered defense"):
        _plan(defense="test-fake-defense")


# --- ds_config batch sizes -------------------------------------------------------------------


def test_ds_batch_sizes():
    check_ds_batch_sizes({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}, 2, 4, 8)
    check_ds_batch_sizes({"train_batch_size": 64, "gradient_accumulation_steps": 4}, 2, 4, 8)
    with pytest.raises(BulwarkInputError, match=r"train_batch_size=32 contradicts"):
        check_ds_batch_sizes({"train_batch_size": 32}, 2, 4, 8)
    with pytest.raises(BulwarkInputError, match=r"train_micro_batch_size_per_gpu=4 contradicts"):
        check_ds_batch_sizes({"train_micro_batch_size_per_gpu": 4}, 2, 4, 8)
    with pytest.raises(BulwarkInputError, match=r"gradient_accumulation_steps=1 contradicts"):
        check_ds_batch_sizes({"gradient_accumulation_steps": 1}, 2, 4, 8)


def _run_config(tmp_path: Path, ds: dict | None = None, **train) -> Path:
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds or {"zero_optimization": {"stage": 3}}))
    cfg = {
        "model": {"name": "llama2-7b", "dtype": "bf16"},
        "train": {"micro_batch_size": 1, "grad_accum": 2, **train},
        "data": {"max_length": 512},
        "defense": {"name": "lisa"},
        "launch": {"nproc": 8, "nnodes": 1, "ds_config": str(ds_path)},
        "out_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_plan_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(_app(), ["plan", str(_run_config(tmp_path))])
    assert ok.exit_code == 0, ok.output
    assert "fits" in ok.output
    over = runner.invoke(_app(), ["plan", str(_run_config(tmp_path)), "--gpus-per-node", "1"])
    assert over.exit_code == 2
    assert re.search(r"error: .* does not fit: .* GiB per GPU needed, 80 GiB available \(over by", over.output)
    bad = runner.invoke(_app(), ["plan", str(_run_config(tmp_path)), "--nodes", "0"])
    assert bad.exit_code == 2 and "nodes and gpus per node must be >= 1" in bad.output
    clash = _run_config(tmp_path, ds={"train_batch_size": 100, "zero_optimization": {"stage": 3}})
    res = runner.invoke(_app(), ["plan", str(clash)])
    assert res.exit_code == 2 and "train_batch_size=100 contradicts" in res.output
    assert "Traceback" not in res.output


def test_cli_plan_takes_key_value_overrides(tmp_path):
    runner = CliRunner()
    cfg = _run_config(tmp_path)
    res = runner.invoke(_app(), ["plan", str(cfg), "defense.name=booster", "train.micro_batch_size=2",
                                 "--gpu-mem-gib", "80"])
    assert res.exit_code == 0, res.output
    assert "defense booster; micro batch 2 x 512 tokens" in " ".join(res.output.split())  # rich wraps at 80
    want, *_ = plan_run(cfg, overrides=["defense.name=booster", "train.micro_batch_size=2"])
    assert f"{want.total_bytes / GIB:.2f}" in res.output and want.defense_bytes > _plan(gpus_per_node=8).defense_bytes
    # launch.nproc decides the world size, as in the job the config would start
    one_gpu = runner.invoke(_app(), ["plan", str(cfg), "launch.nproc=1"])
    assert one_gpu.exit_code == 2 and "does not fit" in one_gpu.output
    for bad, says in ((["traim.steps=3"], "traim"), (["defense.name=tvaccine"], "unknown defense"),
                      (["train.steps"], "not key=value")):
        res = runner.invoke(_app(), ["plan", str(cfg), *bad])
        assert res.exit_code == 2 and says in res.output, res.output
        assert res.output.count("\n") == 1 and "Traceback" not in res.output
    # an eval YAML takes options, not key=value
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text("model: llama2-7b\n")
    res = runner.invoke(_app(), ["plan", str(eval_yaml), "dtype=fp32", "--stage", "eval"])
    assert res.exit_code == 2 and "apply to a run config" in res.output


# --- sbatch rendering ------------------------------------------------------------------------


def _bash_n(script: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_render_single_node(tmp_path):
    s = render_sbatch("cfg.yaml", stage="align", nodes=1, gpus_per_node=4, job_name="j1", time="01:00:00",
                      partition="gpu", account=None, extra_overrides=["train.lr=2e-5"])
    _bash_n(s, tmp_path)
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=01:00:00", "#SBATCH --output=logs/%x-%j-%N.out", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --partition=gpu", "#SBATCH --job-name=j1",
                 'scontrol requeue "$SLURM_JOB_ID"', "trap requeue USR1", "export BULWARK_DATA_DIR=",
                 "-m bulwark.recipes.align cfg.yaml train.lr=2e-5 --resume-if-present"):
        assert line in s, line
    assert "--account" not in s and "@@" not in s
    assert 'MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in s


def test_render_multi_node(tmp_path):
    s = render_sbatch("configs/x y.yaml", stage="finetune", nodes=4, gpus_per_node=8, job_name="big",
                      time="2-00:00:00", partition=None, account="proj", extra_overrides=[])
    _bash_n(s, tmp_path)
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64",
                 "#SBATCH --account=proj", '--nnodes "$SLURM_NNODES"', "--rdzv_backend c10d",
                 '--rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"', '--rdzv_id "$SLURM_JOB_ID"',
                 "-m bulwark.recipes.finetune 'configs/x y.yaml'", "# export NCCL_DEBUG=INFO",
                 "# export NCCL_SOCKET_IFNAME=", "# export NCCL_IB_HCA=", "# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
                 "# export NCCL_ASYNC_ERROR_HANDLING=1"):
        assert line in s, line


def test_render_rejects_bad_input():
    with pytest.raises(BulwarkInputError, match="nodes and gpus per node must be >= 1"):
        render_sbatch("c.yaml", nodes=0, gpus_per_node=8)
    with pytest.raises(BulwarkInputError, match="nodes and gpus per node must be >= 1"):
        render_sbatch("c.yaml", nodes=1, gpus_per_node=0)
    with pytest.raises(BulwarkInputError, match="stage"):
        render_sbatch("c.yaml", stage="train", nodes=1, gpus_per_node=1)  # type: ignore[arg-type]
    with pytest.raises(BulwarkInputError, match="key=value"):
        render_sbatch("c.yaml", nodes=1, gpus_per_node=1, extra_overrides=["oops"])
    with pytest.raises(BulwarkInputError, match="one line"):
        render_sbatch("c.yaml", nodes=1, gpus_per_node=1, extra_overrides=["train.lr=1\nrm -rf ~"])
    for bad in ("gpu;rm -rf ~", "gpu\n#SBATCH --uid=0", "a b", "$(id)"):
        with pytest.raises(BulwarkInputError, match="partition"):
            render_sbatch("c.yaml", nodes=1, gpus_per_node=1, partition=bad)
        with pytest.raises(BulwarkInputError, match="account"):
            render_sbatch("c.yaml", nodes=1, gpus_per_node=1, account=bad)
    with pytest.raises(BulwarkInputError, match="newline"):
        render_sbatch("c\n.yaml", nodes=1, gpus_per_node=1)
    with pytest.raises(BulwarkInputError, match="one node"):
        render_sbatch("b.yaml", stage="bench", nodes=2, gpus_per_node=1)
    # a config name with shell syntax is quoted, never run
    script = render_sbatch("my $(id) cfg.yaml", nodes=1, gpus_per_node=1)
    assert "-m bulwark.recipes.finetune 'my $(id) cfg.yaml' --resume-if-present" in script


def test_cli_slurm_bad_input_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    cfg = _run_config(tmp_path)
    out = tmp_path / "job.sbatch"
    for args, says in ((["--stage", "train"], "stage"), (["--nodes", "0"], "nodes"), (["--gpus-per-node", "0"], "nodes"),
                       (["--partition", "gpu;reboot"], "partition"), (["--account", "a\nb"], "account")):
        res = CliRunner().invoke(_app(), ["slurm", str(cfg), "--out", str(out), *args])
        assert res.exit_code == 2 and says in res.output, (args, res.output)
        assert res.output.count("\n") == 1 and not out.exists()


FAKE_BIN = {
    "scontrol": """\
        #!/bin/bash
        echo "scontrol $*" >> "$FAKE_LOG"
        if [ "$1" = show ] && [ "$2" = hostnames ]; then printf 'node-a\\nnode-b\\n'; fi
        """,
    "srun": """\
        #!/bin/bash
        echo "srun $*" >> "$FAKE_LOG"
        while [ $# -gt 0 ] && [[ "$1" == --* ]]; do shift; done
        exec "$@"
        """,
    "torchrun": """\
        #!/bin/bash
        printf '%s\\n' "$@" > "$FAKE_ARGV"
        echo "torchrun OMP=$OMP_NUM_THREADS DATA=$BULWARK_DATA_DIR MASTER=$MASTER_ADDR:$MASTER_PORT" >> "$FAKE_LOG"
        if [ -n "${FAKE_SLEEP:-}" ]; then sleep "$FAKE_SLEEP"; fi
        exit "${FAKE_RC:-0}"
        """,
}


def _fake_slurm(tmp_path: Path, **env: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in FAKE_BIN.items():
        (bin_dir / name).write_text(textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    # the script falls back to ./data only when the caller has no BULWARK_DATA_DIR of its own
    outer = {k: v for k, v in os.environ.items() if k != "BULWARK_DATA_DIR"}
    return {
        **outer, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log"),
        "FAKE_ARGV": str(tmp_path / "argv.txt"), "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(tmp_path), **env,
    }


def test_sbatch_runs_under_fake_slurm(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch("cfg.yaml", stage="finetune", nodes=2, gpus_per_node=4, job_name="t",
                                    time="10:00", partition=None, account=None,
                                    extra_overrides=["train.steps=3"]))
    env = _fake_slurm(tmp_path)
    env.pop("SLURM_RESTART_COUNT", None)
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    argv = (tmp_path / "argv.txt").read_text().split("\n")[:-1]
    assert argv == ["--nnodes", "2", "--nproc_per_node", "4", "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"node-a:{29500 + 4242}", "--rdzv_id", "4242",
                    "-m", "bulwark.recipes.finetune", "cfg.yaml", "train.steps=3", "--resume-if-present"]
    calls = (tmp_path / "calls.log").read_text()
    assert "scontrol show hostnames node-[a-b]" in calls
    assert "srun --output=logs/%x-%j-%N.rank.out" in calls
    assert f"DATA={tmp_path}/data MASTER=node-a:{29500 + 4242}" in calls
    # A requeued job runs the same command (--resume-if-present decides); a failing step's exit code is the job's.
    res = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": "1", "FAKE_RC": "3"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3
    argv = (tmp_path / "argv.txt").read_text().split("\n")[:-1]
    assert argv[-3:] == ["cfg.yaml", "train.steps=3", "--resume-if-present"]


def test_sbatch_requeues_on_usr1(tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch("cfg.yaml", stage="recover", nodes=1, gpus_per_node=2, job_name="t"))
    env = _fake_slurm(tmp_path, FAKE_SLEEP="30")
    log = tmp_path / "batch.out"  # a file, not a pipe: the sleeping fake torchrun keeps a pipe open
    with log.open("w") as sink:
        proc = subprocess.Popen(["bash", str(script)], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "argv.txt").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "torchrun was not started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)
        proc.wait(timeout=20)
        out = log.read_text()
        assert proc.returncode == 0, out
        assert "requeueing job 4242" in out
        assert "scontrol requeue 4242" in (tmp_path / "calls.log").read_text()
        assert "bulwark.recipes.recover" in (tmp_path / "argv.txt").read_text()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the sleeping fake torchrun we started
        except ProcessLookupError:
            pass


# --- submit ----------------------------------------------------------------------------------


def test_submit_without_sbatch(tmp_path, monkeypatch):
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(BulwarkInputError, match="sbatch not found .* render without --submit"):
        submit(script)


def test_submit_with_fake_sbatch(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\necho "$@" > "$(dirname "$0")/args"\necho "777;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n")
    assert submit(script) == "777"
    assert (tmp_path / "logs").is_dir()
    assert (bin_dir / "args").read_text().strip() == f"--parsable {script}"


def test_cli_slurm(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _run_config(tmp_path)
    runner = CliRunner()
    res = runner.invoke(_app(), ["slurm", str(cfg), "train.lr=1e-5", "--nodes", "2", "--stage", "align"])
    assert res.exit_code == 0, res.output
    assert "#SBATCH --nodes=2" in res.output and "bulwark.recipes.align" in res.output
    assert "train.lr=1e-5" in res.output
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    res = runner.invoke(_app(), ["slurm", str(cfg), "--submit"])
    assert res.exit_code == 2 and "sbatch not found" in res.output
    res = runner.invoke(_app(), ["slurm", str(cfg), "--gpus-per-node", "0"])
    assert res.exit_code == 2 and "nodes and gpus per node must be >= 1" in res.output



def test_cli_slurm_overrides_decide_the_job(tmp_path, monkeypatch):
    """Overrides are read like the job will read them: launch.* sets the SLURM shape, a bad key fails now."""
    monkeypatch.chdir(tmp_path)
    cfg = _run_config(tmp_path)
    runner = CliRunner()
    res = runner.invoke(_app(), ["slurm", str(cfg), "launch.nproc=2", "launch.nnodes=3", "--stage", "align"])
    assert res.exit_code == 0, res.output
    assert "#SBATCH --nodes=3" in res.output and "#SBATCH --gpus-per-node=2" in res.output
    assert "launch.nproc=2 launch.nnodes=3" in res.output
    res = runner.invoke(_app(), ["slurm", str(cfg), "train.micro_batch_sise=2", "--out", str(tmp_path / "j.sbatch")])
    assert res.exit_code == 2 and "micro_batch_sise" in res.output and res.output.count("\n") == 1
    assert not (tmp_path / "j.sbatch").exists()


# --- presets and project rules ---------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_header_matches_plan(preset):
    text = preset.read_text()
    cfg = yaml.safe_load(text)
    plan, settings, nodes, gpus = plan_run(preset, gpu_mem_gib=80)
    assert plan.fits
    want = float(re.search(r"^# expected memory per GPU: ([\d.]+) GiB of 80 GiB", text, re.M).group(1))
    assert want == round(plan.total_gib, 1)
    total, n_hdr, g_hdr = map(int, re.search(r"^# GPUs: (\d+) \((\d+) nodes? x (\d+) GPUs", text, re.M).groups())
    assert (n_hdr, g_hdr, total) == (nodes, gpus, plan.world_size)
    cmd = re.search(r"^# command: (.*)$", text, re.M).group(1)
    assert f"bulwark slurm configs/presets/{preset.name} --nodes {nodes} --gpus-per-node {gpus}" in cmd
    assert (cfg["launch"]["nnodes"], cfg["launch"]["nproc"]) == (nodes, gpus)
    assert (REPO / cfg["launch"]["ds_config"]).is_file()
    host = re.search(r"^# host memory per node: (\d+) GiB", text, re.M)
    if plan.cpu_bytes_per_node:
        assert host and int(host.group(1)) == round(plan.cpu_bytes_per_node / GIB)


def test_cluster_code_never_imports_deepspeed():
    for path in (REPO / "bulwark" / "cluster").glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+deepspeed", path.read_text(), re.M), path
    code = "import bulwark.cluster.cli, sys; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_templates_exist_and_bash_is_available():
    assert shutil.which("bash")
    assert (REPO / "slurm" / "single_node.sbatch").is_file() and (REPO / "slurm" / "multi_node.sbatch").is_file()


# --- eval plan --------------------------------------------------------------------------------------


def test_eval_plan_matches_hand_computation_llama70b():
    """Llama-2-70B, bf16, batch 8, 1024 prompt + 128 new tokens, by hand from its config."""
    from bulwark.cluster.eval_plan import plan_eval_memory

    h, inter, layers, heads, kv, vocab = 8192, 28672, 80, 64, 8, 32000
    head_dim = h // heads
    per_layer = h * h * 2 + h * kv * head_dim * 2 + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; norms
    params = 2 * vocab * h + layers * per_layer + h  # untied embeddings + lm_head, final norm
    assert params == planmod.count_params(LLAMA70)
    b, prompt, new = 8, 1024, 128
    kv_cache = 2 * layers * b * (prompt + new) * kv * head_dim * 2
    prefill = b * prompt * (4 * h + 3 * inter) * 2
    logits = b * vocab * (2 + 4)
    reserve = planmod.RUNTIME_RESERVE_BYTES

    replica = plan_eval_memory(LLAMA70, world_size=8, dtype="bf16", batch_size=b, prompt_tokens=prompt,
                               new_tokens=new)
    assert replica.total_bytes == params * 2 + kv_cache + prefill + logits + reserve
    assert not replica.fits and any("--zero3" in line for line in replica.advice)  # 129 GiB of weights alone

    zero3 = plan_eval_memory(LLAMA70, world_size=8, dtype="bf16", zero3=True, batch_size=b, prompt_tokens=prompt,
                             new_tokens=new)
    gathered = 2 * max(per_layer, vocab * h)  # a decoder layer (~856M) beats the embedding (~262M)
    assert zero3.gathered_bytes == gathered and zero3.weights_bytes == params * 2 // 8
    assert zero3.total_bytes == params * 2 // 8 + gathered + kv_cache + prefill + logits + reserve
    assert zero3.fits and 20 < zero3.total_gib < 25

    fp32 = plan_eval_memory(LLAMA70, world_size=8, dtype="fp32", zero3=True, batch_size=b, prompt_tokens=prompt,
                            new_tokens=new)
    assert fp32.weights_bytes == params * 4 // 8 and fp32.kv_cache_bytes == 2 * kv_cache


def test_cli_plan_stage_eval(tmp_path, tiny_model_dir):
    runner = CliRunner()
    # a run config: model.name and launch.nproc (8 GPUs); a 7B replica in bf16 fits an 80 GiB card
    ok = runner.invoke(_app(), ["plan", str(_run_config(tmp_path)), "--stage", "eval"])
    assert ok.exit_code == 0, ok.output
    assert "eval memory per GPU" in ok.output and "KV cache" in ok.output and "fits" in ok.output
    # an eval YAML naming a 70B-sized folder: one replica per GPU does not fit, --zero3 over 8 does
    big = tmp_path / "llama70"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(LLAMA70))
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(f"model: {big}\nnproc: 8\nmax_new_tokens: 128\nbatch_size: 8\n")
    over = runner.invoke(_app(), ["plan", str(eval_yaml), "--stage", "eval"])
    assert over.exit_code == 2 and "--zero3" in over.output and "does not fit" in over.output
    fits = runner.invoke(_app(), ["plan", str(eval_yaml), "--stage", "eval", "--zero3"])
    assert fits.exit_code == 0 and "ZeRO-3 partitioned" in fits.output, fits.output
    bad = runner.invoke(_app(), ["plan", str(eval_yaml), "--stage", "eval", "--dtype", "fp16"])
    assert bad.exit_code == 2 and "dtype" in bad.output, bad.output
    bad = runner.invoke(_app(), ["plan", str(eval_yaml), "--stage", "serve"])
    assert bad.exit_code == 2 and "--stage" in bad.output, bad.output


def test_activations_count_the_attention_scores_only_for_eager_attention():
    """SDPA keeps no s x s scores (measured on an H200: docs/BENCHMARKS.md); eager attention does:
    per layer 5*a*s/h more bytes per s*b*h at 16 bits (Korthikanti et al. 2022)."""
    from bulwark.errors import BulwarkInputError

    cfg = resolve_model_config("llama2-7b")
    args = dict(nodes=1, gpus_per_node=8, dtype="bf16", micro_batch_size=2, seq_len=1024, with_advice=False)
    sdpa = plan_memory(cfg, **args)
    eager = plan_memory(cfg, attention="eager", **args)
    s, b, h, a, layers = 1024, 2, 4096, 32, 32
    assert eager.activation_bytes - sdpa.activation_bytes == pytest.approx(layers * s * b * h * 5 * a * s / h, rel=1e-9)
    assert sdpa.activation_bytes == pytest.approx(layers * s * b * h * 34 + s * b * 32000 * 6, rel=1e-9)
    with pytest.raises(BulwarkInputError, match="attention"):
        plan_memory(cfg, attention="flash3", **args)


def test_lora_plan_counts_the_adapted_weights_a_defense_keeps():
    """AsFT keeps V of every LoRA-adapted frozen weight (fp32, split over ranks): plan counts it beside its
    trainable-shard copies; without LoRA the same defense keeps only shard copies."""
    from bulwark.cluster.plan import count_lora_adapted, count_lora_params

    cfg = resolve_model_config("llama2-7b")
    lora = {"enabled": True, "r": 8, "target_modules": ["q_proj", "v_proj"]}
    adapted, trainable = count_lora_adapted(cfg, lora), count_lora_params(cfg, lora)
    assert adapted == 2 * 4096 * 4096 * 32
    for gpus in (1, 8):
        plan = _plan(gpus_per_node=gpus, defense="asft", lora=lora)
        assert plan.defense_bytes == 2 * trainable * 4 // gpus + adapted * 4 // gpus
    full = _plan(defense="asft")
    assert full.defense_bytes == 2 * 4 * count_params(cfg)
