"""Memory per GPU for `bulwark eval` (greedy generation: no gradients, no optimizer), from the model's
config alone; the training plan and the model layout it shares live in plan.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bulwark.cluster.plan import GIB, RUNTIME_RESERVE_BYTES, dtype_bytes, model_layout
from bulwark.errors import BulwarkInputError

# Prompts are cut to their last 1024 tokens before generation (bulwark.eval.generate.generate's
# max_prompt_tokens), so this bounds the prompt part of the KV cache; 32 is eval's default batch.
EVAL_PROMPT_TOKENS = 1024
EVAL_BATCH_SIZE = 32


@dataclass
class EvalMemoryPlan:
    """Bytes per GPU for `bulwark eval` (greedy generation, no gradients, no optimizer)."""

    world_size: int
    total_params: int
    dtype: str
    zero3: bool
    weights_bytes: int  # the whole model (replica) or this rank's 1/world slice (ZeRO-3)
    gathered_bytes: int  # ZeRO-3: the largest unit gathered whole at a time (a decoder layer or the embedding)
    kv_cache_bytes: int
    prefill_bytes: int  # one layer's working set while the prompt goes through it
    logits_bytes: int
    reserve_bytes: int
    gpu_mem_bytes: int
    fits: bool = False
    advice: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.gathered_bytes + self.kv_cache_bytes + self.prefill_bytes
                + self.logits_bytes + self.reserve_bytes)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes per GPU) for display."""
        return [
            ("weights" + (" (1/world slice)" if self.zero3 else " (replica)"), self.weights_bytes),
            ("largest unit gathered (ZeRO-3)", self.gathered_bytes),
            ("KV cache", self.kv_cache_bytes),
            ("prefill working set (one layer)", self.prefill_bytes),
            ("logits (last position)", self.logits_bytes),
            ("runtime reserve", self.reserve_bytes),
        ]


def plan_eval_memory(
    model_config: dict[str, Any],
    *,
    world_size: int = 1,
    dtype: str = "bf16",
    zero3: bool = False,
    batch_size: int = EVAL_BATCH_SIZE,
    prompt_tokens: int = EVAL_PROMPT_TOKENS,
    new_tokens: int = 128,
    gpu_mem_gib: float = 80.0,
    with_advice: bool = True,
) -> EvalMemoryPlan:
    """Per-GPU memory of `bulwark eval` on one rank (b = batch, s = prompt + new tokens, pb = bytes of dtype):

    * weights: ``params * pb``, or ``params * pb // world`` under ZeRO-3;
    * gathered (ZeRO-3 only): ``pb * max(one decoder layer, embedding, lm_head)``: eval gathers one such
      unit at a time (``gathered_per_module``) and frees it after its forward;
    * KV cache: ``2 * layers * b * s * kv_heads * head_dim * pb`` (keys and values of every layer);
    * prefill working set: ``b * prompt * (4*h + 3*intermediate) * pb``: one layer's input, residual,
      normed input and attention output (h wide) plus gate, up and activation (intermediate wide), with
      fused (SDPA) attention that keeps no s x s scores;
    * logits: ``b * vocab * (pb + 4)``: generate() computes the last position only and keeps an fp32 copy;
    * the runtime reserve of training plans (CUDA context, NCCL, allocator).
    """
    if world_size < 1:
        raise BulwarkInputError(f"world size must be >= 1 (got {world_size})")
    if batch_size < 1 or prompt_tokens < 1 or new_tokens < 1:
        raise BulwarkInputError(f"eval batch size, prompt tokens and new tokens must be >= 1 "
                                f"(got {batch_size}, {prompt_tokens}, {new_tokens})")
    if gpu_mem_gib <= 0:
        raise BulwarkInputError(f"gpu memory must be > 0 GiB (got {gpu_mem_gib})")
    if dtype not in ("bf16", "fp32"):
        raise BulwarkInputError(f"eval dtype (--dtype): {dtype!r} is not one of fp32, bf16 (auto plans as bf16)")
    lay = model_layout(model_config)
    pb = dtype_bytes(dtype)
    h, layers, vocab = lay["hidden"], lay["layers"], lay["vocab"]
    heads = lay["heads"]
    kv = int(model_config.get("num_key_value_heads") or heads)
    head_dim = int(model_config.get("head_dim") or h // heads)
    inter = int(model_config["intermediate_size"])
    per_layer = sum(i * o for i, o in lay["linear_shapes"].values()) + 2 * h
    total = lay["total"]
    b, s = batch_size, prompt_tokens + new_tokens
    weights = total * pb // world_size if zero3 else total * pb
    gathered = pb * max(per_layer, vocab * h) if zero3 else 0
    plan = EvalMemoryPlan(
        world_size=world_size, total_params=total, dtype=dtype, zero3=zero3, weights_bytes=weights,
        gathered_bytes=gathered, kv_cache_bytes=2 * layers * b * s * kv * head_dim * pb,
        prefill_bytes=b * prompt_tokens * (4 * h + 3 * inter) * pb, logits_bytes=b * vocab * (pb + 4),
        reserve_bytes=RUNTIME_RESERVE_BYTES, gpu_mem_bytes=int(gpu_mem_gib * GIB),
    )
    plan.fits = plan.total_bytes <= plan.gpu_mem_bytes
    if with_advice and not plan.fits:
        args = dict(world_size=world_size, dtype=dtype, zero3=zero3, batch_size=batch_size,
                    prompt_tokens=prompt_tokens, new_tokens=new_tokens, gpu_mem_gib=gpu_mem_gib, with_advice=False)

        def line(what: str, p: EvalMemoryPlan) -> str:
            return f"{what}: {p.total_gib:.1f} GiB per GPU ({'fits' if p.fits else 'still over'})"

        if dtype == "fp32":
            plan.advice.append(line("--dtype bf16", plan_eval_memory(model_config, **{**args, "dtype": "bf16"})))
        if not zero3:
            plan.advice.append(line(f"--zero3 (partition the weights over the {world_size} rank(s))",
                                    plan_eval_memory(model_config, **{**args, "zero3": True})))
        for n in (2, 4, 8, 16, 32, 64, 128, 256, 512):
            if n > world_size and plan_eval_memory(model_config, **{**args, "zero3": True, "world_size": n}).fits:
                plan.advice.append(line(f"--zero3 --nproc {n} (or {n} GPUs over nodes)",
                                        plan_eval_memory(model_config, **{**args, "zero3": True, "world_size": n})))
                break
        if batch_size > 1:
            plan.advice.append(line("--batch-size 1", plan_eval_memory(model_config, **{**args, "batch_size": 1})))
    return plan
