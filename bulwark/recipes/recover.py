"""`bulwark recover`: repair a fine-tuned model B toward its aligned model A (the math: bulwark/recover/).

    bulwark recover [CONFIG] [key=value ...] [--overwrite]          starts launch.nproc ranks (bulwark/launch.py)
    torchrun --nproc_per_node N -m bulwark.recipes.recover [CONFIG] [key=value ...] [--resume-if-present]

`method=restore` (default): gradient-ranked restore with rollback (bulwark/recover/method.py).
`method=safelora`: SafeLoRA-style projection (bulwark/recover/safelora.py), one process.

Everything that can be checked without loading a model (config, model folders, A/B compatibility, data
files, prompts) is checked before any rank starts (`prepare`): bad input costs one `error:` line and exit
code 2. Recover keeps no checkpoints: --resume-if-present (SLURM jobs) starts an unfinished attempt of the
same config over and leaves a finished one alone (bulwark/recipes/loop.py: start_mode).

The run folder (out_dir):
  config.yaml     the resolved config
  model/          the repaired model, an HF folder (written to model.tmp, then renamed)
  adapter/        safelora with a LoRA input: the projected adapter
  log.jsonl       restore: one row per step (restored / rolled-back counts per weight) and per checkpoint
                  (task score, floor, HS when eval.n > 0); safelora: one row per layer (cos, projected)
  summary.json    the outcome and wall time
  DONE            written last, as the other stages do (bench skips finished runs by it)
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bulwark.errors import BulwarkInputError
from bulwark.recipes.loop import RUN_MARKER, parse_args, start_mode
from bulwark.recover.config import (
    RecoverConfig,
    load_recover_config,
    recover_config_text,
    write_recover_config,
)


@dataclass
class Inputs:
    aligned: Path  # A, an HF folder
    finetuned: Path  # B: an HF folder, or a LoRA adapter folder
    finetuned_base: Path | None  # the adapter's base when B is an adapter
    base: Path | None  # safelora: the unaligned base
    data_dir: Path | None


# ---- checks before any rank starts ---------------------------------------------------------------------


def _model_folder(name: str, key: str) -> Path:
    from bulwark import models

    if name == "tiny":
        raise BulwarkInputError(f"{key}: 'tiny' is built in memory; save it first (models.save_tiny_llama)")
    try:
        return Path(models.resolve_model_path(name))
    except BulwarkInputError as exc:
        raise BulwarkInputError(f"{key}: {exc}") from None


def check_inputs(cfg: RecoverConfig) -> Inputs:
    """Resolve and check every input (the models, their compatibility, the data files; the run folder is
    `start_mode`'s); raises BulwarkInputError with one clear line."""
    from bulwark import models
    from bulwark.data.readers import resolve_data_dir
    from bulwark.recover.checkpoints import check_compatible

    aligned = _model_folder(cfg.aligned, "aligned")
    finetuned_base = None
    base = _model_folder(cfg.base, "base") if cfg.base else None
    if models.is_adapter_dir(cfg.finetuned):
        finetuned = Path(cfg.finetuned).expanduser()
        if cfg.method == "restore":  # merged onto its base; safelora adds it to the aligned model instead
            finetuned_base = _model_folder(models.base_of(cfg.finetuned), f"finetuned (the base of {finetuned})")
    else:
        finetuned = _model_folder(cfg.finetuned, "finetuned")
    if finetuned_base is not None or not models.is_adapter_dir(finetuned):
        check_compatible(aligned, finetuned_base or finetuned)
    if base is not None and cfg.method == "safelora":
        check_compatible(base, aligned)
    data_dir = resolve_data_dir(cfg.data.dir)
    if cfg.method == "restore":
        _check_restore_data(cfg, data_dir)
        from bulwark.recover.config import use_zero3

        if use_zero3(cfg, int(os.environ.get("WORLD_SIZE", cfg.launch.nproc))):
            from bulwark.engine.partitioned import zero3_config

            zero3_config(cfg.launch.ds_config, cfg.dtype, 1)  # a missing or non-ZeRO-3 JSON: one line here
    return Inputs(aligned, finetuned, finetuned_base, base, data_dir)


def _check_restore_data(cfg: RecoverConfig, data_dir: Path | None) -> None:
    from bulwark.recover.task import load_rows, metric_kind

    load_rows(cfg.data.harmful, cfg.data.harmful_n, data_dir, "data.harmful", cfg.data.harmful_format)
    load_rows(cfg.data.task, cfg.data.task_n, data_dir, "data.task", cfg.data.task_format)
    metric_kind(cfg)
    load_rows(cfg.task.eval_set, cfg.task.n, data_dir, "task.eval_set")
    if cfg.eval.n > 0:
        from bulwark.eval.judges import check_judge_name

        check_judge_name(cfg.eval.judge)
        load_rows(cfg.eval.prompts, cfg.eval.n, data_dir, "eval.prompts", fmt="prompt_only")


# ---- the launcher's checks ------------------------------------------------------------------------------


def prepare(config: str | None, overrides: list[str], *, resume: bool = False, overwrite: bool = False,
            resume_if_present: bool = False, stop_after: int = 0) -> tuple[int, list[str]]:
    """Check every input before any rank starts (bulwark/launch.py); returns (ranks, rank argv)."""
    from bulwark.launch import stage_argv

    if resume or stop_after:
        raise BulwarkInputError("recover keeps no checkpoints: --resume / --stop-after do not apply "
                                "(--resume-if-present starts an unfinished attempt over)")
    cfg = load_recover_config(config, overrides)
    start_mode(Path(cfg.out_dir), recover_config_text(cfg), False, overwrite, resume_if_present)
    check_inputs(cfg)
    nproc = 1 if cfg.method == "safelora" else cfg.launch.nproc
    return nproc, stage_argv(config, overrides, overwrite=overwrite, resume_if_present=resume_if_present)


def _init_ranks(cfg: RecoverConfig) -> tuple[int, int]:
    from bulwark.recover.config import use_zero3

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.method == "restore" and use_zero3(cfg, world):
        from bulwark.engine import init_distributed

        rank, world, _ = init_distributed()  # through DeepSpeed: zero.Init reads its process group
        return rank, world
    if world > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():  # NCCL stages collectives on the current device: this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        from bulwark.engine.dist import shutdown

        atexit.register(shutdown)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---- the run --------------------------------------------------------------------------------------------


class JsonlLog:
    """Rank 0 appends rows to log.jsonl and prints a short line per row; other ranks stay silent."""

    def __init__(self, path: Path, rank: int) -> None:
        self.file = path.open("a") if rank == 0 else None

    def __call__(self, row: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        brief = {k: v for k, v in row.items() if not isinstance(v, dict)}
        print(f"[recover] {json.dumps(brief)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def run(cfg: RecoverConfig, inputs: Inputs, overwrite: bool, metric: Any = None) -> dict[str, Any] | None:
    """Run the stage in every rank; rank 0 returns the summary, other ranks None.

    `metric` replaces the config's task metric (a callable model -> score, higher is better).
    """
    from bulwark.engine import barrier

    started = time.perf_counter()
    rank, world = _init_ranks(cfg)
    out = Path(cfg.out_dir)
    if rank == 0:
        if out.exists() and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_MARKER).write_text("a Bulwark recover run folder: --overwrite may replace it\n")
        write_recover_config(cfg, out / "config.yaml")
    barrier()
    log = JsonlLog(out / "log.jsonl", rank)
    try:
        if cfg.method == "safelora":
            summary = _safelora(cfg, inputs, out, log) if rank == 0 else None
        else:
            summary = _restore(cfg, inputs, out, log, rank, world, metric)
    finally:
        log.close()
    if rank == 0 and summary is not None:
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary["world_size"] = world
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(out / "summary.json")
        (out / "DONE").write_text(json.dumps({"stage": "recover", "method": cfg.method}))  # as align/finetune
        print(f"[recover] done in {summary['seconds']} s -> {out / 'model'}", file=sys.stderr, flush=True)
    barrier()
    return summary


def _safelora(cfg: RecoverConfig, inputs: Inputs, out: Path, log: JsonlLog) -> dict[str, Any]:
    from bulwark.recover.safelora import run_safelora

    assert inputs.base is not None
    decisions = run_safelora(inputs.base, inputs.aligned, inputs.finetuned, out, cfg.safelora.threshold,
                             cfg.safelora.target_modules)
    for d in decisions:
        log({"event": "layer", **asdict(d)})
    return {"method": "safelora", "threshold": cfg.safelora.threshold, "layers": len(decisions),
            "projected": sum(d.projected for d in decisions),
            "input": "lora" if (inputs.finetuned / "adapter_config.json").is_file() else "full"}


def _merged_finetuned(cfg: RecoverConfig, inputs: Inputs, out: Path, rank: int) -> Path:
    """B as a full HF folder: a LoRA adapter is merged onto its base once, by rank 0."""
    from bulwark.engine import barrier

    if inputs.finetuned_base is None:
        return inputs.finetuned
    target = out / "finetuned_merged"
    if rank == 0:
        from peft import PeftModel

        from bulwark.models import load_model, load_tokenizer

        model = PeftModel.from_pretrained(load_model(str(inputs.finetuned_base), cfg.dtype), str(inputs.finetuned))
        merged = model.merge_and_unload()
        has_tokenizer = (inputs.finetuned / "tokenizer_config.json").is_file()
        tokenizer = load_tokenizer(str(inputs.finetuned if has_tokenizer else inputs.finetuned_base))
        tmp = out / "finetuned_merged.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    barrier()
    return target


def _restore(cfg: RecoverConfig, inputs: Inputs, out: Path, log: JsonlLog, rank: int, world: int,
             metric: Any) -> dict[str, Any] | None:
    from bulwark.engine.dist import device
    from bulwark.engine.partitioned import gathered_per_module, load_partitioned
    from bulwark.models import load_model, load_tokenizer
    from bulwark.recover.checkpoints import TensorStore, write_model
    from bulwark.recover.config import use_zero3
    from bulwark.recover.hidden import LayerwiseModel, count_rows, decoder_layers, local_batches
    from bulwark.recover.method import Restorer, chosen_weights
    from bulwark.recover.task import harm_metric, load_rows, prompt_batches, task_metric

    zero3 = use_zero3(cfg, world)

    def load(folder: Path) -> torch.nn.Module:
        # ZeRO-3: each rank holds its slice of every weight, already on its device (zero.Init places the
        # slices on the accelerator); else a whole replica per rank, moved to this rank's GPU when there is one
        if zero3:
            return load_partitioned(folder, cfg.dtype, cfg.launch.ds_config).eval()
        return load_model(str(folder), cfg.dtype).to(device()).eval()

    def per_module(score: Any) -> Any:
        # a whole-model forward or generate on a partitioned model gathers one module at a time
        if score is None:
            return None

        def gathered_score(model: torch.nn.Module) -> float:
            with gathered_per_module(model, decoder_layers(model)[1]):
                return score(model)

        return gathered_score

    finetuned = _merged_finetuned(cfg, inputs, out, rank)
    tokenizer = load_tokenizer(str(finetuned))
    harmful = prompt_batches(load_rows(cfg.data.harmful, cfg.data.harmful_n, inputs.data_dir, "data.harmful",
                                       cfg.data.harmful_format),
                             tokenizer, cfg)
    task = prompt_batches(load_rows(cfg.data.task, cfg.data.task_n, inputs.data_dir, "data.task",
                                    cfg.data.task_format), tokenizer, cfg)
    description = "given by the caller"
    if metric is None:
        metric, description = task_metric(cfg, tokenizer, inputs.data_dir)
    harm_score = harm_metric(cfg, tokenizer, inputs.data_dir)

    # d_harm: A's mean last-token hidden state after layer L on the recovery prompts
    model_a = load(inputs.aligned)
    layer, lowest, _ = chosen_weights(model_a, cfg.restore)
    runner = LayerwiseModel(model_a, layer, lowest)
    _, d_harm = runner.mean_last_hidden(local_batches(harmful, rank, world), count_rows(harmful))
    del model_a, runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # A's memory goes back before B is loaded beside it

    model = load(finetuned)
    restorer = Restorer(model, TensorStore(inputs.aligned, "aligned model"), TensorStore(finetuned, "fine-tuned model"),
                        cfg.restore, log)
    d_benign = restorer.direction(task)  # the same for B on the task prompts
    result = restorer.run(harmful, task, d_harm, d_benign, per_module(metric), per_module(harm_score))

    store_a = TensorStore(inputs.aligned, "aligned model")
    if rank == 0:
        def repaired(name: str, weight: torch.Tensor) -> torch.Tensor:
            idx = result.restored.get(name)
            if idx is None or idx.numel() == 0:
                return weight
            flat = weight.clone().flatten()
            flat[idx] = store_a.get(name).flatten()[idx].to(weight.dtype)
            return flat.view_as(weight)

        write_model(finetuned, out / "model", repaired)
    changed = sum(int(i.numel()) for i in result.restored.values())
    return {"method": "restore", "aligned": str(inputs.aligned), "finetuned": str(inputs.finetuned),
            "task_metric": description, "task_score_B": result.score_b, "floor": result.floor,
            "rolled_back": result.rolled_back, "kept_step": result.kept_step, "changed_elements": changed,
            "weights_in_layers": restorer.total, "k_per_step": restorer.k, "layer": restorer.layer,
            "layers": [restorer.lowest, restorer.lowest + len(restorer.by_layer)],
            "zero3": zero3,
            "checkpoints": result.checkpoints} if rank == 0 else None


# ---- entry point ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """The rank entry (`python -m bulwark.recipes.recover` under torchrun, or `bulwark.launch.start`)."""
    from bulwark.engine.dist import exit_after_success

    args = parse_args(argv, "recover")
    try:
        if args.resume or args.stop_after:
            raise BulwarkInputError("recover keeps no checkpoints: --resume / --stop-after do not apply")
        cfg = load_recover_config(args.config, args.overrides)
        mode = start_mode(Path(cfg.out_dir), recover_config_text(cfg), False, args.overwrite, args.resume_if_present)
        if mode == "done":
            print(f"{cfg.out_dir}: this recover run finished already (DONE); nothing to do", file=sys.stderr)
            return
        inputs = check_inputs(cfg)
        run(cfg, inputs, overwrite=mode == "overwrite")
    except BulwarkInputError as exc:
        from bulwark.errors import report

        report(f"error: {exc}", os.environ.get("RANK", "0") == "0")
        raise SystemExit(2) from None
    exit_after_success()


if __name__ == "__main__":
    main()
