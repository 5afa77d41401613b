"""GPU figures on one GPU: tokens/s, MFU and peak memory of Bulwark's engine and defenses, beside a bare
DeepSpeed loop and plain PyTorch, and the memory `bulwark plan` predicts for each.

    python bench/gpu_figures.py --out DIR [--budget-s 330] [--cases sft,deepspeed,...]

Every case runs in its own process (peak memory per case, a crash in one case loses only that case)
on a randomly initialised Llama built from a config (no weights on disk): ~1.1B parameters
(TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632, vocab 32000), bf16,
ZeRO-3, micro batch 4 x 2048 tokens, all tokens labelled. The batch is random tokens, the same every
step, so the measured time is the model's and never the data pipeline's.

Cases:
- `torch`: plain PyTorch, no DeepSpeed: fp32 weights, bf16 autocast, fused AdamW (the usual
  mixed-precision loop: the same arithmetic as DeepSpeed's bf16 + fp32 master weights).
- `deepspeed`: a bare DeepSpeed ZeRO-3 loop (`deepspeed.initialize`, `engine(**batch).loss`,
  `backward`, `step`) with the very DeepSpeed config Bulwark's engine builds: the overhead ratio of
  Bulwark's engine, hooks and loop is `bulwark:sft` over this.
- `bulwark:<defense>`: Bulwark's Engine + the defense's hooks, the loop body of the recipes.
- `offload`: `bulwark:sft` under ds_configs/zero3_offload.json (parameters and optimizer on the host).
- `lora7b`: LoRA (r 8, all linear layers) on a randomly initialised Llama-2-7B shape, ZeRO-3, the 7B
  preset's micro batch 2 x 1024 tokens.

MFU = model FLOPs per step / step time / peak, with model FLOPs = 6 N T + 12 L h s T (PaLM's
count, Chowdhery et al. 2022, appendix B: N parameters excluding the input embedding, T tokens per
step, L layers, h hidden size, s sequence length) and the peak the H100/H200 SXM datasheet's dense bf16
989.4 TFLOP/s (docs/BENCHMARKS.md also gives the matrix-product rate measured on the card). A defense's
MFU counts only SFT's model FLOPs (the useful work); its extra passes show in its ratio to SFT.
Memory: torch.cuda.max_memory_allocated over the whole case (model build, engine, all steps) against
`bulwark.cluster.plan.plan_memory` for the same model, batch, ZeRO stage, offload, LoRA and defense.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PEAK_BF16_FLOPS = 989.4e12
LLAMA_1B = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 4096,
}
LLAMA_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False, "max_position_embeddings": 4096,
}
# --smoke: the same code paths on a tiny shape, on the CPU when there is no GPU (tests/test_gpu_figures.py)
SMOKE_MODEL = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": False, "max_position_embeddings": 256,
}
DEFENSES = ["sft", "lisa", "vaccine", "t-vaccine", "booster", "repnoise", "smart"]
ALL_CASES = (["bulwark:sft", "deepspeed", "torch"] + [f"bulwark:{d}" for d in DEFENSES[1:]]
             + ["offload", "lora7b", "zero2", "mbs8"])
# issue 14's targets: Bulwark vs bare DeepSpeed (tokens/s), and step time of a defense / Bulwark's SFT
TARGET_VS_DEEPSPEED = 0.9
TARGET_MFU = 0.40
TARGET_RATIO = {"lisa": 1.05, "vaccine": 2.1, "t-vaccine": 2.1, "booster": 3.1, "repnoise": 2.3, "smart": 2.5}


def case_setup(case: str, smoke: bool = False) -> dict[str, Any]:
    setup = _full_setup(case)
    if smoke:
        setup.update(model=SMOKE_MODEL, mbs=2, seq=32, warmup=1, steps=1)
    return setup


def _full_setup(case: str) -> dict[str, Any]:
    if case == "lora7b":
        return {"model": LLAMA_7B, "mbs": 2, "seq": 1024, "lora": True, "ds_config": "zero3", "defense": "sft",
                "warmup": 1, "steps": 3}
    setup = {"model": LLAMA_1B, "mbs": 4, "seq": 2048, "lora": False, "ds_config": "zero3", "defense": "sft",
             "warmup": 2, "steps": 5}
    if case == "offload":
        setup.update(ds_config="zero3_offload", warmup=1, steps=2)
    elif case == "zero2":  # Bulwark's SFT without ZeRO-3's per-module parameter hooks
        setup.update(ds_config="zero2")
    elif case == "mbs8":  # Bulwark's SFT with twice the tokens per step for the same host work
        setup.update(mbs=8)
    elif case.startswith("bulwark:"):
        setup["defense"] = case.split(":", 1)[1]
    return setup


def model_flops_per_step(cfg: dict[str, Any], mbs: int, seq: int) -> float:
    from bulwark.cluster.plan import count_params

    n = count_params(cfg) - cfg["vocab_size"] * cfg["hidden_size"]  # the input embedding is a lookup
    tokens = mbs * seq
    return 6 * n * tokens + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq * tokens


def build_model(cfg: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """A random Llama from its config, on the GPU when there is one; under an active HfDeepSpeedConfig
    (ZeRO-3) built inside zero.Init, so each rank only ever holds its shard.

    transformers' own initialisation is skipped: under zero.Init it gathers every weight whole to draw
    it, module by module. Instead each rank draws its own slice in place (N(0, 0.02), norms 1): the
    same distribution, no gather. Timings depend on the values only through NaN/inf, which this rules
    out. A case took ~25 s on the H200 for ~2 s of steps; `build_s` and `engine_s` in each Bulwark
    case's JSON say where the rest goes (not yet measured on a GPU).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.initialization import no_init_weights

    config = LlamaConfig(**cfg, attn_implementation="sdpa")
    with device(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.ds_tensor if hasattr(param, "ds_tensor") else param.data  # ZeRO-3: this rank's slice
            local.fill_(1.0) if "norm" in name else local.normal_(0.0, 0.02)
    return model


def random_batch(vocab: int, mbs: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (mbs, seq), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step: Any, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def profile(step: Any, path: Path) -> None:
    """Two steps under the torch profiler; the ops that took the most GPU time, as a text table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(2):
            step()
        sync()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


def train_config(setup: dict[str, Any], total: int) -> Any:
    from bulwark.config import TrainConfig

    return TrainConfig(steps=total, micro_batch_size=setup["mbs"], lr=1e-5, max_grad_norm=1.0)


def run_torch(setup: dict[str, Any], prof_path: Path | None) -> list[float]:
    model = build_model(setup["model"], torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    batch = random_batch(setup["model"]["vocab_size"], setup["mbs"], setup["seq"], device())

    def step() -> None:
        with torch.autocast(device().type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = timed(step, setup["warmup"], setup["steps"])
    if prof_path:
        profile(step, prof_path)
    return times


def run_deepspeed(setup: dict[str, Any], prof_path: Path | None) -> list[float]:
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from bulwark.engine import fill_ds_config, init_distributed, read_ds_config

    total = setup["warmup"] + setup["steps"] + 2
    init_distributed()
    ds_config = fill_ds_config(read_ds_config(setup["ds_config"]), train_config(setup, total), "bf16", 1)
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (alive while the model is built: zero.Init)
    model = build_model(setup["model"], torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    batch = random_batch(setup["model"]["vocab_size"], setup["mbs"], setup["seq"], engine.device)

    def step() -> None:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()

    times = timed(step, setup["warmup"], setup["steps"])
    if prof_path:
        profile(step, prof_path)
    return times


def run_bulwark(setup: dict[str, Any], prof_path: Path | None) -> tuple[list[float], dict[str, Any]]:
    from step_time import SyntheticStream, tensor_bytes

    from bulwark import models
    from bulwark.config import LoraConfig
    from bulwark.defenses import build_defense
    from bulwark.engine import Engine
    from bulwark.recipes.step import train_step

    total = setup["warmup"] + setup["steps"] + 2

    phases: dict[str, float] = {}

    def build() -> torch.nn.Module:
        t0 = time.perf_counter()
        model = build_model(setup["model"], torch.bfloat16)
        model = models.apply_lora(model, LoraConfig(enabled=True)) if setup["lora"] else model
        phases["build_s"] = time.perf_counter() - t0
        return model

    t0 = time.perf_counter()
    engine = Engine(build, train_config(setup, total), setup["ds_config"], "bf16", total)
    phases["engine_s"] = time.perf_counter() - t0 - phases["build_s"]
    defense = build_defense({"name": setup["defense"]}, "", total)
    defense.attach(engine)
    engine.add_pre_step_hook(defense.before_step)
    vocab = setup["model"]["vocab_size"]
    streams = {s: SyntheticStream(vocab, setup["mbs"], setup["seq"], seed=i)
               for i, s in enumerate(("main", "align", "harmful", "benign_refusals"))}
    counter = {"step": 0}

    def step() -> None:  # the recipes' loop body
        train_step(engine, defense, streams, counter["step"], 1)
        counter["step"] += 1

    times = timed(step, setup["warmup"], setup["steps"])
    if prof_path:
        profile(step, prof_path)
    return times, {"defense_state_bytes": tensor_bytes(defense.state_dict()), **phases}


def planned(setup: dict[str, Any]) -> dict[str, Any]:
    from bulwark.cluster.plan import GIB, plan_memory

    offload = setup["ds_config"] == "zero3_offload"
    plan = plan_memory(
        setup["model"], nodes=1, gpus_per_node=1, zero_stage=2 if setup["ds_config"] == "zero2" else 3,
        offload_optimizer=offload, offload_param=offload,
        dtype="bf16", lora={"enabled": True, "r": 8, "target_modules": "all-linear"} if setup["lora"] else None,
        defense=setup["defense"], micro_batch_size=setup["mbs"],
        seq_len=setup["seq"], gpu_mem_gib=139.0, with_advice=False,
    )
    return {"total_gib": plan.total_gib, **{label: b / GIB for label, b in plan.rows()}}


def run_case(case: str, out: Path, prof_dir: Path | None, smoke: bool = False) -> dict[str, Any]:
    setup = case_setup(case, smoke)
    prof_path = (prof_dir / f"{case.replace(':', '_')}.txt") if prof_dir else None
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if case == "torch":
        times = run_torch(setup, prof_path)
    elif case == "deepspeed":
        times = run_deepspeed(setup, prof_path)
    else:
        times, extra = run_bulwark(setup, prof_path)
    step_s = statistics.median(times)
    tokens = setup["mbs"] * setup["seq"]
    flops = model_flops_per_step(setup["model"], setup["mbs"], setup["seq"])
    result = {
        "case": case, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "model_params": _count(setup["model"]), "micro_batch": setup["mbs"], "seq": setup["seq"],
        "ds_config": setup["ds_config"], "lora": setup["lora"], "defense": setup["defense"],
        "step_s": step_s, "times": times, "tokens_per_s": tokens / step_s,
        "mfu": None if setup["lora"] else flops / step_s / PEAK_BF16_FLOPS,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        "case_wall_s": time.perf_counter() - t0, **extra,
    }
    try:
        result["plan"] = planned(setup)
    except Exception as exc:  # noqa: BLE001  (a plan gap is a finding, not a reason to lose the figures)
        result["plan_error"] = f"{type(exc).__name__}: {exc}"
    out.write_text(json.dumps(result, indent=1))
    return result


def _count(cfg: dict[str, Any]) -> int:
    from bulwark.cluster.plan import count_params

    return count_params(cfg)


# ---- the parent: one process per case, a time budget, the table ----------------------------------------


def run_all(args: argparse.Namespace) -> None:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    prof_dir = out_dir / "profiles"
    prof_dir.mkdir(exist_ok=True)
    cases = args.cases.split(",") if args.cases else ALL_CASES
    deadline = time.monotonic() + args.budget_s
    results: dict[str, Any] = {}
    # --repeats N: the whole list N times, interleaved, so a slow spell of the machine hits every case
    # alike; a case keeps its fastest median (the others stay in its "repeats" list)
    for case in [c for _ in range(args.repeats) for c in cases]:
        left = deadline - time.monotonic()
        if left < 20:
            results[case] = {"case": case, "error": "skipped: time budget spent"}
            continue
        case_json = out_dir / f"case_{case.replace(':', '_')}.json"
        cmd = [sys.executable, __file__, "--case", case, "--case-out", str(case_json)] + (["--smoke"] if args.smoke else [])
        if case in args.profile.split(","):
            cmd += ["--profile-dir", str(prof_dir)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(args.case_timeout_s, left))
            ok = proc.returncode == 0 and case_json.is_file()
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            ok, tail = False, f"timed out after {exc.timeout:.0f} s"
        if ok:
            row = json.loads(case_json.read_text())
            case_json.unlink()
            earlier = results.get(case, {})
            medians = earlier.get("repeats", [earlier["step_s"]] if "step_s" in earlier else []) + [row["step_s"]]
            results[case] = min(row, earlier, key=lambda r: r.get("step_s", float("inf"))) if earlier else row
            results[case]["repeats"] = medians
        elif "step_s" not in results.get(case, {}):
            results[case] = {"case": case, "error": tail}
        # written after every case: a run stopped at its time limit keeps the cases it finished
        (out_dir / "figures.json").write_text(json.dumps({"cases": results, "summary": summarize(results)}, indent=1))
        status = "ok" if ok else "FAILED"
        print(f"[{case}] {status} in {time.perf_counter() - t0:.0f} s", flush=True)
        if not ok:
            print(tail, flush=True)
    summary = summarize(results)
    (out_dir / "figures.json").write_text(json.dumps({"cases": results, "summary": summary}, indent=1))
    profiles = sorted(prof_dir.glob("*.txt"))
    if profiles:
        (out_dir / "profiles.txt").write_text("".join(f"==== {p.stem} ====\n{p.read_text()}\n" for p in profiles))
    print_table(results, summary)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    def step(case: str) -> float | None:
        row = results.get(case, {})
        return row.get("step_s")

    summary: dict[str, Any] = {}
    sft, bare = step("bulwark:sft"), step("deepspeed")
    if sft and bare:
        summary["bulwark_vs_deepspeed"] = bare / sft  # tokens/s ratio
    if sft and step("torch"):
        summary["deepspeed_vs_torch"] = step("torch") / bare if bare else None
        summary["bulwark_vs_torch"] = step("torch") / sft
    for name in DEFENSES[1:]:
        own = step(f"bulwark:{name}")
        if sft and own:
            summary[f"ratio_{name}"] = own / sft
    return summary


def print_table(results: dict[str, Any], summary: dict[str, Any]) -> None:
    print("\n| case | step s | tokens/s | MFU | vs target | peak alloc GiB | planned GiB | plan / measured |")
    print("|---|---|---|---|---|---|---|---|")
    sft = results.get("bulwark:sft", {}).get("step_s")
    for case, row in results.items():
        if "step_s" not in row:
            print(f"| {case} | failed | | | | | | |")
            continue
        verdict = ""
        name = row["defense"] if case.startswith("bulwark:") else ""
        if name in TARGET_RATIO and sft:
            ratio = row["step_s"] / sft
            verdict = f"{ratio:.2f}x SFT (target <= {TARGET_RATIO[name]}: {'met' if ratio <= TARGET_RATIO[name] else 'not met'})"
        elif case == "bulwark:sft" and "bulwark_vs_deepspeed" in summary:
            r = summary["bulwark_vs_deepspeed"]
            verdict = f"{r:.2f}x bare DeepSpeed (target >= {TARGET_VS_DEEPSPEED}: {'met' if r >= TARGET_VS_DEEPSPEED else 'not met'})"
        plan = row.get("plan", {}).get("total_gib")
        peak = row.get("peak_allocated_gib")
        mfu = "-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
        print(f"| {case} | {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} | {mfu} | {verdict} | "
              f"{'-' if peak is None else f'{peak:.1f}'} | {'-' if plan is None else f'{plan:.1f}'} | "
              f"{'-' if plan is None or not peak else f'{plan / peak:.2f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu_figures")
    parser.add_argument("--cases", default="", help=f"comma list (default: all of {','.join(ALL_CASES)})")
    parser.add_argument("--budget-s", type=float, default=330.0, help="cases not started by then are skipped")
    parser.add_argument("--case-timeout-s", type=float, default=120.0)
    parser.add_argument("--repeats", type=int, default=1, help="run the case list this many times, interleaved")
    parser.add_argument("--profile", default="bulwark:sft,deepspeed", help="cases to profile for 2 more steps")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU allowed: checks the script, no figures")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)
    parser.add_argument("--case-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--profile-dir", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("error: bench/gpu_figures.py needs a CUDA GPU (none visible)", file=sys.stderr)
        raise SystemExit(2)
    if args.case:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        run_case(args.case, Path(args.case_out), Path(args.profile_dir) if args.profile_dir else None, args.smoke)
        from bulwark.engine import exit_after_success

        exit_after_success()
        return
    run_all(args)


if __name__ == "__main__":
    main()
