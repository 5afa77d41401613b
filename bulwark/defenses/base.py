"""The hook protocol every defense answers, the view of the engine it gets, and the registry.

A recipe owns the training loop; a defense only answers these calls (see docs/DESIGN.md):

    for step in range(steps):                      # optimizer steps
        for micro in range(grad_accum):
            batch = defense.next_batch(streams, step)
            loss = defense.loss(engine, batch)      # extra passes go through engine.module
            engine.backward(loss)
            engine.step()                           # at the boundary: defense.before_step(shards)
        defense.after_step(engine, step + 1)
    defense.state_dict()                            # saved per rank in every checkpoint

`before_step` runs INSIDE `engine.step()`, from a pre-step hook on the inner torch optimizer: that is
the first moment at which this rank's flat fp32 master shard holds its reduced, unscaled, clipped
gradient under ZeRO-2/3 (before it, ZeRO-3 has no per-shard `.grad` at all). Defenses never import
DeepSpeed: they see `TrainingView`, which the engine implements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from bulwark.errors import BulwarkInputError
from bulwark.losses import model_loss


class Stream(Protocol):
    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PassView(Protocol):
    """The model's passes: the stepping pass through the engine, extra passes through `module`."""

    rank: int
    world_size: int
    module: torch.nn.Module  # the wrapped model, for extra (non-stepping) passes and forward hooks

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stepping pass, through the DeepSpeed engine."""
        ...

    def forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The stepping pass, through the DeepSpeed engine, for defenses whose loss needs the logits."""
        ...

    def forward_outputs(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """The stepping pass through the engine, returning the model's whole output (hidden states...)."""
        ...

    def extra_pass(self, kind: str = "extra") -> AbstractContextManager:
        """Wrap each extra (non-stepping) pass through `module`: under ZeRO-3 every `kind` of pass keeps
        its own parameter-prefetch trace, so it and the stepping pass stop invalidating each other's."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


class ShardView(Protocol):
    """This rank's flat fp32 master shards and the optimizer around them (proximal terms, frozen layers)."""

    rank: int
    world_size: int
    module: torch.nn.Module
    partitioned: bool  # ZeRO-3: weights live as per-rank slices outside a forward

    def local_shards(self) -> list[torch.Tensor]:
        """This rank's flat fp32 master partitions of the trainable weights, in a fixed order."""
        ...

    def shard_slice(self, param: torch.nn.Parameter) -> tuple[int, int, int] | None:
        """(shard index, start, length) of this rank's part of trainable `param` in `local_shards()`,
        or None when this rank holds none of it."""
        ...


    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]: ...

    def full_numel(self, param: torch.nn.Parameter) -> int:
        """Elements of the whole weight, partitioned or not."""
        ...

    def full_shape(self, param: torch.nn.Parameter) -> torch.Size:
        """Shape of the whole weight, partitioned or not."""
        ...

    def gathered(self, params: list[torch.nn.Parameter], modify: bool = False) -> AbstractContextManager:
        """Full values of `params` inside the block (ZeRO-3 gathers; a no-op otherwise)."""
        ...

    def optimizer_state(self, shard: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inner torch optimizer's live state of one of `local_shards()`; empty before its first step."""
        ...

    def add_post_step_hook(self, fn: Callable[[list[tuple[int, torch.Tensor]]], None]) -> None:
        """`fn([(shard index, fp32 master shard)])` right after the inner optimizer stepped those shards,
        before the 16-bit weights are copied from them (the pair of `before_step`)."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


class WeightGradView(Protocol):
    """Gradients kept out of the step and weights perturbed for a pass (Booster, SMART)."""

    def grad_accum_steps(self) -> int: ...

    def isolated_backward(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """Backward of an engine pass kept out of the step: this rank's shards of d loss / d w (rank mean)."""
        ...

    def accumulate_local_grads(self, grads: list[torch.Tensor]) -> None:
        """Add shard-local gradients to this step's gradient like one more micro-batch's loss would."""
        ...

    def perturbed_weights(self, deltas: list[torch.Tensor]) -> AbstractContextManager:
        """Forwards inside the block read w + delta per local shard; restored bit for bit afterwards."""
        ...

    def swapped_weights(self, shards: list[torch.Tensor]) -> AbstractContextManager:
        """Forwards inside the block read `shards` as the trainable weights; restored bit for bit afterwards."""
        ...


class TrainingView(PassView, ShardView, WeightGradView, Protocol):
    """Everything a defense may touch, implemented by `bulwark.engine.Engine`. A defense annotates its hooks
    with the narrowest of the three views it uses, so a reader sees what it reaches into."""


ShardIter = Iterator[tuple[int, torch.Tensor]]


@dataclass
class NoParams:
    """Defenses without parameters."""


@dataclass(frozen=True)
class MemoryCost:
    """What a defense holds per rank beyond plain SFT at its peak (while a pass's graph is alive), as
    `bulwark plan` counts it. Declared beside each defense's config so that a new defense is planned
    without touching `bulwark/cluster/`.

    Shard-sized figures are multiples of this rank's share of the trainable weights (trainable
    parameters / world size): they shrink with the world size under every ZeRO stage. Activation-shaped
    figures are per rank, in units of one micro-batch (s tokens x b rows; h = hidden size, v = vocabulary).
    """

    fp32_copies: float = 0.0  # fp32 buffers the size of this rank's trainable shard (anchors, gradient copies)
    dtype_copies: float = 0.0  # the same in the model's dtype (copies of the 16-bit weight partitions)
    replica_dtype_copies: float = 0.0  # whole (unsharded) trainable weights in the model's dtype, ZeRO-0/1/2 only
    # LoRA runs: fp32 buffers the size of this rank's share of the FROZEN weights LoRA adapts (AsFT's V)
    adapted_fp32_copies: float = 0.0
    activation_factor: float = 1.0  # forward graphs of b rows alive at once, logits included (1 = SFT)
    layer_outputs: float = 0.0  # (s, b, h) buffers per decoder layer in the activations' dtype
    layer_outputs_fp32: float = 0.0  # (s, b, h) fp32 buffers per decoder layer
    logits_fp32: float = 0.0  # fp32 (s, b, v) buffers beyond activation_factor x SFT's logits
    logits_fp32_per_layer: float = 0.0  # fp32 (s, b, v) buffers per decoder layer
    what: str = "nothing extra"


class Defense:
    """Plain SFT behaviour; defenses override what they change."""

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ("align", "finetune")
    Config: ClassVar[type] = NoParams
    # side streams the recipe must build for this defense, besides "main"
    side_streams: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""
    # SFT's: one forward graph, no buffers; each defense that keeps more declares it in its module
    memory: ClassVar[MemoryCost] = MemoryCost()

    def __init__(self, config: Any, total_steps: int) -> None:
        self.config = config
        self.total_steps = total_steps

    def check_inputs(self, model_path: str) -> None:
        """In the launcher's process, before any rank starts: check what the defense reads beside the model
        (`model_path`: the run's model folder, or "tiny"); raise BulwarkInputError with one line."""

    def attach(self, engine: TrainingView) -> None:
        """Called once after the engine is built and before the first step (and before a resume)."""

    def next_batch(self, streams: dict[str, Stream], step: int) -> dict[str, torch.Tensor]:
        return streams["main"].next_batch()

    def loss(self, engine: TrainingView, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return engine.forward_loss(batch)

    def before_step(self, shards: ShardIter) -> None:
        """Edit this rank's (shard index, fp32 master shard with .grad) before the optimizer steps."""

    def after_step(self, engine: TrainingView, step: int) -> None:
        """`step` optimizer steps are done."""

    def metrics(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


REGISTRY: dict[str, type[Defense]] = {}


def register(cls: type[Defense]) -> type[Defense]:
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"defense name {cls.name!r} empty or registered twice")
    REGISTRY[cls.name] = cls
    return cls


def build_defense(spec: dict[str, Any], stage: str, total_steps: int) -> Defense:
    """`spec` is the config's `defense` section: {"name": ..., params...}. Unknown keys are errors."""
    cls, config = defense_config(spec)
    if stage and stage not in cls.stages:
        raise BulwarkInputError(
            f"defense '{cls.name}' runs at stage {'/'.join(cls.stages)}, not '{stage}' (see `bulwark defenses`)"
        )
    return cls(config, total_steps)


def defense_config(spec: dict[str, Any]) -> tuple[type[Defense], Any]:
    """(the registered class, its typed Config) for a `defense` section; one-line errors name the key."""
    from bulwark.config import build_dataclass  # config imports nothing from here at import time

    params = dict(spec)
    name = str(params.pop("name", "sft"))
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise BulwarkInputError(
            f"unknown defense '{name}'{hint} (registered: {', '.join(sorted(REGISTRY))}; see `bulwark defenses`)"
        )
    cls = REGISTRY[name]
    return cls, build_dataclass(cls.Config, params, "defense")


def resolve_defense_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """{"name": ..., every parameter of that defense with its default filled in}; unknown names and keys
    are the same one-line errors `build_defense` gives."""
    cls, config = defense_config(spec)
    return {"name": cls.name, **dataclasses.asdict(config)}


def describe() -> list[dict[str, Any]]:
    """Name, stages, summary and parameters with defaults of every registered defense."""
    rows = []
    for name, cls in sorted(REGISTRY.items()):
        params = {f.name: _default(f) for f in dataclasses.fields(cls.Config)}
        rows.append({"name": name, "stages": list(cls.stages), "summary": cls.summary, "params": params})
    return rows


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def plain_loss(module: torch.nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Loss of an extra pass through the bare module (never the engine: see DESIGN, multi-pass)."""
    return lambda batch: model_loss(module, batch)
