"""Antidote: one-shot pruning of the weights that carry harmful behaviour after fine-tuning (Huang et al.,
"Antidote: Post-fine-tuning Safety Alignment for Large Language Models against Harmful Fine-tuning",
ICML 2025, arXiv 2408.09600), written anew from the paper and the idea of the reference code
(git-disl/Antidote).

The fine-tuned model B is run, unchanged, over a small harmful calibration set (prompt + harmful answer).
For every target linear layer y = W x (W: out x in) and every input feature j, X_j is the vector of that
feature's values over all real calibration tokens (padding excluded). The Wanda-style importance of each
weight element is

    S_ij = |W_ij| * ||X_j||_2

and, in every output row i of every target weight, the k = in - floor(in * (1 - sparsity)) elements with
the largest S_ij (the reference's count; ceil(sparsity * in) up to float rounding) are set to zero: they
are the weights that matter most to producing harmful answers. Ties: a row's scores are sorted ascending
with a stable sort and the last k go, so among equal scores the higher input index is pruned first (as
the reference's stable sort does). No weight is zeroed while the activations are collected: every layer
sees B's own activations (the reference computes all masks before applying any).

Why per row and why q/k/v: the reference ranks within each output row (Wanda's comparison group), not per
layer or over the model, and with a full fine-tuned model prunes q_proj, k_proj and v_proj (its LoRA branch
prunes the fine-tuning adapter's lora_A / lora_B instead; here a LoRA input is merged onto its base first
and the merged weights are pruned). `antidote.target_modules` changes the set.

Calibration set: `antidote.calibration` (default `beavertails_harmful`, the first `calibration_n` rows), not
`data.harmful`. The score needs the harmful *answers* (the reference feeds prompt + harmful response + EOS,
and every token counts), while `data.harmful` is read by other methods for its prompts only and defaults to
`beavertails_refusals`, whose answers are refusals: calibrating on those would find, and prune, the weights
that refuse. Rows are rendered with `data.template` and tokenized as training does
(bulwark.data.tokenize_example: prompt + response + EOS, at most `data.max_length` tokens); a row without an
answer is an error.

Ranks (`bulwark recover launch.nproc=N`, B partitioned by ZeRO-3): the calibration micro-batches (fixed
composition, shortest rows first) are split across ranks (batch b on rank b % world). Decoder layers run one
at a time, each gathered once (hidden.py's pattern); for every target module each rank writes the
per-batch sums of x_j^2 of its batches into a (batches x in) float64 table, zeros elsewhere, and one
all-reduce per decoder layer fills the table on every rank. Adding zeros is exact, and the table is then
summed over batches in batch order, so ||X_j||^2 is bit-identical at every world size. Each target weight
has one owner rank (weight index % world); the owner alone reads it from B's safetensors (one weight at a
time), scores it, selects its row-wise top-k and writes the mask, bit-packed, to the run folder
(`antidote_masks/`, removed at the end; the ranks share the run folder, as finetuned_merged/ already
needs); rank 0 then writes model/ tensor by tensor, zeroing the masked elements. So per rank: its ZeRO-3
slice of B during the calibration, then one weight and its scores. Owners hold whole weights rather than
ZeRO-3 slices because the comparison group is a row and a ZeRO-3 slice of the flattened weight cuts rows:
with whole rows on one rank the top-k is exact and local, and no cross-rank top-k (restore.py's) is needed.

Device: activations, the norm tables and the scores live on the weights' device (hidden.weights_device;
the GPU when the model is there); collectives go through bulwark.engine; masks come to the CPU to be
packed and written.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bulwark.errors import BulwarkInputError
from bulwark.recover.base import Method, RecoverRun, register

MASK_DIR = "antidote_masks"


@dataclass
class AntidoteConfig:
    sparsity: float = 0.1  # share of each output row of every target weight set to zero (reference: 0.1)
    calibration: str = "beavertails_harmful"  # prompt + harmful answer rows (qa); not data.harmful, see above
    calibration_format: str | None = None  # a bulwark.data format; None = guessed from the name
    calibration_n: int = 128  # the first N rows (the reference uses 2000)
    micro_batch_size: int = 8  # rows per forward (fixed composition: results do not depend on ranks)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])

    def check(self) -> None:
        checks = [
            (0.0 < self.sparsity < 1.0, f"antidote.sparsity = {self.sparsity} must be in (0, 1)"),
            (self.calibration_n >= 1, f"antidote.calibration_n = {self.calibration_n} must be at least 1"),
            (self.micro_batch_size >= 1, f"antidote.micro_batch_size = {self.micro_batch_size} must be at least 1"),
            (bool(self.target_modules) and all(isinstance(t, str) and t for t in self.target_modules),
             "antidote.target_modules must be a non-empty list of module names (e.g. [q_proj, k_proj, v_proj])"),
        ]
        for ok, message in checks:
            if not ok:
                raise BulwarkInputError(message)


# ---- the score and the selection (plain tensors, any device) ---------------------------------------------


def pruned_per_row(in_features: int, sparsity: float) -> int:
    """Elements zeroed in each output row: all but floor(in * (1 - sparsity)), as the reference counts."""
    return in_features - int(in_features * (1.0 - sparsity))


def scores(weight: torch.Tensor, norm_sq: torch.Tensor) -> torch.Tensor:
    """S = |W| * ||X_j||_2 (float64, out x in) from W and the per-input-feature sums of squares."""
    return weight.double().abs() * norm_sq.double().sqrt().to(weight.device).unsqueeze(0)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True at the pruned elements: per row, the last k after a stable ascending sort of the scores."""
    keep = score.shape[1] - pruned_per_row(score.shape[1], sparsity)
    order = torch.sort(score, dim=1, stable=True).indices
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    mask.scatter_(1, order[:, keep:], True)
    return mask


# ---- which weights ------------------------------------------------------------------------------------


def target_linears(model: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Linear]:
    """{weight name: module} of the decoder layers' linear layers named in `targets`, in model order."""
    from bulwark.recover.hidden import decoder_layers

    prefix, layers = decoder_layers(model)
    found: dict[str, torch.nn.Linear] = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                found[f"{prefix}.{i}.{name}.weight"] = module
    return found


def _stored_targets(folder: Path, targets: list[str]) -> list[str]:
    from bulwark.recover.checkpoints import TensorStore

    store = TensorStore(folder, "fine-tuned model")
    out = []
    for name in store.names():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in targets and len(store.shape(name)) == 2:
            out.append(name)
    return out


# ---- the calibration set --------------------------------------------------------------------------------


def calibration_rows(cfg: Any, data_dir: str | Path | None) -> list[Any]:
    """The first `calibration_n` rows of `antidote.calibration`; each must hold an answer."""
    from bulwark.recover.task import load_rows

    settings = cfg.settings["antidote"]
    rows = load_rows(settings.calibration, settings.calibration_n, data_dir, "antidote.calibration",
                     settings.calibration_format)
    unanswered = sum(1 for r in rows if not r.response.strip())
    if unanswered:
        raise BulwarkInputError(
            f"antidote.calibration: {unanswered} of the first {len(rows)} rows of {settings.calibration} have no "
            "answer; Antidote calibrates on prompt + harmful answer rows (e.g. beavertails_harmful)")
    return rows


def calibration_batches(cfg: Any, tokenizer: Any, data_dir: str | Path | None) -> list[Any]:
    """Right-padded micro-batches of prompt + answer + EOS token ids, shortest rows first (less padding)."""
    from bulwark.data import tokenize_example
    from bulwark.recover.hidden import make_batches

    settings = cfg.settings["antidote"]
    ids = [tokenize_example(r, tokenizer, cfg.data.template, cfg.data.max_length)["input_ids"]
           for r in calibration_rows(cfg, data_dir)]
    ids.sort(key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return make_batches(ids, pad, settings.micro_batch_size)


# ---- activation norms --------------------------------------------------------------------------------


@contextmanager
def _input_hooks(linears: dict[str, torch.nn.Linear], state: dict[str, Any]) -> Iterator[None]:
    """Pre-hooks that add each target's per-feature sum of x^2 over real tokens into its table row.

    `state` holds the current batch's token mask and index, set by the caller before each layer call.
    q/k/v share one input tensor: its sums are computed once and reused."""
    last: list[Any] = [None, None]

    def hook_for(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if last[0] is not x:
                keep = state["mask"].to(x.device, torch.float64).unsqueeze(-1)
                last[0], last[1] = x, (x.double().square() * keep).sum(dim=(0, 1))
            state["tables"][name][state["index"]] += last[1]
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in linears.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        last[0] = last[1] = None


@torch.no_grad()
def input_norms_sq(model: torch.nn.Module, batches: list[Any], linears: dict[str, torch.nn.Linear],
                   rank: int = 0, world: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    """({weight name: sum over every rank's real calibration tokens of x_j^2, float64}, tokens).

    `batches` is the whole calibration set (every rank passes the same list); this rank runs batches
    rank, rank + world, ... Layer by layer, one gather per layer on every rank whatever its share."""
    from bulwark.engine import all_reduce_sum
    from bulwark.engine.partitioned import gathered
    from bulwark.recover.hidden import LayerwiseModel, decoder_layers, weights_device

    device = weights_device(model)
    depth = len(decoder_layers(model)[1])
    runner = LayerwiseModel(model, depth, depth)  # only its embedding step and layer list are used
    mine = list(range(rank, len(batches), world))
    local = [batches[b].to(device) for b in mine]
    tokens = all_reduce_sum(torch.tensor([float(sum(int(b.attention_mask.sum()) for b in local))],
                                         dtype=torch.float64, device=device))
    with gathered(runner.outer_params):  # hidden.py's embedding step, reused: inputs of decoder layer 0
        starts = [runner._layer_inputs(batch) for batch in local]
    hiddens = [hidden for hidden, _, _ in starts]
    by_layer: dict[int, dict[str, torch.nn.Linear]] = {}
    layer_of = {id(m): i for i, layer in enumerate(runner.layers) for m in layer.modules()}
    for name, module in linears.items():
        by_layer.setdefault(layer_of[id(module)], {})[name] = module
    norms: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(runner.layers):
        wanted = by_layer.get(i, {})
        tables = {name: torch.zeros(len(batches), m.in_features, dtype=torch.float64, device=device)
                  for name, m in wanted.items()}
        state: dict[str, Any] = {"tables": tables}
        with gathered(list(layer.parameters())), _input_hooks(wanted, state):
            for j, (batch, (_, args, kwargs)) in enumerate(zip(local, starts, strict=True)):
                state["mask"], state["index"] = batch.attention_mask, mine[j]
                out = layer(hiddens[j], *args, **kwargs)
                hiddens[j] = out[0] if isinstance(out, tuple) else out
        if tables:  # one collective per layer that has targets; every rank has the same layers
            flat = all_reduce_sum(torch.cat([t.flatten() for t in tables.values()]))
            start = 0
            for name, t in tables.items():
                full = flat[start : start + t.numel()].view_as(t)
                start += t.numel()
                norms[name] = full.sum(dim=0)  # in batch order: the same sum at every world size
    return norms, int(tokens.item())


# ---- masks: computed by each weight's owner, read by rank 0 -----------------------------------------------


def _mask_file(out: Path, name: str) -> Path:
    return out / MASK_DIR / f"{name}.npy"


def write_masks(out: Path, store: Any, norms: dict[str, torch.Tensor], names: list[str], sparsity: float,
                rank: int, world: int, device: torch.device) -> None:
    """Score, select and save (bit-packed) the mask of every weight this rank owns, one at a time."""
    (out / MASK_DIR).mkdir(parents=True, exist_ok=True)
    for j, name in enumerate(names):
        if j % world != rank:
            continue
        weight = store.get(name).to(device)
        if weight.dim() != 2 or weight.shape[1] != norms[name].numel():
            raise BulwarkInputError(f"{name}: shape {list(weight.shape)} in {store.folder} does not match the "
                                    f"model's {norms[name].numel()} input features")
        mask = row_mask(scores(weight, norms[name]), sparsity)
        target = _mask_file(out, name)
        tmp = target.with_name(target.name + ".tmp.npy")
        np.save(tmp, np.packbits(mask.flatten().cpu().numpy()))
        tmp.replace(target)
        del weight, mask


def read_mask(out: Path, name: str, numel: int) -> torch.Tensor:
    packed = np.load(_mask_file(out, name))
    return torch.from_numpy(np.unpackbits(packed, count=numel).astype(bool))


# ---- the method as `bulwark recover` runs it ---------------------------------------------------------------


def _tokenizer_folder(inputs: Any) -> Path:
    from bulwark.models import is_adapter_dir

    if not is_adapter_dir(inputs.finetuned):
        return inputs.finetuned
    if (inputs.finetuned / "tokenizer_config.json").is_file():
        return inputs.finetuned
    return inputs.finetuned_base


def check_antidote_inputs(cfg: Any, inputs: Any) -> None:
    """Before any rank: the calibration rows (with answers, renderable), the target weights, ZeRO-3 JSON."""
    import os

    from bulwark.models import load_tokenizer
    from bulwark.recover.config import use_zero3

    settings = cfg.settings["antidote"]
    calibration_batches(cfg, load_tokenizer(str(_tokenizer_folder(inputs))), inputs.data_dir)
    weights_folder = inputs.finetuned_base or inputs.finetuned  # an adapter's base holds every weight name
    if not _stored_targets(weights_folder, settings.target_modules):
        raise BulwarkInputError(f"antidote.target_modules = {settings.target_modules}: no 2-D weight of that name "
                                f"in {weights_folder}")
    if use_zero3(cfg, int(os.environ.get("WORLD_SIZE", cfg.launch.nproc))):
        from bulwark.engine.partitioned import zero3_config

        zero3_config(cfg.launch.ds_config, cfg.dtype, 1)


def run_antidote(run: RecoverRun) -> dict[str, Any] | None:
    """Every rank: calibration norms on B (split over ranks), owned masks, rank 0 writes the pruned model."""
    from bulwark.engine import barrier
    from bulwark.engine.dist import device
    from bulwark.models import load_tokenizer
    from bulwark.recover.checkpoints import TensorStore, write_model

    cfg, settings = run.cfg, run.settings
    started = time.perf_counter()
    finetuned = run.finetuned_folder()
    batches = calibration_batches(cfg, load_tokenizer(str(finetuned)), run.inputs.data_dir)
    model = run.load(finetuned)
    linears = target_linears(model, settings.target_modules)
    if not linears:
        raise BulwarkInputError(f"antidote.target_modules = {settings.target_modules}: no linear layer of that "
                                f"name in the decoder layers of {finetuned}")
    names = list(linears)
    norms, tokens = input_norms_sq(model, batches, linears, run.rank, run.world)
    rows = sum(int(b.input_ids.shape[0]) for b in batches)
    run.log({"event": "calibration", "rows": rows, "batches": len(batches), "tokens": tokens,
             "weights": len(names), "seconds": round(time.perf_counter() - started, 3)})
    del model, linears  # B's slices go back before the weights are scored
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    store = TensorStore(finetuned, "fine-tuned model")
    write_masks(run.out, store, norms, names, settings.sparsity, run.rank, run.world, device())
    barrier()  # every owner's masks are on disk before rank 0 reads them
    if run.rank != 0:
        return None
    counts: dict[str, int] = {}

    def pruned(name: str, weight: torch.Tensor) -> torch.Tensor:
        if name not in norms:
            return weight
        mask = read_mask(run.out, name, weight.numel())
        counts[name] = int(mask.sum())
        run.log({"event": "weight", "name": name, "pruned": counts[name], "elements": weight.numel()})
        return weight.flatten().masked_fill(mask, 0).view_as(weight)

    write_model(finetuned, run.out / "model", pruned)
    shutil.rmtree(run.out / MASK_DIR, ignore_errors=True)
    elements = sum(int(np.prod(store.shape(n))) for n in names)
    return {"method": "antidote", "aligned": str(run.inputs.aligned), "finetuned": str(run.inputs.finetuned),
            "input": "lora" if run.inputs.finetuned_base is not None else "full",
            "sparsity": settings.sparsity, "calibration": settings.calibration, "calibration_rows": rows,
            "calibration_tokens": tokens, "target_modules": list(settings.target_modules), "weights": len(names),
            "elements": elements, "pruned_elements": sum(counts.values()), "zero3": run.zero3}


register(Method(
    name="antidote",
    Config=AntidoteConfig,
    run=run_antidote,
    summary="zero the weights most important to harmful answers, by |W| x input-activation norm on a harmful "
            "calibration set (Antidote, one-shot Wanda-style pruning)",
    check=check_antidote_inputs,
))
