"""Batched greedy generation, split across ranks.

Load a model from an HF folder (config.json) or a PEFT adapter folder (adapter_config.json: the base model
named in it, then the adapter), render each prompt with a template, and decode greedily with left padding.

Across ranks (started by torchrun): rank r takes prompts r::world and writes `rows.rank{r}.jsonl`; then
ONE barrier; then rank 0 merges the rank files into one file ordered by prompt index, checking that every
prompt appears exactly once. The out folder must be shared by all ranks.

Two ways to hold the model (`partition`):
  none   a whole replica per rank on cuda:LOCAL_RANK (or the CPU), in the eval dtype; plain
         torch.distributed (gloo), no DeepSpeed import, no per-batch collectives, so uneven shares
         never wait on each other mid-way.
  zero3  for a model that does not fit one GPU: loaded under ZeRO-3 partitioning
         (bulwark.engine.partitioned.load_partitioned), each decoder layer gathered for its forward only
         (gathered_per_module). Every gather is a collective, so every rank runs the same number of
         generate() calls (shares padded with throw-away one-prompt batches) with `synced_gpus=True`
         (a rank whose batch finished keeps stepping until all have). The process group comes from
         bulwark.engine.init_distributed (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bulwark.errors import BulwarkInputError
from bulwark.eval.device import check_partition, local_device, resolve_dtype
from bulwark.eval.io import atomic_write_jsonl, read_jsonl

# Prompts per generate() call. On SmolLM2-135M on 2 CPU cores, 32 generated the demo's 190 answers in
# 60 s against 80 s at 16 and 84 s at 64 (identical greedy outputs: prompts are left-padded).
GENERATE_BATCH_SIZE = 32

RANK_FILE = "rows.rank{rank}.jsonl"


# ---- distributed ------------------------------------------------------------------------------------


def dist_info() -> tuple[int, int]:
    """(rank, world size): from the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_from_env(partition: str = "none") -> tuple[int, int]:
    """Start the process group for this eval; returns (rank, world).

    Plain eval: a gloo group when launched by torchrun with WORLD_SIZE > 1 (its only collective is one
    barrier, which gloo serves on GPU machines too), and no DeepSpeed import. ZeRO-3 eval: the engine's
    group (NCCL on GPU, gloo on CPU), started even at world size 1 because zero.Init needs one.
    """
    if check_partition(partition) == "zero3":
        from bulwark.engine.dist import init_distributed

        rank, world, _ = init_distributed()
        return rank, world
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return dist_info()


def shutdown() -> None:
    # Not bulwark.engine.dist.shutdown: importing the engine package pulls DeepSpeed into every eval.
    # Eval's gloo groups are plain torch groups that nobody else holds, so destroying them joins their
    # worker threads and the teardown abort that `exit_after_success` guards against cannot happen.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- model ------------------------------------------------------------------------------------------


def check_model_path(model_path: str | Path) -> Path | str:
    """A folder with config.json or adapter_config.json, or the names "embedded" / "tiny"; else a clear error."""
    if str(model_path) in ("embedded", "tiny"):
        return str(model_path)
    path = Path(model_path).expanduser()
    if not path.exists():
        raise BulwarkInputError(f"model {path}: no such folder; give a model folder (config.json) or an adapter folder")
    if not path.is_dir() or not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        hint = ""
        for sub in ("model", "adapter", "export"):
            if (path / sub / "config.json").is_file() or (path / sub / "adapter_config.json").is_file():
                hint = f" (did you mean {path / sub}?)"
        raise BulwarkInputError(
            f"model {path}: not a model folder (no config.json or adapter_config.json){hint}; "
            "give the folder a run exported, holding config.json (full model) or adapter_config.json (LoRA)"
        )
    return path


def load_for_generation(model_path: str | Path, dtype: str = "auto") -> tuple[Any, Any]:
    """(model in eval mode on this rank's device in `dtype` (auto: bf16 on GPU, fp32 on CPU),
    tokenizer with left padding)."""
    from bulwark.models import base_of, is_adapter_dir, load_model, load_tokenizer

    dtype = resolve_dtype(dtype)
    checked = check_model_path(model_path)
    name = str(checked)
    if is_adapter_dir(name):
        from peft import PeftModel

        base = base_of(name)
        model = PeftModel.from_pretrained(load_model(base, dtype), name)
        has_tokenizer = any(Path(name, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = load_tokenizer(name if has_tokenizer else base)
    else:
        model = load_model(name, dtype)
        tokenizer = load_tokenizer(name)
    return model.to(local_device()).eval(), _left_padded(tokenizer)


def _left_padded(tokenizer: Any) -> Any:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_partitioned_for_generation(model_path: str | Path, dtype: str = "auto") -> tuple[Any, Any, Any]:
    """(ZeRO-3 partitioned model in eval mode, tokenizer with left padding, its decoder layers).

    Needs the engine's process group (init_from_env("zero3")); every rank must call it.
    """
    from bulwark.engine.partitioned import load_partitioned
    from bulwark.models import is_adapter_dir, load_tokenizer

    dtype = resolve_dtype(dtype)
    checked = check_model_path(model_path)
    if is_adapter_dir(str(checked)):
        raise BulwarkInputError(
            f"model {checked}: a LoRA adapter folder; --zero3 (partition: zero3) loads a full model folder: "
            "evaluate the run's merged export (config.json), or drop --zero3 if base + adapter fit one GPU"
        )
    model = load_partitioned(str(checked), dtype).eval()
    return model, _left_padded(load_tokenizer(str(checked))), decoder_layers(model)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the longest ModuleList (config.num_hidden_layers long)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    exact = [m for m in lists if len(m) == n_layers]
    found = (exact or sorted(lists, key=len, reverse=True))[:1]
    if not found:
        raise BulwarkInputError(f"{type(model).__name__}: no decoder layer stack (ModuleList) found to gather by")
    return found[0]


# ---- generation -------------------------------------------------------------------------------------


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    # Rendered prompts already spell out their special tokens (chat templates); add a BOS only when the
    # tokenizer says it wants one and the text does not start with it (same rule as training).
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) and bos is not None and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int | list[int] = 128,
             batch_size: int = GENERATE_BATCH_SIZE, max_prompt_tokens: int = 1024,
             on_batch: Callable[[int], None] | None = None, *, min_batches: int = 0,
             synced: bool = False) -> list[str]:
    """Greedy completions of already-rendered prompts, in input order.

    `max_new_tokens` is one budget for all prompts or one per prompt (a label word needs a few tokens,
    a refusal check a sentence). Prompts are batched by budget, then length (less padding),
    left-padded, and cut to their last `max_prompt_tokens` tokens. `on_batch(n)` is called after each
    batch of n prompts.

    ZeRO-3 (`synced=True`): generate() keeps this rank stepping until every rank's batch is done, and
    throw-away one-token batches are run until `min_batches` generate() calls were made, so that every
    rank makes the same number of calls whatever its share.
    """
    # inference_mode tensors must not become the storage of a ZeRO-3 gathered parameter (DeepSpeed
    # writes into it again on release): no_grad there.
    with (torch.no_grad() if synced else torch.inference_mode()):
        return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, max_prompt_tokens, on_batch,
                         min_batches, synced)


def _generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int | list[int], batch_size: int,
              max_prompt_tokens: int, on_batch: Callable[[int], None] | None, min_batches: int,
              synced: bool) -> list[str]:
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} max_new_tokens budgets for {len(prompts)} prompts")
    if (budgets and min(budgets) < 1) or batch_size < 1:
        raise BulwarkInputError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1")
    ids = [_prompt_ids(tokenizer, p)[-max_prompt_tokens:] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: (budgets[i], len(ids[i])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    sync = {"synced_gpus": True} if synced else {}
    calls = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        budget = max(budgets[i] for i in chunk)
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            attention[row, width - len(ids[i]) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=pad,
            **sync,
        )
        calls += 1
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for i, text in zip(chunk, texts, strict=True):
            outputs[i] = text.strip()
        if on_batch is not None:
            on_batch(len(chunk))
    filler = torch.full((1, 1), pad, dtype=torch.long, device=device)
    while calls < min_batches:  # only partitioned ranks with a short share get here; the output is dropped
        model.generate(input_ids=filler, attention_mask=torch.ones_like(filler), max_new_tokens=1,
                       do_sample=False, pad_token_id=pad, **sync)
        calls += 1
    return outputs


def generate_sharded(
    model_path: str | Path,
    items: list[dict],
    render: Callable[[dict, Any], str],
    out_file: Path,
    *,
    max_new_tokens: int = 128,
    batch_size: int = GENERATE_BATCH_SIZE,
    dtype: str = "auto",
    partition: str = "none",
    log: Callable[[str], None] | None = None,
) -> list[dict] | None:
    """Generate an output for every item across the ranks; rank 0 returns the merged rows, others None.

    Each row is the item plus "index" (its position in `items`), "rendered" (the prompt text the model
    saw) and "output". `render(item, tokenizer)` builds the prompt text. An item's own "max_new_tokens"
    overrides the budget. Rank files go next to `out_file`. `dtype`: auto | fp32 | bf16; `partition`:
    none | zero3 (see the module doc).
    """
    partition = check_partition(partition)
    dtype = resolve_dtype(dtype)
    if batch_size < 1:
        raise BulwarkInputError(f"batch_size ({batch_size}) must be at least 1")
    rank, world = init_from_env("zero3") if partition == "zero3" else dist_info()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(items), world))
    if partition == "zero3":
        model, tokenizer, layers = load_partitioned_for_generation(model_path, dtype)
    else:
        model, tokenizer = load_for_generation(model_path, dtype)
    rendered = [render(items[i], tokenizer) for i in mine]
    done, started = 0, time.time()

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if log is not None and rank == 0:
            rate = done / max(1e-9, time.time() - started)
            log(f"generate: rank 0 {done}/{len(mine)} prompts ({rate:.2f}/s, world {world})")

    budgets = [int(items[i].get("max_new_tokens") or max_new_tokens) for i in mine]
    if partition == "zero3":
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from bulwark.engine.partitioned import gathered_per_module

        # rank 0 holds the largest share (prompts r::world): its batch count is every rank's
        n_batches = math.ceil(math.ceil(len(items) / world) / batch_size)
        with gathered_per_module(model, layers):
            outputs = generate(model, tokenizer, rendered, budgets, batch_size, on_batch=progress,
                               min_batches=n_batches, synced=True)
        # Without this, a judge loaded later by from_pretrained on rank 0 alone would be built under
        # zero.Init (a collective the other ranks never join).
        unset_hf_deepspeed_config()
    else:
        outputs = generate(model, tokenizer, rendered, budgets, batch_size, on_batch=progress)
    rows = [{"index": i, **items[i], "rendered": text, "output": output}
            for i, text, output in zip(mine, rendered, outputs, strict=True)]
    atomic_write_jsonl(out_file.parent / RANK_FILE.format(rank=rank), rows)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # rank 0 loads the judges next, on the same GPU
    if world > 1:
        # the only collective of a plain eval: every rank reaches it exactly once. Under NCCL the
        # engine set this rank's current device, which the barrier runs on.
        torch.distributed.barrier()
    if rank != 0:
        return None
    merged = merge_rank_files(out_file.parent, world, len(items))
    atomic_write_jsonl(out_file, merged)
    return merged


def merge_rank_files(folder: Path, world: int, n_items: int) -> list[dict]:
    """Rows of rows.rank{0..world-1}.jsonl ordered by index; exactly one row per index 0..n_items-1."""
    rows: dict[int, dict] = {}
    for rank in range(world):
        path = folder / RANK_FILE.format(rank=rank)
        if not path.is_file():
            raise RuntimeError(f"{path} is missing: rank {rank} did not finish its share")
        for row in read_jsonl(path):
            if row["index"] in rows:
                raise RuntimeError(f"prompt {row['index']} was generated twice (second time in {path})")
            rows[row["index"]] = row
    missing = [i for i in range(n_items) if i not in rows]
    if missing or len(rows) != n_items:
        raise RuntimeError(f"merged {len(rows)} rows for {n_items} prompts; missing indices {missing[:10]}")
    return [rows[i] for i in range(n_items)]


def main(argv: list[str] | None = None) -> None:
    """Plain generation: `python -m bulwark.eval.generate MODEL PROMPTS.jsonl OUT.jsonl` (or under torchrun)."""
    import argparse

    parser = argparse.ArgumentParser(prog="bulwark.eval.generate", description=main.__doc__)
    parser.add_argument("model")
    parser.add_argument("prompts", help="JSONL with a 'prompt' key per row")
    parser.add_argument("out")
    parser.add_argument("--template", default="chat")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=GENERATE_BATCH_SIZE)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16")
    parser.add_argument("--partition", default="none", help="none | zero3")
    args = parser.parse_args(argv)
    from bulwark.data.formats import Example
    from bulwark.data.templates import render_prompt

    init_from_env(args.partition)
    try:
        items = [{"prompt": r["prompt"]} for r in read_jsonl(Path(args.prompts))]
        generate_sharded(args.model, items, lambda it, tok: render_prompt(Example(it["prompt"], ""), args.template, tok),
                         Path(args.out), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         dtype=args.dtype, partition=args.partition,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        shutdown()


if __name__ == "__main__":
    main()

