"""The one module that drives DeepSpeed: initialize, backward/step, shard-local access, checkpoints, export.

Defenses see this class only through `bulwark.defenses.base.TrainingView`; recipes call it directly.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from bulwark.cluster.checks import DS_CONFIG_DIR, read_ds_config, resolve_ds_config  # noqa: F401  (re-exported)
from bulwark.config import TrainConfig
from bulwark.engine.compat import COORDINATOR_KWARGS, check_deepspeed_internals  # noqa: F401  (re-exported)
from bulwark.engine.dist import all_reduce_sum, barrier, init_distributed
from bulwark.engine.ds_config import fill_ds_config
from bulwark.engine.manifest import (
    _check_plain,
    latest_checkpoint,
    load_rank_state,
    verify_manifest,
    write_manifest,
)
from bulwark.engine.snapshot import (
    atomic_dir,
    merge_lora_state_dict,
    rng_state,
    save_hf,
    saved_world_size,
    set_rng_state,
)
from bulwark.errors import BulwarkInputError
from bulwark.losses import model_loss

PreStepFn = Callable[[list[tuple[int, torch.Tensor]]], None]


def lr_lambda(train: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "cosine":
            span = max(1, total_steps - train.warmup_steps)
            progress = min(1.0, (step - train.warmup_steps) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


class Engine:
    """A DeepSpeed ZeRO-2/3 engine with the narrow view defenses need."""

    def __init__(
        self,
        build_model: Callable[[], torch.nn.Module],
        train: TrainConfig,
        ds_config: str,
        dtype: str,
        total_steps: int,
    ) -> None:
        import deepspeed

        self.rank, self.world_size, self.local_rank = init_distributed()
        self.train = train
        self.ds_config = fill_ds_config(read_ds_config(ds_config), train, dtype, self.world_size)
        self.zero_stage = int(self.ds_config["zero_optimization"]["stage"])
        self._hf_ds_config = None
        if self.zero_stage == 3:
            # Alive while from_pretrained runs, so transformers loads under zero.Init: each rank only
            # ever holds its own shard of a large model.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        torch.manual_seed(train.seed)
        model = build_model()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise BulwarkInputError("the model has no trainable parameters (check model.lora settings)")
        if train.optimizer == "sgd":
            optimizer = torch.optim.SGD(trainable, lr=train.lr, weight_decay=train.weight_decay)
        else:
            # fused: one pass over each flat fp32 shard instead of ~10 (measured on SmolLM2's 135M
            # parameters on this CPU: 0.08 s a step instead of 0.63 s)
            optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay, fused=True)
        schedule = lr_lambda(train, total_steps)
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.ds_config,
            dist_init_required=False,
        )
        check_deepspeed_internals(self.ds, self.zero_stage)
        self.module: torch.nn.Module = self.ds.module
        self.device: torch.device = self.ds.device
        self._pre_step_fns: list[PreStepFn] = []
        self._post_step_fns: list[PreStepFn] = []
        self._extra_coordinators: dict[str, Any] = {}
        self._shard_index = {id(shard): i for i, shard in enumerate(self.local_shards())}
        zero_optimizer = self.ds.optimizer
        self._inner_optimizers = [
            inner for inner in (zero_optimizer.optimizer, getattr(zero_optimizer, "backup_optimizer", None))
            if inner is not None
        ]
        for inner in self._inner_optimizers:
            inner.register_step_pre_hook(self._on_optimizer_step)
            inner.register_step_post_hook(self._after_optimizer_step)

    # ---- the view defenses get -------------------------------------------------------------------

    def local_shards(self) -> list[torch.Tensor]:
        zero_optimizer = self.ds.optimizer
        if self.zero_stage == 3:
            return list(zero_optimizer.fp32_partitioned_groups_flat)
        return list(zero_optimizer.single_partition_of_fp32_groups)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.module.named_parameters() if p.requires_grad]

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: the weights live as per-rank slices outside a forward."""
        return any(is_partitioned(p) for p in self.module.parameters())

    def full_numel(self, param: torch.nn.Parameter) -> int:
        """Elements of the whole weight (a ZeRO-3 parameter's `numel()` is its empty placeholder's)."""
        from bulwark.engine.partitioned import full_numel

        return full_numel(param)

    def full_shape(self, param: torch.nn.Parameter) -> torch.Size:
        """Shape of the whole weight (a ZeRO-3 parameter's own shape is its empty placeholder's)."""
        return param.ds_shape if is_partitioned(param) else param.shape

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(tensor)

    def gathered(self, params: list[torch.nn.Parameter], modify: bool = False) -> AbstractContextManager:
        return gathered(params, modify)

    def extra_pass(self, kind: str = "extra") -> AbstractContextManager:
        """Inside the block, module calls use ZeRO-3 parameter prefetching of their own, one trace per `kind`.

        ZeRO-3 prefetches parameters by replaying the module order it recorded between two starts of
        the model's forward. A defense whose extra (non-stepping) pass runs a different order than the
        stepping pass (Vaccine's pass 1 stops its backward at the lowest perturbed block; SMART's
        ascent differentiates w.r.t. the input only) breaks that trace twice a step, and every
        parameter is then fetched on demand, one module at a time. Here each kind of extra pass gets
        its own DeepSpeed parameter coordinator (sharing the in-flight registry), so both traces
        stay valid. Memory: parameters one coordinator prefetched and the pass never consumed stay
        gathered until the stepping pass uses them or `step()` partitions everything (docs/DEFENSES.md).
        A no-op under ZeRO-1/2, where weights are never partitioned.
        """
        offload = getattr(self.ds.optimizer, "parameter_offload", None) if self.zero_stage == 3 else None
        if offload is None:
            return nullcontext()
        from collections.abc import Iterator
        from contextlib import contextmanager

        coordinator = self._extra_coordinators.get(kind)
        if coordinator is None:
            coordinator = self._extra_coordinators[kind] = _coordinator_like(offload)

        @contextmanager
        def swapped() -> Iterator[None]:
            main = offload.param_coordinator
            offload.param_coordinator = coordinator
            try:
                yield
            finally:
                offload.param_coordinator = main

        return swapped()

    def add_pre_step_hook(self, fn: PreStepFn) -> None:
        self._pre_step_fns.append(fn)

    def add_post_step_hook(self, fn: PreStepFn) -> None:
        """`fn([(shard index, fp32 master shard)])` right after the inner torch optimizer stepped those
        shards, before DeepSpeed copies them into the 16-bit weights: an edit here is what the model
        gets. Called once per inner step (ZeRO-3 may step one sub-group at a time)."""
        self._post_step_fns.append(fn)

    def optimizer_state(self, shard: torch.Tensor) -> dict[str, torch.Tensor]:
        """The inner torch optimizer's state of a local shard (AdamW: step, exp_avg, exp_avg_sq), the live
        tensors: edits are what the next step reads. Empty before the shard's first step (torch
        creates it lazily)."""
        if id(shard) not in self._shard_index:
            raise ValueError("optimizer_state: not one of local_shards()")
        for inner in self._inner_optimizers:
            # `in` first: optimizer.state is a defaultdict, and a lookup would insert an empty entry
            if shard in inner.state:
                return inner.state[shard]
        return {}

    def shard_slice(self, param: torch.nn.Parameter) -> tuple[int, int, int] | None:
        """(shard index, start, length): where this rank's part of trainable `param` lies in
        `local_shards()[shard index]`, flattened; None when this rank holds none of it.

        ZeRO-3 keeps a slice of every parameter on every rank (the last rank's may end in padding, which
        the range includes); ZeRO-1/2 cut the group's flat buffer into equal partitions, so a parameter
        may lie in one rank's partition, in none, or straddle two.
        """
        zero = self.ds.optimizer
        shards = self.local_shards()
        if self.zero_stage == 3:
            for index, params in enumerate(zero.fp16_groups):
                offset = 0
                for p in params:
                    size = int(p.ds_tensor.ds_numel)
                    if p is param:
                        return index, offset, size
                    offset += size
            return None
        for index, params in enumerate(zero.bit16_groups):
            if not any(p is param for p in params):
                continue
            flat = zero.bit16_groups_flat[index]
            # the weights are views into the group's flat buffer (DeepSpeed re-points p.data at it)
            start = (param.data_ptr() - flat.data_ptr()) // flat.element_size()
            size = shards[index].numel()
            first = size * torch.distributed.get_rank(group=zero.real_dp_process_group[index])
            lo, hi = max(start, first), min(start + param.numel(), first + size)
            return (index, lo - first, hi - lo) if hi > lo else None
        return None

    def _present_shards(self, optimizer: torch.optim.Optimizer, with_grad: bool) -> list[tuple[int, torch.Tensor]]:
        # ZeRO-3 may step one sub-group at a time: only the shards of this call. DeepSpeed empties a
        # sub-group's param list only after optimizer.step() returns, so a post-step hook still sees them.
        return [
            (self._shard_index[id(p)], p)
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) in self._shard_index and (p.grad is not None or not with_grad)
        ]

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        present = self._present_shards(optimizer, with_grad=True)
        for fn in self._pre_step_fns:
            fn(present)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        present = self._present_shards(optimizer, with_grad=False)
        for fn in self._post_step_fns:
            fn(present)

    # ---- the loop --------------------------------------------------------------------------------

    def forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model_loss(self.ds, self.to_device(batch))

    def forward_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = self.to_device(batch)
        return self.ds(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.ds.device) for k, v in batch.items()}

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def gradients_overflowed(self) -> bool:
        """Whether DeepSpeed skipped the last optimizer step because a gradient was inf or NaN. bf16 and
        fp32 have no loss scale to back off, so a skipped step means the run has diverged."""
        return bool(self.ds.optimizer.overflow)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, root: Path, step: int, client: dict[str, Any], per_rank: dict[str, Any]) -> None:
        """Write `root/step_N`, then its MANIFEST.json; `root/latest` moves only after both are complete."""
        tag = f"step_{step:06d}"
        barrier()
        if self.rank == 0 and (root / tag).exists():
            shutil.rmtree(root / tag)  # a half-written save of the same step from a crashed run
        barrier()
        client = {**client, "world_size": self.world_size, "step": step}
        self.ds.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
        per_rank = {**per_rank, "rng": rng_state()}
        # refused here, at save, rather than at resume, where weights_only=True would reject it too late
        _check_plain(per_rank, f"bulwark_rank{self.rank}.pt")
        tmp = root / tag / f"bulwark_rank{self.rank}.pt.tmp"
        torch.save(per_rank, tmp)
        tmp.replace(tmp.with_suffix(""))
        barrier()
        write_manifest(root / tag, self.rank, self.world_size)
        if self.rank == 0:
            latest_tmp = root / "latest.tmp"
            latest_tmp.write_text(tag)
            latest_tmp.replace(root / "latest")
            tags = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in tags[: max(0, len(tags) - self.train.keep_checkpoints)]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load_checkpoint(self, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        tag_dir = latest_checkpoint(root)
        # before anything of the tag is unpickled: DeepSpeed's own files are pickles that can run code
        verify_manifest(tag_dir, self.rank, self.world_size)
        rank_file = tag_dir / f"bulwark_rank{self.rank}.pt"
        saved_world = saved_world_size(tag_dir)
        if saved_world != self.world_size or not rank_file.is_file():
            raise BulwarkInputError(
                f"checkpoint {tag_dir} was written by {saved_world} ranks; resume with launch.nproc="
                f"{saved_world} (a ZeRO checkpoint cannot change world size: export it instead)"
            )
        meta = load_rank_state(rank_file)
        _, client = self.ds.load_checkpoint(
            str(root), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        set_rng_state(meta.pop("rng"))
        return client or {}, meta

    # ---- export ----------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None elsewhere); every rank must call it."""
        if self.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict() if self.rank == 0 else None
        if self.rank != 0:
            return None
        return {k: v.detach().to("cpu").clone() for k, v in state.items()}

    def export(self, run_dir: Path, tokenizer: Any) -> None:
        """`run_dir/model`: a plain HF folder (LoRA merged); with LoRA also `run_dir/adapter` (PEFT)."""
        state = self.full_state_dict()
        if self.rank == 0:
            module = self.module
            if hasattr(module, "peft_config"):
                lora = module.peft_config["default"]
                atomic_dir(run_dir / "adapter", lambda d: module.save_pretrained(d, state_dict=state))
                merged = merge_lora_state_dict(state, lora.lora_alpha / lora.r)
                base = module.get_base_model()
                atomic_dir(run_dir / "model", lambda d: save_hf(base, merged, tokenizer, d))
            else:
                atomic_dir(run_dir / "model", lambda d: save_hf(module, state, tokenizer, d))
        barrier()

    # ---- weight perturbation and per-parameter shard access (Booster) ----
    #
    # Defenses that need the weight gradient of an extra pass, or a forward at perturbed weights, get
    # them here without ever holding the whole model on one rank (ZeRO-3 only):
    # - an extra pass is a normal DeepSpeed forward + backward (`forward_loss`, then
    #   `isolated_backward`): DeepSpeed's own reduce-scatter writes the rank-averaged gradient into
    #   this rank's flat gradient partition, which is read out as this rank's shard and then put back
    #   as it was, so the step's accumulated gradient never sees the extra pass;
    # - `accumulate_local_grads` adds a shard-local gradient to the step as one more micro-batch would;
    # - `perturbed_weights` / `swapped_weights` edit the local model-dtype partitions that every
    #   forward all-gathers from, and copy the saved partitions back afterwards (bit for bit).
    # The layout of DeepSpeed's flat gradient buffer and of its model-dtype partitions is that of
    # `local_shards()` (the parameters of sub-group 0, then 1, ...; `partition_numel` each).

    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step (DeepSpeed's gradient_accumulation_steps)."""
        return int(self.train.grad_accum)

    def forward_outputs(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """The stepping pass through the DeepSpeed engine, returning the model's whole output object
        (for example with output_hidden_states=True); labels are not passed to the model."""
        batch = self.to_device(batch)
        return self.ds(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)

    def isolated_backward(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """Backward of `loss` (from `forward_loss` / `forward_outputs`, i.e. through the engine) with
        DeepSpeed's reduction, kept out of this step's gradient.

        Returns this rank's shard of d loss / d w averaged over ranks (not divided by grad_accum), one
        flat fp32 tensor per local shard, aligned with `local_shards()`. The gradient accumulated so
        far in this optimizer step is left exactly as it was.
        """
        zero = self._zero3_for("isolated_backward")
        buffer = zero.grad_partitions_flat_buffer
        # Before the first backward of a step the buffer holds the previous step's gradient, which
        # DeepSpeed overwrites (not adds to) in that backward: nothing to keep then.
        saved = buffer.clone() if self._grads_accumulated() else None
        buffer.zero_()
        self.ds.backward(loss, scale_wrt_gas=False)
        grads = [view.float().clone() for view in self._grad_views()]
        if saved is None:
            buffer.zero_()
        else:
            buffer.copy_(saved)
        return grads

    def accumulate_local_grads(self, grads: list[torch.Tensor]) -> None:
        """Add `grads` (this rank's shards, laid out as `local_shards()`) to this step's gradient with
        the weight `backward` gives one micro-batch's loss (1 / grad_accum).

        Call it after a backward of this micro-batch (e.g. `isolated_backward`): only then is the
        buffer this step's and does DeepSpeed's next backward add to it rather than overwrite it.
        """
        self._zero3_for("accumulate_local_grads")
        if not self._grads_accumulated():
            raise RuntimeError("accumulate_local_grads: run a backward of this micro-batch first")
        scale = 1.0 / self.grad_accum_steps()
        with torch.no_grad():
            for view, grad in zip(self._grad_views(), grads, strict=True):
                view.add_(grad.to(view.dtype), alpha=scale)

    def perturbed_weights(self, deltas: list[torch.Tensor]) -> AbstractContextManager:
        """Inside the block every forward reads w + delta, with w this rank's fp32 master shard and
        `deltas` laid out as `local_shards()`; afterwards the weights are back bit for bit."""
        shards = self.local_shards()
        return self._weights_replaced(
            [shard.detach().float() + delta.float() for shard, delta in zip(shards, deltas, strict=True)]
        )

    def swapped_weights(self, shards: list[torch.Tensor]) -> AbstractContextManager:
        """Inside the block every forward reads `shards` (laid out as `local_shards()`) as the trainable
        weights; afterwards the weights are back bit for bit."""
        return self._weights_replaced(shards)

    def _weights_replaced(self, values: list[torch.Tensor]) -> AbstractContextManager:
        from collections.abc import Iterator
        from contextlib import contextmanager

        zero = self._zero3_for("perturbed/swapped weights")
        if getattr(zero, "offload_param", False) and any(f is None for f in zero.fp16_partitioned_groups_flat):
            raise BulwarkInputError("weight perturbation does not support NVMe parameter offload")
        flats = list(zero.fp16_partitioned_groups_flat)  # what the forward all-gathers from
        if len(flats) != len(values):
            raise ValueError(f"expected {len(flats)} shards, got {len(values)}")

        @contextmanager
        def block() -> Iterator[None]:
            # A copy, not `w - delta` afterwards: subtraction would not give back the same bits.
            with torch.no_grad():
                saved = [flat.clone() for flat in flats]
                for flat, value in zip(flats, values, strict=True):
                    flat.copy_(value.to(flat.dtype))
                self._regather_persistent(zero)
            try:
                yield
            finally:
                with torch.no_grad():
                    for flat, old in zip(flats, saved, strict=True):
                        flat.copy_(old)
                    self._regather_persistent(zero)

        return block()

    def _regather_persistent(self, zero: Any) -> None:
        # Small "persistent" parameters stay gathered between forwards (from the first optimizer step
        # on): rebuild those full copies from the edited partitions, as DeepSpeed does after its own
        # step. Collective: every rank calls it with the same parameters.
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [p for p in zero.persistent_parameters if p.ds_status == ZeroParamStatus.AVAILABLE]
        if gathered:
            gathered[0].partition(gathered)
            gathered[0].all_gather(gathered)

    def _zero3_for(self, what: str) -> Any:
        if self.zero_stage != 3:
            raise BulwarkInputError(f"{what} needs ZeRO stage 3 (launch.ds_config=zero3), not stage {self.zero_stage}")
        zero = self.ds.optimizer
        if getattr(zero, "offload_optimizer", False):
            raise BulwarkInputError(f"{what} does not support optimizer offload yet (use launch.ds_config=zero3)")
        if getattr(zero, "zero_hpz_partition_size", 1) > 1:
            raise BulwarkInputError(f"{what} does not support ZeRO++ hierarchical partitioning (zero_hpz_partition_size)")
        return zero

    def _grad_views(self) -> list[torch.Tensor]:
        buffer = self.ds.optimizer.grad_partitions_flat_buffer
        views, offset = [], 0
        for shard in self.local_shards():
            views.append(buffer.narrow(0, offset, shard.numel()))
            offset += shard.numel()
        if offset != buffer.numel():
            raise RuntimeError(f"ZeRO-3 gradient buffer has {buffer.numel()} elements, local shards {offset}")
        return views

    def _grads_accumulated(self) -> bool:
        """Whether a backward has run since the last optimizer step (DeepSpeed then adds to the buffer)."""
        zero = self.ds.optimizer
        return zero.micro_step_id > 0 or bool(zero._epilogue_ran_this_backward)


def _coordinator_like(offload: Any) -> Any:
    """A fresh ZeRO-3 parameter coordinator with the settings of `offload`'s own."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    return PartitionedParameterCoordinator(
        prefetch_bucket_sz=offload._prefetch_bucket_sz,
        max_reuse_distance_in_numel=offload._max_reuse_distance_in_numel,
        max_available_parameters_in_numel=offload._max_available_parameters_in_numel,
        allgather_stream=offload._DeepSpeedZeRoOffload__allgather_stream,
        inflight_param_registry=offload._DeepSpeedZeRoOffload__inflight_param_registry,
        # NVMe partitions are prefetched by the main coordinator only (its swap buffers are not shared):
        # an extra pass reads them on demand
        prefetch_nvme=False,
        timers=offload.timers,
        zero_quantized_weights=offload.zero_quantized_weights,
        zero_quantized_nontrainable_weights=offload.zero_quantized_nontrainable_weights,
        fast_sharding_for_leaf_module=offload.fast_sharding_for_leaf_module,
        log_trace_cache_warnings=False,
    )


def is_partitioned(param: torch.nn.Parameter) -> bool:
    """A ZeRO-3 partitioned parameter (DeepSpeed marks those with `ds_id`)."""
    return hasattr(param, "ds_id")


def gathered(params: list[torch.nn.Parameter], modify: bool = False) -> AbstractContextManager:
    """Whole values of `params` inside the block (ZeRO-3); with `modify`, rank 0's edits are written back
    to every rank's slice, else the gather is read-only. A no-op for plain parameters."""
    if not any(is_partitioned(p) for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def gather_for_edit(params: list[torch.nn.Parameter]) -> AbstractContextManager:
    """Whole values of `params` inside the block, edits written back (ZeRO-3); a no-op for plain params."""
    return gathered(params, modify=True)


def peak_memory_bytes() -> int:
    """Peak device memory on GPU; peak resident set of this process on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
