"""AsFT: anchoring fine-tuning in the narrow safety basin (Yang et al., AAAI 2026, arXiv 2506.08473).

Reference code: PKU-YuanGroup/AsFT. The alignment direction of a weight matrix W_l (d_out x d_in) is
V_l = W_aligned,l - W_base,l, with W_base the unaligned model the aligned one (the model this run
fine-tunes) came from. Updates along V keep the model in the "safety basin"; updates orthogonal to it
break alignment. AsFT adds to the fine-tuning loss a penalty on the orthogonal part of every update:

    L(θ) = CE(θ) + λ Σ_l || (I - C_l) ΔW_l ||_F²,      C_l = V_l V_lᵀ / ||V_l||_F

    LoRA:              ΔW_l = s (B_l A_l - B0_l A0_l)   (s = lora_alpha / r; B0 A0 = the adapter at the start:
                                                         zero for a fresh adapter, the alignment adapter
                                                         under model.lora.mode=single)
    full fine-tuning:  ΔW_l = W_l - W_aligned,l

C_l is SafeLoRA's matrix, as in the reference (`vec @ vec.T / torch.norm(vec)`): not a projector (its
eigenvalues are σ_i² / ||V||_F), applied on the output side. The gradient Bulwark adds, with
K_l = (I - C_l)²:
    full:  ∂R/∂W = 2λ K ΔW
    LoRA:  ∂R/∂B = 2λ s² (I - C) B̃ (A' Aᵀ),   ∂R/∂A = 2λ s² (B̃ᵀ B̃)[:r] A',   B̃ = (I - C) B',
           B' = [B, B0], A' = [A; -A0]  (so that ΔW = s B' A'; B0 = A0 = none for a fresh adapter)
C is never formed (d_out² per layer): C X = V (Vᵀ X) / ||V||_F.

Parameters: `base` (the unaligned model: a folder, "embedded", a .gguf file or a hub id), `lambda_reg`
(λ; the reference's scripts use 1), `target_modules` (module names, matched on the last name part; empty:
every LoRA-adapted module under LoRA, the decoder's linear layers `DEFAULT_LORA_TARGETS` under full
fine-tuning).

Where Bulwark departs from the reference, and why:
- ΔW of a LoRA layer includes the scaling s = alpha / r (the reference penalises B A, without s): the
  penalty is then on the update the model really gets, and λ means the same under LoRA and full
  fine-tuning. λ_reference = λ s² (Bulwark's LoRA default alpha 16, r 8: s = 2, so λ = 1 here is the
  reference's λ = 4).
- Full fine-tuning (the reference regularises LoRA only) with ΔW = W - W_aligned.
- The penalty's gradient is added once per optimizer step, inside the step, after gradient clipping
  (as Lisa's proximal term: clipping never shrinks the pull). The reference adds λR to every
  micro-batch's loss (divided by nothing), so with gradient accumulation G its penalty weighs G λ and
  is clipped together with the task gradient; the two agree at G = 1 without clipping.
- `base` left empty: no alignment direction is known, and C = 0 (the limit of V Vᵀ / ||V||_F as V -> 0):
  the penalty becomes λ ||ΔW||², a plain pull back to the aligned weights, and rank 0 prints a note.
  The same for a layer whose V is zero (alignment did not touch it). The reference has no such case.
- `single` LoRA mode (the alignment adapter keeps training): V is measured from the aligned weights
  (frozen layer + the alignment adapter) and ΔW from the adapter's start; the reference always adds a
  fresh adapter.

ZeRO-3, and why this layout:
- Full fine-tuning: each rank keeps, per target weight, only its own piece of the flat fp32 master
  (W_aligned, copied at attach) and the rows of V that piece touches (read from `base` by rows, the
  aligned rows gathered one module at a time at attach). Every step, per target weight: the rows split
  between ranks are completed by one small all-reduce (at most world size - 1 rows), M = Vᵀ ΔW and
  N = Vᵀ (C ΔW) are summed over the rows each rank owns (its rows' partial products, one all-reduce of
  d_in x d_in each, one module at a time), and each rank forms its own piece of 2λ K ΔW. Memory per
  rank: 2 fp32 copies of its share of the targeted weights, plus d_in² transient; nothing scales with
  the whole model. Traffic: 2 d_in² floats per target weight per step.
- LoRA: the adapters are tiny; V is not (the frozen layer's size). V is kept row-sharded by rank
  (d_out / world size rows each, read at attach), every product with it is a partial over those rows
  plus an all-reduce of d_in x r, batched over all layers: 5 all-reduces a step (one a scalar). Memory:
  targeted frozen weights / world size in fp32 (V), plus a transient whole copy of the adapters;
  `memory` below declares it as `adapted_fp32_copies=1` beside the full-fine-tuning shard copies.
- Which elements of a weight this rank holds is learnt once from `shard_slice` lengths, all-reduced:
  the pieces of one weight lie on consecutive ranks in rank order under every ZeRO stage.
Nothing changes during the run (V, W_aligned are recomputed at attach, before a resume loads the
checkpoint), so the per-rank checkpoint state is empty and a resume is exact.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bulwark.defenses.base import Defense, MemoryCost, ShardIter, TrainingView, register
from bulwark.errors import BulwarkInputError

FULL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


@dataclass
class AsftConfig:
    base: str = ""  # the unaligned model the run's (aligned) model came from; empty: C = 0 (see module doc)
    lambda_reg: float = 1.0  # λ (the reference's scripts: 1)
    target_modules: list[str] = field(default_factory=list)  # empty: LoRA-adapted modules / FULL_TARGETS


@dataclass
class _Piece:
    """This rank's part of one trainable weight: elements [start, start + length) of the flattened weight
    lie at [offset, offset + length) of local shard `shard` (length 0: this rank holds none)."""

    shard: int
    offset: int
    start: int
    length: int


@dataclass
class _Full:
    name: str
    rows: int
    cols: int
    piece: _Piece
    r0: int  # first row this piece touches; v holds rows r0 .. r0 + len(v)
    v: torch.Tensor
    w0: torch.Tensor  # W_aligned on this piece
    own: torch.Tensor  # local row indices whose first element this rank holds (it sums their products)
    split: list[int]  # rows held by more than one rank (global, the same list on every rank)
    vnorm: float


@dataclass
class _Lora:
    name: str
    scale: float
    a: _Piece
    b: _Piece
    rank: int
    rows: int
    cols: int
    r0: int  # v holds rows r0 .. r0 + len(v) (this rank's share of the output rows)
    v: torch.Tensor
    vnorm: float
    a0: torch.Tensor | None = None  # the adapter at attach, when it is not a fresh one (B0 != 0)
    b0: torch.Tensor | None = None


class _Base:
    """Row ranges of the base model's tensors, read lazily from its safetensors files."""

    def __init__(self, folder: str) -> None:
        from bulwark.recover.checkpoints import TensorStore

        try:
            self.store = TensorStore(Path(folder), "defense.base")
        except BulwarkInputError as exc:
            raise BulwarkInputError(f"defense.base: {exc}") from None
        self._open: dict[Path, Any] = {}

    def rows(self, name: str, shape: tuple[int, int], r0: int, r1: int) -> torch.Tensor:
        from safetensors import safe_open

        path = self.store.files.get(name)
        if path is None:
            raise BulwarkInputError(f"defense.base {self.store.folder}: has no tensor '{name}'; "
                                    "the base must be the model the fine-tuned one was aligned from")
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        tensor = self._open[path].get_slice(name)
        found = tuple(tensor.get_shape())
        if found != shape:
            raise BulwarkInputError(f"defense.base {self.store.folder}: '{name}' has shape {list(found)}, "
                                    f"the model's is {list(shape)}; the base must be the model the "
                                    "fine-tuned one was aligned from")
        return tensor[r0:r1].to(torch.float32)


def resolve_base(base: str) -> str:
    """The base's local folder (converting "embedded" / a .gguf once); one-line errors name defense.base."""
    from bulwark.models import check_weight_files, resolve_model_path

    try:
        path = resolve_model_path(base)
    except BulwarkInputError as exc:
        raise BulwarkInputError(f"defense.base: {exc}") from None
    if path == "tiny":
        raise BulwarkInputError("defense.base: 'tiny' has no weight files; save it (save_tiny_llama) and "
                                "pass the folder")
    try:
        check_weight_files(path)
    except BulwarkInputError as exc:
        raise BulwarkInputError(f"defense.base: {exc}") from None
    if not list(Path(path).glob("*.safetensors")):
        raise BulwarkInputError(f"defense.base {path}: holds no safetensors weights")
    return path


@register
class Asft(Defense):
    name = "asft"
    stages = ("finetune",)
    Config = AsftConfig
    summary = "penalise the part of the update orthogonal to the alignment direction (aligned - base)"
    # full FT: W_aligned and V, each the size of the trainable shard; LoRA: V of the adapted frozen weights,
    # split by rows across ranks (the adapters' own aligned copies are too small to count)
    memory = MemoryCost(fp32_copies=2, adapted_fp32_copies=1,
                        what="aligned weights and alignment direction V (fp32, sharded; LoRA: V of the adapted "
                             "frozen layers / world size)")

    def __init__(self, config: AsftConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        lam = config.lambda_reg
        if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise BulwarkInputError(f"defense.lambda_reg = {lam} must be a finite number >= 0")
        if any(not isinstance(t, str) or not t for t in config.target_modules):
            raise BulwarkInputError(f"defense.target_modules = {config.target_modules}: "
                                    "expected module names")
        # checked here, so in the launcher's process before any rank starts (prepare builds the defense)
        self.base_dir = resolve_base(config.base) if config.base else ""
        self.full: list[_Full] = []
        self.lora: list[_Lora] = []
        self._view: TrainingView | None = None
        self._pending: dict[int, list[tuple[int, torch.Tensor]]] = {}  # shard -> (offset, gradient) to add
        self._done_this_step = False
        self.last_reg = 0.0

    def check_inputs(self, model_path: str) -> None:
        """The base holds every 2-D weight of the model under the same name and shape (a LoRA run's model is
        its base model: the adapter is built on top of it)."""
        if not self.base_dir or model_path == "tiny" or not Path(model_path).is_dir():
            return
        from bulwark.recover.checkpoints import TensorStore

        model, base = TensorStore(Path(model_path), "model.name"), _Base(self.base_dir).store
        for name in model.names():
            shape = model.shape(name)
            if len(shape) != 2 or name == "lm_head.weight":  # a tied head may be stored by one side only
                continue
            if name not in base.files:
                raise BulwarkInputError(f"defense.base {base.folder}: has no tensor '{name}' of model.name "
                                        f"{model_path}; the base must be the model the run's one was aligned from")
            if base.shape(name) != shape:
                raise BulwarkInputError(f"defense.base {base.folder}: '{name}' has shape {base.shape(name)}, "
                                        f"model.name's is {shape}; the base must be the model the run's one was "
                                        "aligned from")

    # ---- attach: find the targets, read V -------------------------------------------------------------

    def attach(self, engine: TrainingView) -> None:
        self._view = engine
        named = dict(engine.trainable_parameters())
        base = _Base(self.base_dir) if self.base_dir else None
        if base is None and engine.rank == 0:
            print("note: defense.base is not set: AsFT has no alignment direction (C = 0), so it pulls the "
                  "update toward zero (λ ||ΔW||²); set defense.base to the unaligned model", file=sys.stderr)
        adapted = [(n, m) for n, m in engine.module.named_modules()
                   if hasattr(m, "lora_A") and hasattr(m, "base_layer") and "default" in m.lora_A]
        targets = set(self.config.target_modules)
        if adapted:
            chosen = [(n, m) for n, m in adapted if not targets or n.rsplit(".", 1)[-1] in targets]
            self._attach_lora(engine, chosen, named, base)
        else:
            wanted = targets or set(FULL_TARGETS)
            chosen_params = [(n, p) for n, p in named.items()
                             if n.endswith(".weight") and n[: -len(".weight")].rsplit(".", 1)[-1] in wanted
                             and len(tuple(engine.full_shape(p))) == 2]
            self._attach_full(engine, chosen_params, base)
        if not self.full and not self.lora:
            raise BulwarkInputError(f"defense.target_modules = {sorted(targets) or 'default'}: no trainable "
                                    "2-D weight of the model matches")

    def _pieces(self, engine: TrainingView, params: list[torch.nn.Parameter]) -> list[list[tuple[int, int]]]:
        """Per parameter, every rank's (start, end) element range: lengths from `shard_slice`, all-reduced;
        the pieces of one weight lie on consecutive ranks in rank order (ZeRO-1/2/3 alike)."""
        lengths = torch.zeros(len(params), engine.world_size, dtype=torch.float64)
        for j, p in enumerate(params):
            where = engine.shard_slice(p)
            if where is not None:
                lengths[j, engine.rank] = where[2]
        lengths = engine.all_reduce_sum(lengths).cpu()
        ranges = []
        for j, p in enumerate(params):
            numel, at, spans = engine.full_numel(p), 0, []
            for q in range(engine.world_size):
                length = int(lengths[j, q])
                spans.append((min(at, numel), min(at + length, numel)))  # ZeRO-3's last piece ends in padding
                at += length
            ranges.append(spans)
        return ranges

    def _piece(self, engine: TrainingView, p: torch.nn.Parameter, spans: list[tuple[int, int]]) -> _Piece:
        where = engine.shard_slice(p)
        start, end = spans[engine.rank]
        if where is None or end <= start:
            return _Piece(0, 0, start, 0)
        return _Piece(where[0], where[1], start, end - start)

    def _attach_full(self, engine: TrainingView, params: list[tuple[str, torch.nn.Parameter]],
                     base: _Base | None) -> None:
        shards = engine.local_shards()
        ranges = self._pieces(engine, [p for _, p in params])
        for (name, p), spans in zip(params, ranges, strict=True):
            rows, cols = tuple(engine.full_shape(p))
            piece = self._piece(engine, p, spans)
            device = shards[piece.shard].device if piece.length else shards[0].device
            r0 = piece.start // cols
            r1 = (piece.start + piece.length - 1) // cols + 1 if piece.length else r0
            w0 = shards[piece.shard].detach().narrow(0, piece.offset, piece.length).float().clone() \
                if piece.length else torch.zeros(0, device=device)
            with engine.gathered([p]):  # one module at a time: its whole weight for this block only
                aligned = p.detach()[r0:r1].to(device, torch.float32).clone()
            v = aligned - base.rows(name, (rows, cols), r0, r1).to(device) if base is not None \
                else torch.zeros(r1 - r0, cols, device=device)
            end = piece.start + piece.length
            own = torch.tensor([i - r0 for i in range(r0, r1) if piece.start <= i * cols < end],
                               dtype=torch.long, device=device)
            split = sorted({s // cols for s, _ in spans[1:] if 0 < s < rows * cols and s % cols})
            vnorm = math.sqrt(float(engine.all_reduce_sum(v[own].pow(2).sum().reshape(1)).item()))
            self.full.append(_Full(name, rows, cols, piece, r0, v, w0, own, split, vnorm))

    def _attach_lora(self, engine: TrainingView, modules: list[tuple[str, torch.nn.Module]],
                     named: dict[str, torch.nn.Parameter], base: _Base | None) -> None:
        ident = {id(p): n for n, p in named.items()}
        pairs = []
        for name, m in modules:
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            if id(a) not in ident or id(b) not in ident:
                continue  # a frozen adapter (not trained here): nothing moves it
            pairs.append((name, m, a, b))
        ranges = self._pieces(engine, [t for _, _, a, b in pairs for t in (a, b)])
        shards = engine.local_shards()
        device = shards[0].device
        for k, (name, m, a, b) in enumerate(pairs):
            r, cols = tuple(engine.full_shape(a))
            rows = tuple(engine.full_shape(b))[0]
            r0, r1 = rows * engine.rank // engine.world_size, rows * (engine.rank + 1) // engine.world_size
            weight = m.base_layer.weight
            with engine.gathered([weight]):
                aligned = weight.detach()[r0:r1].to(device, torch.float32).clone()
            t = _Lora(name, float(m.scaling["default"]), self._piece(engine, a, ranges[2 * k]),
                      self._piece(engine, b, ranges[2 * k + 1]), r, rows, cols, r0, aligned, 0.0)
            self.lora.append(t)
        # the adapter as it starts: ΔW is measured from it (zero B for a fresh adapter)
        for t, (a0, b0) in zip(self.lora, self._whole_adapters(shards), strict=True):
            if bool((b0 != 0).any()):
                t.a0, t.b0 = a0, b0
                t.v += t.scale * (b0[t.r0:t.r0 + len(t.v)] @ a0)  # the aligned weight includes the adapter
        for t in self.lora:
            key = f"{t.name.removeprefix(PEFT_PREFIX)}.weight"
            if base is not None:
                t.v -= base.rows(key, (t.rows, t.cols), t.r0, t.r0 + len(t.v)).to(device)
            else:
                t.v.zero_()
        if self.lora:
            sq = engine.all_reduce_sum(torch.stack([t.v.pow(2).sum() for t in self.lora]))
            for t, s in zip(self.lora, sq.cpu().tolist(), strict=True):
                t.vnorm = math.sqrt(s)

    def _whole_adapters(self, shards: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every target's whole (A, B) from the ranks' pieces: one all-reduce of the adapters' size."""
        sizes = [(t.rank * t.cols, t.rows * t.rank) for t in self.lora]
        flat = torch.zeros(sum(a + b for a, b in sizes), device=shards[0].device)
        at = 0
        for t, (na, nb) in zip(self.lora, sizes, strict=True):
            for piece, n in ((t.a, na), (t.b, nb)):
                if piece.length:
                    flat[at + piece.start: at + piece.start + piece.length] = \
                        shards[piece.shard].detach().narrow(0, piece.offset, piece.length).float()
                at += n
        flat = self._view.all_reduce_sum(flat)
        out, at = [], 0
        for t, (na, nb) in zip(self.lora, sizes, strict=True):
            a, b = flat[at:at + na].view(t.rank, t.cols), flat[at + na:at + na + nb].view(t.rows, t.rank)
            out.append((a, b))
            at += na + nb
        return out

    # ---- the step ---------------------------------------------------------------------------------------

    def before_step(self, shards: ShardIter) -> None:
        shards = list(shards)
        if not self._done_this_step:
            # once per optimizer step, before any sub-group stepped: every local shard still holds the
            # weights the penalty is taken at
            self._done_this_step = True
            self._pending = {}
            if self.config.lambda_reg > 0:
                with torch.no_grad():
                    self._compute(self._view.local_shards())
        with torch.no_grad():
            for index, shard in shards:
                for offset, grad in self._pending.pop(index, []):
                    shard.grad.narrow(0, offset, grad.numel()).add_(grad.to(shard.grad.dtype))

    def after_step(self, engine: TrainingView, step: int) -> None:
        self._done_this_step = False
        self._pending = {}

    def _add(self, piece: _Piece, grad: torch.Tensor) -> None:
        if piece.length:
            self._pending.setdefault(piece.shard, []).append((piece.offset, grad.reshape(-1)))

    def _compute(self, shards: list[torch.Tensor]) -> None:
        reg = torch.zeros(1, device=shards[0].device, dtype=torch.float64)
        for t in self.full:
            reg += self._full_step(t, shards)
        if self.lora:
            reg += self._lora_step(shards)
        self.last_reg = float(self._view.all_reduce_sum(reg).item()) * self.config.lambda_reg

    def _full_step(self, t: _Full, shards: list[torch.Tensor]) -> torch.Tensor:
        lam, view, p = self.config.lambda_reg, self._view, t.piece
        dev = t.v.device
        local = t.v.shape[0]
        delta = torch.zeros(local * t.cols, device=dev)
        lo = p.start - t.r0 * t.cols
        if p.length:
            delta[lo:lo + p.length] = shards[p.shard].detach().narrow(0, p.offset, p.length).float() - t.w0
        delta = delta.view(local, t.cols)
        if t.split:  # complete the rows this piece shares with other ranks (each adds its part)
            mine = [(k, i - t.r0) for k, i in enumerate(t.split) if t.r0 <= i < t.r0 + local]
            rows = torch.zeros(len(t.split), t.cols, device=dev)
            for k, i in mine:
                rows[k] = delta[i]
            rows = view.all_reduce_sum(rows)
            for k, i in mine:
                delta[i] = rows[k]
        grad = delta.clone()
        ortho = delta
        if t.vnorm > 0:
            v_own = t.v[t.own]
            m = view.all_reduce_sum(v_own.T @ delta[t.own])  # Vᵀ ΔW, d_in x d_in
            cd = t.v @ m / t.vnorm  # C ΔW on these rows
            n = view.all_reduce_sum(v_own.T @ cd[t.own])
            grad += -2 * cd + t.v @ n / t.vnorm  # (I - C)² ΔW = ΔW - 2 C ΔW + C (C ΔW)
            ortho = delta - cd
        grad.mul_(2 * lam)
        self._add(p, grad.view(-1)[lo:lo + p.length])
        return ortho[t.own].double().pow(2).sum().reshape(1)

    def _lora_step(self, shards: list[torch.Tensor]) -> torch.Tensor:
        lam, view = self.config.lambda_reg, self._view
        whole = self._whole_adapters(shards)
        factors = []
        for t, (a, b) in zip(self.lora, whole, strict=True):
            bp = b if t.b0 is None else torch.cat([b, t.b0], 1)
            ap = a if t.a0 is None else torch.cat([a, -t.a0], 0)
            factors.append((a, b, ap, bp[t.r0:t.r0 + len(t.v)]))
        # Vᵀ B' over each rank's rows, summed
        p_all = view.all_reduce_sum(
            torch.cat([(t.v.T @ bp).reshape(-1) for t, (*_, bp) in zip(self.lora, factors, strict=True)]))
        tilde, at = [], 0
        for t, (*_, bp) in zip(self.lora, factors, strict=True):
            n = t.cols * bp.shape[1]
            p = p_all[at:at + n].view(t.cols, -1)
            at += n
            # B̃ = (I - C) B' on these rows
            tilde.append(bp - t.v @ p / t.vnorm if t.vnorm > 0 else bp.clone())
        parts = []
        for t, bt, (_, _, ap, _) in zip(self.lora, tilde, factors, strict=True):
            reg = t.scale ** 2 * ((bt @ (ap @ ap.T)) * bt).sum()
            parts += [(bt.T @ bt).reshape(-1), (t.v.T @ bt).reshape(-1), reg.reshape(1)]
        summed = view.all_reduce_sum(torch.cat(parts))
        grad_b_rows, grads_a, at = [], [], 0
        reg_total = torch.zeros(1, dtype=torch.float64, device=summed.device)
        for t, bt, (a, _, ap, _) in zip(self.lora, tilde, factors, strict=True):
            width = bt.shape[1]
            q = summed[at:at + width * width].view(width, width)
            at += width * width
            vt = summed[at:at + t.cols * width].view(t.cols, width)
            at += t.cols * width
            reg_total += summed[at].double()
            at += 1
            cbt = bt - t.v @ vt / t.vnorm if t.vnorm > 0 else bt  # (I - C) B̃ on these rows
            coef = 2 * lam * t.scale ** 2
            grad_b_rows.append(coef * (cbt @ (ap @ a.T)))
            grads_a.append(coef * (q[: t.rank] @ ap))
        # each rank computed its rows of ∂R/∂B: put them together (the adapters are small)
        sizes = [t.rows * t.rank for t in self.lora]
        flat = torch.zeros(sum(sizes), device=summed.device)
        at = 0
        for t, g, size in zip(self.lora, grad_b_rows, sizes, strict=True):
            flat[at + t.r0 * t.rank: at + t.r0 * t.rank + g.numel()] = g.reshape(-1)
            at += size
        flat = view.all_reduce_sum(flat)
        at = 0
        for t, ga, size in zip(self.lora, grads_a, sizes, strict=True):
            gb = flat[at:at + size]
            at += size
            self._add(t.a, ga.reshape(-1)[t.a.start:t.a.start + t.a.length])
            self._add(t.b, gb[t.b.start:t.b.start + t.b.length])
        # every rank holds the same summed value; _compute all-reduces its total, so count it on rank 0 only
        return reg_total if view.rank == 0 else torch.zeros_like(reg_total)

    # ---- reporting --------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        return {"asft_reg": self.last_reg}  # λ Σ ||(I - C) ΔW||² at the weights the last step started from
