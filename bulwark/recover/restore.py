"""Gradient-ranked restore with rollback ("Alleviating the Fear of Losing Alignment", written anew).

A is the aligned model, B the fine-tuned one, W the model being repaired (it starts as B). Every element
of W is at all times either B's value or A's value, so the whole state is one boolean mask per weight:
"restored" (W = A there) or not (W = B).

Restore step. The loss is -cos(mean last-token hidden state of W after layer L on the harmful recovery
prompts, d_harm), where d_harm is the same mean for A. Its gradient G is summed over the steps of a run.
Gradient descent moves an element by -lr * G; that moves W toward A exactly where W - A and G have the
same sign (W above A and G > 0: descent lowers W; W below A and G < 0: descent raises it). So the
candidates are the elements with sign(W - A) == sign(G), both nonzero, and the k with the largest |G|
(k = fraction * number of weights in the chosen layers) are set to A's values: the full step to A.

Rollback. After `warmup_steps` steps the task is scored; below (1 - max_drop) * B's score, the run
starts over from B and every restore is followed by a rollback: under the loss -cos(mean hidden state of
W on task prompts, d_benign) (d_benign: the same mean for B), among the elements restored in this step
those where sign(W - B) == sign(gradient) are ranked by |gradient|, and the top rollback_fraction of them
go back to B's values. The rollback gradient is fresh each step (not summed).

Checkpoints every `checkpoint_every` steps score the task; the result is the last checkpoint whose score
is at or above the floor (none: B unchanged).

Ranks: the prompts' micro-batches are split across ranks; each chosen weight has one owner rank
(weight index % world) that keeps its A and B values, summed gradient and mask, so that state shrinks with
the number of ranks. The top-k is exact across ranks: each rank offers its k best, the k-th best overall
is the threshold, and elements tied with it are taken in (weight order, element order), so the selection
is the same at every world size.

Device: the owned state (A and B values, sign masks, gradient sums, restored masks), the scores and every
counter live on the device the weights live on (`hidden.weights_device`: the GPU when the model is there);
collectives go through bulwark.engine's helpers, which stage on the process group's device. Tensors leave
the device only to be pickled for another rank (`broadcast_object`) and as the final restored indices,
which go to the model writer on the CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bulwark.engine import all_gather_cat, all_reduce_sum, broadcast_object, reduce_sum_to
from bulwark.engine.partitioned import full_numel, set_elements
from bulwark.errors import BulwarkInputError
from bulwark.recover.base import LogFn, Method, TaskMetric, register, world
from bulwark.recover.checkpoints import TensorStore
from bulwark.recover.hidden import Batch, LayerwiseModel, count_rows, local_batches, weights_device


@dataclass
class RestoreConfig:
    layer: int = 0  # L: hidden state after decoder layer L (1-based); 0 = round(2/3 * depth)
    layers_from: int = 0  # restore weights of decoder layers [layers_from, layers_to)
    layers_to: int = 0  # 0 = L (layers above L get no gradient from a loss at layer L)
    fraction: float = 0.002  # elements restored per step, as a fraction of the weights in those layers
    steps: int = 20
    warmup_steps: int = 5  # steps before the first task check
    checkpoint_every: int = 5  # task check (and HS when eval is on) every N steps
    max_drop: float = 0.05  # floor = (1 - max_drop) * B's task score
    rollback: bool = True  # restart with rollback when the warm-up result falls below the floor
    rollback_fraction: float = 0.2  # share of the just-restored elements rolled back per step
    micro_batch_size: int = 8  # prompts per forward pass (fixed composition: results do not depend on ranks)
    skip_norms: bool = True  # norm weights are never restored (as in the reference)

    def check(self) -> None:
        checks = [
            (self.layer >= 0, f"restore.layer = {self.layer} must be >= 0 (0 = two thirds of the depth)"),
            (self.layers_from >= 0 and self.layers_to >= 0, "restore.layers_from / layers_to must be >= 0"),
            (0.0 < self.fraction <= 1.0, f"restore.fraction = {self.fraction} must be in (0, 1]"),
            (self.steps >= 1, f"restore.steps = {self.steps} must be at least 1"),
            (1 <= self.warmup_steps <= self.steps, f"restore.warmup_steps = {self.warmup_steps} must be in [1, steps]"),
            (self.checkpoint_every >= 1, f"restore.checkpoint_every = {self.checkpoint_every} must be at least 1"),
            (0.0 <= self.max_drop < 1.0, f"restore.max_drop = {self.max_drop} must be in [0, 1)"),
            (0.0 < self.rollback_fraction <= 1.0,
             f"restore.rollback_fraction = {self.rollback_fraction} must be in (0, 1]"),
            (self.micro_batch_size >= 1, "restore.micro_batch_size must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise BulwarkInputError(message)



def default_layer(depth: int) -> int:
    """Two thirds of the depth, at least 1."""
    return max(1, round(2 * depth / 3))


def chosen_weights(
    model: torch.nn.Module, cfg: RestoreConfig
) -> tuple[int, int, list[tuple[int, str, torch.nn.Parameter]]]:
    """(L, lowest layer, [(layer index, name, parameter)]) of the weights a restore may change."""
    from bulwark.recover.hidden import decoder_layers

    prefix, layers = decoder_layers(model)
    depth = len(layers)
    layer = cfg.layer or default_layer(depth)
    top = cfg.layers_to or layer
    if not 1 <= layer <= depth:
        raise BulwarkInputError(f"restore.layer = {layer} outside 1..{depth} (the model has {depth} decoder layers)")
    if not cfg.layers_from < top <= layer:
        raise BulwarkInputError(
            f"restore layers [{cfg.layers_from}, {top}) must be non-empty and end at or below restore.layer = "
            f"{layer} (weights above layer L get no gradient)"
        )
    chosen = []
    for i in range(cfg.layers_from, top):
        for name, param in layers[i].named_parameters():
            if cfg.skip_norms and "norm" in name:
                continue
            chosen.append((i, f"{prefix}.{i}.{name}", param))
    return layer, cfg.layers_from, chosen


def cosine_seed(mean: torch.Tensor, direction: torch.Tensor, rows: int) -> tuple[float, torch.Tensor]:
    """(cos(mean, direction), d(-cos)/d(one row's hidden state)) for a mean over `rows` rows."""
    m = mean.detach().clone().requires_grad_(True)
    loss = -torch.nn.functional.cosine_similarity(m, direction.to(m.device, torch.float64), dim=0)
    loss.backward()
    return -loss.item(), m.grad / rows


# ---- distributed helpers -------------------------------------------------------------------------------


def _for_pickle(edits: dict[str, Any]) -> dict[str, Any]:
    """`edits` with every tensor on the CPU: a pickled CUDA tensor would unpickle onto the sender's GPU on
    the receiving rank."""
    return {name: tuple(t.cpu() for t in v) if isinstance(v, tuple) else v.cpu() for name, v in edits.items()}


# ---- state ----------------------------------------------------------------------------------------------


@dataclass
class Owned:
    """The restore state of one weight, on its owner rank (flat views)."""

    param: torch.nn.Parameter
    a: torch.Tensor
    b: torch.Tensor
    b_above_a: torch.Tensor  # bool; with b_below_a: sign(B - A), computed once
    b_below_a: torch.Tensor
    grad: torch.Tensor  # float64, summed over the steps of the current run
    restored: torch.Tensor  # bool: W = A here


@dataclass
class RestoreResult:
    kept_step: int  # the checkpoint whose masks were kept (0: none; the model is B)
    score_b: float
    floor: float
    rolled_back: bool  # the run restarted with rollback
    restored: dict[str, torch.Tensor] = field(default_factory=dict)  # on rank 0: name -> restored indices
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


class Restorer:
    def __init__(
        self,
        model: torch.nn.Module,
        aligned: TensorStore,
        finetuned: TensorStore,
        cfg: RestoreConfig,
        log: LogFn | None = None,
    ) -> None:
        self.model, self.cfg = model, cfg
        self.log = log or (lambda row: None)
        self.rank, self.world = world()
        self.layer, self.lowest, chosen = chosen_weights(model, cfg)
        self.runner = LayerwiseModel(model, self.layer, self.lowest)
        self.device = weights_device(model)
        self.names = [name for _, name, _ in chosen]
        self.params = {name: p for _, name, p in chosen}
        self.by_layer: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
        for i, name, p in chosen:
            self.by_layer.setdefault(i, []).append((name, p))
        self.owner = {name: j % self.world for j, name in enumerate(self.names)}
        self.total = sum(full_numel(p) for p in self.params.values())
        self.k = max(1, math.ceil(cfg.fraction * self.total))
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self.owned: dict[str, Owned] = {}
        self.changed = 0  # elements restored now, all ranks; kept by _apply (counting the masks cost a pass a step)
        for name in self.names:
            if self.owner[name] != self.rank:
                continue
            a = aligned.get(name).to(self.device).float().flatten()
            b = finetuned.get(name).to(self.device).float().flatten()
            if a.numel() != full_numel(self.params[name]):
                raise ValueError(f"{name}: {a.numel()} elements in the aligned model, model has "
                                 f"{full_numel(self.params[name])}")
            self.owned[name] = Owned(self.params[name], a, b, b > a, b < a,
                                     torch.zeros(a.numel(), dtype=torch.float64, device=self.device),
                                     torch.zeros(a.numel(), dtype=torch.bool, device=self.device))

    # ---- gradients ---------------------------------------------------------------------------------

    def direction(self, batches: list[Batch]) -> torch.Tensor:
        """The mean last-token hidden state after layer L of the current model (float64)."""
        _, mean = self.runner.mean_last_hidden(local_batches(batches, self.rank, self.world), count_rows(batches))
        return mean

    def gradient(self, batches: list[Batch], direction: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        """(cos, {owned weight: flat float64 gradient of -cos(mean hidden state, direction), all ranks summed})."""
        rows = count_rows(batches)
        passes, mean = self.runner.mean_last_hidden(local_batches(batches, self.rank, self.world), rows)
        cos, seed = cosine_seed(mean, direction, rows)
        out: dict[str, torch.Tensor] = {}
        for _, sums in self.runner.weight_grads(passes, seed, self.by_layer):
            for name, grad in sums.items():  # one weight at a time to its owner
                reduce_sum_to(grad, self.owner[name])
                if name in self.owned:
                    out[name] = grad.flatten()
        return cos, out

    # ---- selection ---------------------------------------------------------------------------------

    def _local_top(self, scores: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """The k largest candidate scores (>= 0) of this rank's weights, descending, ties kept.

        Scores below the k-th best seen so far are dropped before they are merged, and merges wait until
        4k values are pooled: most weights only cost one comparison pass (a running top-k over every
        weight merged k + |weight| values per weight; on SmolLM2's 70.8 M weights that took 1.7 s a step).
        """
        pool: list[torch.Tensor] = []
        pooled, floor = 0, 0.0
        for name in self.names:
            if name not in scores:
                continue
            kept = scores[name][scores[name] >= floor]  # >=: values tied with the k-th must all be offered
            pool.append(kept)
            pooled += kept.numel()
            if pooled >= 4 * k:
                best = torch.topk(torch.cat(pool), k).values
                pool, pooled, floor = [best], k, float(best[-1])
        merged = torch.cat(pool) if pool else torch.empty(0, dtype=torch.float64, device=self.device)
        return torch.topk(merged, min(k, merged.numel())).values

    def top_k(self, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """The k largest scores over every rank's owned weights (score < 0: not a candidate).

        Exact and rank-independent: ties with the k-th value go to the earliest weight, then element.
        Returns {owned name: flat indices}.
        """
        best = self._local_top(scores, k)
        n_local = torch.zeros(1, dtype=torch.float64, device=self.device)
        for s in scores.values():  # summed on the device: one host sync below, not one per weight
            n_local += (s >= 0).sum()
        offered = torch.full((k,), -1.0, dtype=torch.float64, device=self.device)
        offered[: best.numel()] = best
        n_candidates = all_reduce_sum(n_local)
        if n_candidates.item() <= k:  # k or fewer candidates in all: take them all
            return {n: torch.nonzero(s >= 0).flatten() for n, s in scores.items()}
        threshold = torch.topk(all_gather_cat(offered), k).values[-1]
        hits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (indices above, indices tied)
        local_counts = [[0, 0] for _ in self.names]
        for j, name in enumerate(self.names):
            if name in scores:  # one pass over the weight; the rest works on the few hits
                idx = torch.nonzero(scores[name] >= threshold).flatten()
                values = scores[name][idx]
                hits[name] = (idx[values > threshold], idx[values == threshold])
                local_counts[j] = [hits[name][0].numel(), hits[name][1].numel()]
        # one copy to the device and, after the reduce, one back: the tie walk below reads Python numbers
        counts = all_reduce_sum(torch.tensor(local_counts, dtype=torch.float64, device=self.device)).cpu()
        ties_left = k - int(counts[:, 0].sum())
        chosen: dict[str, torch.Tensor] = {}
        for j, name in enumerate(self.names):
            take = min(int(counts[j, 1]), max(ties_left, 0))
            ties_left -= take
            if name not in hits:
                continue
            above, tied = hits[name]
            chosen[name] = torch.sort(torch.cat([above, tied[:take]])).values
        return chosen

    # ---- edits -------------------------------------------------------------------------------------

    def _apply(self, edits: dict[str, torch.Tensor], to_a: bool) -> dict[str, int]:
        """Set the given owned elements to A (to_a) or B; every rank applies every rank's edits.

        Returns {name: count} over all ranks.
        """
        mine = {}
        for name, idx in edits.items():
            own = self.owned[name]
            own.restored[idx] = to_a
            mine[name] = (idx, (own.a if to_a else own.b)[idx])
        everything: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for src in range(self.world):
            if self.world == 1:
                part = mine
            else:
                part = broadcast_object(_for_pickle(mine) if src == self.rank else None, src)
            everything.update(part)
        counts = {}
        for name in self.names:
            if name not in everything:
                continue
            idx, values = everything[name]
            counts[name] = int(idx.numel())
            if idx.numel() == 0:
                continue
            set_elements(self.params[name], idx, values)
        # exact: restores only pick elements not restored, rollbacks and resets only restored ones
        self.changed += sum(counts.values()) if to_a else -sum(counts.values())
        return counts

    def restore_step(self, harmful: list[Batch], d_harm: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], dict[str, int]]:
        cos, grads = self.gradient(harmful, d_harm)
        scores = {}
        for name, own in self.owned.items():
            own.grad += grads[name]
            # sign(W - A) == sign(G), both nonzero; W - A is B - A where not restored, 0 where restored
            agree = (own.b_above_a & (own.grad > 0)) | (own.b_below_a & (own.grad < 0))
            agree &= ~own.restored
            scores[name] = torch.where(agree, own.grad.abs(), -1.0)
        picked = self.top_k(scores, self.k)
        return cos, picked, self._apply(picked, to_a=True)

    def rollback_step(self, task: list[Batch], d_benign: torch.Tensor,
                      just_restored: dict[str, torch.Tensor]) -> tuple[float, dict[str, int]]:
        cos, grads = self.gradient(task, d_benign)
        scores, n_candidates = {}, torch.zeros(1, dtype=torch.float64, device=self.device)
        for name, own in self.owned.items():
            score = torch.full_like(own.grad, -1.0)
            idx = just_restored.get(name, torch.empty(0, dtype=torch.long, device=self.device))
            diff = own.a[idx] - own.b[idx]  # W - B where W was just set to A
            g = grads[name][idx]
            agree = (torch.sign(diff) == torch.sign(g)) & (diff != 0)
            score[idx[agree]] = g[agree].abs()
            scores[name] = score
            n_candidates += agree.sum()
        n = int(all_reduce_sum(n_candidates).item())
        if n == 0:
            return cos, {}
        k = math.ceil(self.cfg.rollback_fraction * n)
        return cos, self._apply(self.top_k(scores, k), to_a=False)

    def reset_to_b(self) -> None:
        self._apply({name: torch.nonzero(own.restored).flatten() for name, own in self.owned.items()}, to_a=False)
        for own in self.owned.values():
            own.grad.zero_()

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: own.restored.clone() for name, own in self.owned.items()}

    def gather_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: restored flat indices} of every weight, on every rank, on the CPU (they go to the model
        writer, which edits CPU tensors read from safetensors)."""
        mine = {name: torch.nonzero(m).flatten().cpu() for name, m in masks.items()}
        out: dict[str, torch.Tensor] = {}
        for src in range(self.world):
            out.update(broadcast_object(mine if src == self.rank else None, src) if self.world > 1 else mine)
        return out

    def n_restored(self) -> int:
        return self.changed

    # ---- the schedule ------------------------------------------------------------------------------

    def run(
        self,
        harmful: list[Batch],
        task: list[Batch],
        d_harm: torch.Tensor,
        d_benign: torch.Tensor,
        metric: TaskMetric,
        harm_score: TaskMetric | None = None,
    ) -> RestoreResult:
        cfg = self.cfg
        score_b = metric(self.model)
        floor = (1.0 - cfg.max_drop) * score_b
        result = RestoreResult(kept_step=0, score_b=score_b, floor=floor, rolled_back=False)
        self.log({"event": "start", "task_score": score_b, "floor": floor, "layer": self.layer,
                  "layers": [self.lowest, self.lowest + len(self.by_layer)], "weights": self.total, "k": self.k,
                  "world_size": self.world})
        kept: dict[str, torch.Tensor] | None = None
        rollback = False
        step = 0
        while step < cfg.steps:
            step += 1
            started, cpu_started = time.perf_counter(), time.process_time()
            cos, picked, restored = self.restore_step(harmful, d_harm)
            row: dict[str, Any] = {"event": "step", "step": step, "phase": "rollback" if rollback else "restore",
                                   "cos_harm": cos, "restored": restored, "restored_total": sum(restored.values())}
            if rollback:
                cos_b, rolled = self.rollback_step(task, d_benign, picked)
                row.update({"cos_benign": cos_b, "rolled_back": rolled, "rolled_back_total": sum(rolled.values())})
            row["changed"] = self.n_restored()
            row["seconds"] = round(time.perf_counter() - started, 3)
            row["cpu_seconds"] = round(time.process_time() - cpu_started, 3)  # this process; wall time varies with load
            self.log(row)

            at_warmup = step == cfg.warmup_steps and not rollback
            if not (at_warmup or step % cfg.checkpoint_every == 0 or step == cfg.steps):
                continue
            score = metric(self.model)
            check = {"event": "checkpoint", "step": step, "phase": row["phase"], "task_score": score,
                     "floor": floor, "changed": row["changed"]}
            if harm_score is not None:
                check["harmful_score"] = harm_score(self.model)
            if at_warmup and score < floor and cfg.rollback:
                check["action"] = "restart from B with rollback"
                self.log(check)
                result.checkpoints.append(check)
                self.reset_to_b()
                rollback, result.rolled_back, step, kept = True, True, 0, None
                continue
            check["kept"] = score >= floor
            if check["kept"]:
                kept, result.kept_step = self.snapshot(), step
            self.log(check)
            result.checkpoints.append(check)
        if kept is None:
            kept = {name: torch.zeros_like(own.restored) for name, own in self.owned.items()}
        result.restored = self.gather_masks(kept)
        return result


# ---- the method as `bulwark recover` runs it -------------------------------------------------------------


def check_restore_inputs(cfg: Any, inputs: Any) -> None:
    """The prompt sets and the ZeRO-3 JSON, before any rank starts."""
    import os

    from bulwark.recover.config import use_zero3
    from bulwark.recover.task import check_prompt_sets, metric_kind

    check_prompt_sets(cfg, inputs.data_dir, harmful=True, task=True)
    metric_kind(cfg)
    if use_zero3(cfg, int(os.environ.get("WORLD_SIZE", cfg.launch.nproc))):
        from bulwark.engine.partitioned import zero3_config

        zero3_config(cfg.launch.ds_config, cfg.dtype, 1)  # a missing or non-ZeRO-3 JSON: one line here


def run_restore(run: Any) -> dict[str, Any] | None:
    """Every rank: A's direction, B loaded (partitioned or replicated), the restore, rank 0 writes the model."""
    from bulwark.models import load_tokenizer
    from bulwark.recover.checkpoints import write_model
    from bulwark.recover.task import harm_metric, prompt_set, task_metric

    cfg, settings = run.cfg, run.settings
    finetuned = run.finetuned_folder()
    tokenizer = load_tokenizer(str(finetuned))
    harmful = prompt_set(cfg, "harmful", tokenizer, settings.micro_batch_size, run.inputs.data_dir)
    task = prompt_set(cfg, "task", tokenizer, settings.micro_batch_size, run.inputs.data_dir)
    metric, description = run.metric, "given by the caller"
    if metric is None:
        metric, description = task_metric(cfg, tokenizer, run.inputs.data_dir)
    harm_score = harm_metric(cfg, tokenizer, run.inputs.data_dir)

    # d_harm: A's mean last-token hidden state after layer L on the recovery prompts
    model_a = run.load(run.inputs.aligned)
    layer, lowest, _ = chosen_weights(model_a, settings)
    runner = LayerwiseModel(model_a, layer, lowest)
    _, d_harm = runner.mean_last_hidden(local_batches(harmful, run.rank, run.world), count_rows(harmful))
    del model_a, runner
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # A's memory goes back before B is loaded beside it

    model = run.load(finetuned)
    restorer = Restorer(model, TensorStore(run.inputs.aligned, "aligned model"),
                        TensorStore(finetuned, "fine-tuned model"), settings, run.log)
    d_benign = restorer.direction(task)  # the same for B on the task prompts
    result = restorer.run(harmful, task, d_harm, d_benign, run.per_module(metric), run.per_module(harm_score))
    if run.rank != 0:
        return None
    store_a = TensorStore(run.inputs.aligned, "aligned model")

    def repaired(name: str, weight: torch.Tensor) -> torch.Tensor:
        idx = result.restored.get(name)
        if idx is None or idx.numel() == 0:
            return weight
        flat = weight.clone().flatten()
        flat[idx] = store_a.get(name).flatten()[idx].to(weight.dtype)
        return flat.view_as(weight)

    write_model(finetuned, run.out / "model", repaired)
    changed = sum(int(i.numel()) for i in result.restored.values())
    return {"method": "restore", "aligned": str(run.inputs.aligned), "finetuned": str(run.inputs.finetuned),
            "task_metric": description, "task_score_B": result.score_b, "floor": result.floor,
            "rolled_back": result.rolled_back, "kept_step": result.kept_step, "changed_elements": changed,
            "weights_in_layers": restorer.total, "k_per_step": restorer.k, "layer": restorer.layer,
            "layers": [restorer.lowest, restorer.lowest + len(restorer.by_layer)], "zero3": run.zero3,
            "checkpoints": result.checkpoints}


register(Method(
    name="restore",
    Config=RestoreConfig,
    run=run_restore,
    summary="gradient-ranked restore of a few weights to the aligned model's, with rollback that protects the task",
    check=check_restore_inputs,
))
