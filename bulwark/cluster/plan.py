"""Memory per GPU for a Bulwark run, from the model's config alone (no weights, no DeepSpeed import).

The model-state arithmetic reimplements DeepSpeed's ZeRO estimators (deepspeed 0.19.8,
``deepspeed/runtime/zero/stage3.py: estimate_zero3_model_states_mem_needs`` and
``stage_1_and_2.py: estimate_zero2_model_states_mem_needs``); only ``bulwark/engine/`` may import
DeepSpeed, so the formulas are copied here, split into parameters / gradients / optimizer states:

* mixed precision (bf16/fp16): 2 bytes of 16-bit parameters + 4 bytes of fp32 gradient partition +
  12 bytes of AdamW state (fp32 master weights, momentum, variance) = DeepSpeed's 18 bytes/param;
* fp32 training: 4 (parameters) + 4 (gradients) + 8 (momentum, variance) = 16 bytes/param;
* ZeRO-3 adds ``4 * largest_layer_params`` bytes for the gathered 16-bit parameters and gradients
  of the largest module; ZeRO-3 with CPU offload keeps only that buffer (and, without parameter
  offload, the 16-bit parameter shard) on the GPU, the rest goes to host memory, times DeepSpeed's
  ``additional_buffer_factor`` of 1.5.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198), section 4.1: one transformer layer without recomputation stores
``s*b*h*(34 + 5*a*s/h)`` bytes with 16-bit activations (s = sequence length, b = micro batch,
h = hidden size, a = attention heads); the ``5*a*s/h`` part is the s x s attention scores, softmax
and dropout mask, which fused attention never stores: with ``attention="sdpa"`` (transformers' default
for Llama, and flash attention) a layer keeps ``34*s*b*h`` bytes. Measured on one H200 (1.1B Llama,
bf16, ZeRO-3, 4 x 2048 tokens, docs/BENCHMARKS.md): the sdpa plan is within 1.5% of
torch.cuda.max_memory_allocated for SFT, Lisa and Vaccine, where the s x s term would have planned
2.6x too much. ``attention="eager"`` keeps the term. With full
activation checkpointing a layer keeps only its 16-bit input, ``2*s*b*h`` bytes, and one layer is
recomputed at a time. The output layer adds the 16-bit logits and their fp32 copy for the cross
entropy (the paper's ``4*s*b*v``).

Defense costs are not listed here: each defense declares its own beside its config
(``Defense.memory``, a ``bulwark.defenses.base.MemoryCost``) and :func:`defense_cost` reads it from the
registry. Shard-sized buffers (anchors, EMA weights, gradient copies) are kept for this rank's shard
only (see DESIGN.md), so they are divided by the world size under every ZeRO stage; the fp32 ones live
where the fp32 master partitions live (host memory when the optimizer is offloaded), the model-dtype
ones where the 16-bit partitions live (host memory under parameter offload). Activation-shaped buffers
(Vaccine's perturbations, RepNoise's logit lens, SMART's softmaxes) are per rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulwark.config import DEFAULT_LORA_TARGETS  # what a run with LoRA and no target_modules trains
from bulwark.errors import BulwarkInputError

if TYPE_CHECKING:
    from bulwark.defenses.base import MemoryCost

GIB = 1024**3

# Host-side reserve on each GPU that no formula above covers: CUDA context (0.5-1 GiB), NCCL
# communicator buffers, DeepSpeed bucket buffers and allocator fragmentation. A rule of thumb, not
# a measurement.
RUNTIME_RESERVE_BYTES = 2 * GIB

# DeepSpeed's estimate_zero3_model_states_mem_needs(additional_buffer_factor=1.5) for host memory.
CPU_BUFFER_FACTOR = 1.5


# HF config.json fields of the models Bulwark knows by name (values from the models' config.json).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": {
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-2-13b-hf": {
        "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-2-70b-hf": {
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    # The embedded default model (DESIGN.md), SmolLM2-135M-Instruct.
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    # A tiny Llama for tests: the plan of a run config whose model.name is "tiny".
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
        "tie_word_embeddings": False,
    },
}
MODEL_ALIASES: dict[str, str] = {
    "embedded": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
    "meta-llama/Llama-2-70b-chat-hf": "meta-llama/Llama-2-70b-hf",
}


def defense_cost(name: str) -> MemoryCost:
    """The memory cost defense ``name`` declares beside its config (``Defense.memory``, see
    ``bulwark.defenses.base.MemoryCost``): a defense registered anywhere is planned without a change here.

    Imported on call: the registry pulls in torch (about 2 s), which `bulwark slurm` never needs.
    """
    from bulwark.defenses import REGISTRY

    cls = REGISTRY.get(name)
    if cls is None:
        raise BulwarkInputError(f"defense.name: {name!r} is not a registered defense; registered: "
                                f"{', '.join(sorted(REGISTRY))} (see `bulwark defenses`)")
    return cls.memory


@dataclass
class MemoryPlan:
    """Bytes per GPU (one rank) for one run, and whether they fit the card."""

    world_size: int
    total_params: int
    trainable_params: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    defense_bytes: int
    activation_bytes: int
    buffer_bytes: int  # ZeRO-3 largest-layer buffer + runtime reserve
    gpu_mem_bytes: int
    cpu_bytes_per_node: int  # host memory for offloaded states (0 without offload)
    cpu_mem_bytes: int | None = None  # host memory per node, when given
    fits: bool = False
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.defense_bytes
                + self.activation_bytes + self.buffer_bytes)

    @property
    def over_bytes(self) -> int:
        """How far the total is above the card's memory (0 when it fits)."""
        return max(0, self.total_bytes - self.gpu_mem_bytes)

    @property
    def cpu_over_bytes(self) -> int:
        """How far the offloaded states exceed the host memory per node (0 when unchecked or fine)."""
        return 0 if self.cpu_mem_bytes is None else max(0, self.cpu_bytes_per_node - self.cpu_mem_bytes)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes per GPU) for display."""
        return [
            ("parameters", self.params_bytes),
            ("gradients", self.grads_bytes),
            ("optimizer states", self.optimizer_bytes),
            ("defense buffers", self.defense_bytes),
            ("activations", self.activation_bytes),
            ("buffers + runtime reserve", self.buffer_bytes),
        ]


def count_params(model_config: dict[str, Any]) -> int:
    """Exact parameter count of a Llama-style decoder from its HF config.json fields.

    Embeddings, attention (q/o: hidden x heads*head_dim, k/v: hidden x kv_heads*head_dim, so GQA is
    counted), SwiGLU MLP (gate, up, down), two RMSNorms per layer, the final norm, and the lm_head
    unless ``tie_word_embeddings``. Optional ``head_dim``, ``attention_bias``, ``mlp_bias`` are honored.
    """
    return model_layout(model_config)["total"]


def count_lora_params(model_config: dict[str, Any], lora: dict[str, Any]) -> int:
    """Trainable LoRA parameters: ``r * (in + out)`` for each targeted linear layer of each layer."""
    shapes = model_layout(model_config)["linear_shapes"]
    r = int(lora.get("r", 8))
    targets = lora.get("target_modules") or DEFAULT_LORA_TARGETS
    if isinstance(targets, str):
        targets = shapes.keys() if targets == "all-linear" else [targets]
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise BulwarkInputError(
            f"model.lora.target_modules: unknown module(s) {unknown}; known: {sorted(shapes)}"
        )
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return per_layer * int(model_config["num_hidden_layers"])


def count_lora_adapted(model_config: dict[str, Any], lora: dict[str, Any]) -> int:
    """Elements of the frozen weights LoRA adapts: ``in * out`` for each targeted linear layer of each layer."""
    count_lora_params(model_config, lora)  # the same target checks, the same one-line errors
    shapes = model_layout(model_config)["linear_shapes"]
    targets = lora.get("target_modules") or DEFAULT_LORA_TARGETS
    if isinstance(targets, str):
        targets = shapes.keys() if targets == "all-linear" else [targets]
    return sum(shapes[t][0] * shapes[t][1] for t in targets) * int(model_config["num_hidden_layers"])


def model_layout(cfg: dict[str, Any]) -> dict[str, Any]:
    try:
        h = int(cfg["hidden_size"])
        inter = int(cfg["intermediate_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise BulwarkInputError(f"model config: missing field {e.args[0]!r} (need an HF config.json)") from e
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    tied = bool(cfg.get("tie_word_embeddings", False))
    attn_bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    shapes = {  # (in_features, out_features)
        "q_proj": (h, heads * head_dim),
        "k_proj": (h, kv * head_dim),
        "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    per_layer = 0
    for name, (fan_in, fan_out) in shapes.items():
        bias = attn_bias if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else mlp_bias
        per_layer += fan_in * fan_out + (fan_out if bias else 0)
    per_layer += 2 * h  # input_layernorm, post_attention_layernorm
    embed = vocab * h
    total = embed + layers * per_layer + h + (0 if tied else vocab * h)
    # DeepSpeed's largest "layer" is the largest single module's own parameters: embedding/lm_head
    # for every Llama here, an MLP projection for very small vocabularies.
    largest = max([embed] + [i * o for i, o in shapes.values()])
    return {
        "total": total, "linear_shapes": shapes, "largest_module": largest, "hidden": h,
        "layers": layers, "heads": heads, "vocab": vocab,
    }


def dtype_bytes(dtype: str) -> int:
    if dtype in ("bf16", "bfloat16", "fp16", "float16"):
        return 2
    if dtype in ("fp32", "float32"):
        return 4
    raise BulwarkInputError(f"model.dtype: {dtype!r} is not one of fp32, bf16, fp16")


def plan_memory(
    model_config: dict[str, Any],
    *,
    nodes: int,
    gpus_per_node: int,
    zero_stage: int = 3,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    dtype: str = "bf16",
    lora: dict[str, Any] | None = None,
    defense: str = "sft",
    micro_batch_size: int = 1,
    seq_len: int = 2048,
    gpu_mem_gib: float = 80.0,
    gradient_checkpointing: bool = False,
    cpu_mem_gib: float | None = None,
    attention: str = "sdpa",
    with_advice: bool = True,
) -> MemoryPlan:
    """Per-GPU memory of a run: parameters, gradients, optimizer, defense buffers, activations.

    ``lora`` is the run config's ``model.lora`` section (used when ``enabled`` is true; keys ``r``,
    ``target_modules``). ``defense`` is a registered defense's name (its cost: :func:`defense_cost`). When the total exceeds
    ``gpu_mem_gib`` the plan's ``advice`` lists changes (offload, more nodes, LoRA, micro batch,
    checkpointing) with the total each gives, computed by re-planning. ``cpu_mem_gib`` (host memory
    per node), when given, must also hold the offloaded states for the plan to fit. ``attention`` is
    ``sdpa`` (fused kernels: no s x s scores stored) or ``eager``.
    """
    if attention not in ("sdpa", "eager"):
        raise BulwarkInputError(f"attention: {attention!r} is not one of sdpa, eager")
    if nodes < 1 or gpus_per_node < 1:
        raise BulwarkInputError(f"nodes and gpus per node must be >= 1 (got nodes={nodes}, gpus_per_node={gpus_per_node})")
    if zero_stage not in (0, 1, 2, 3):
        raise BulwarkInputError(f"zero_optimization.stage: {zero_stage} is not 0, 1, 2 or 3")
    if micro_batch_size < 1 or seq_len < 1:
        raise BulwarkInputError(f"micro batch size and sequence length must be >= 1 (got {micro_batch_size}, {seq_len})")
    if gpu_mem_gib <= 0:
        raise BulwarkInputError(f"gpu memory must be > 0 GiB (got {gpu_mem_gib})")
    cost = defense_cost(defense)
    if (offload_optimizer or offload_param) and zero_stage < 2:
        raise BulwarkInputError("CPU offload needs ZeRO stage 2 or 3 (zero_optimization.stage)")
    if offload_param and zero_stage != 3:
        raise BulwarkInputError("offload_param needs ZeRO stage 3")

    world = nodes * gpus_per_node
    lay = model_layout(model_config)
    total = lay["total"]
    use_lora = bool(lora and lora.get("enabled", True))
    trainable = count_lora_params(model_config, lora) if use_lora else total  # type: ignore[arg-type]
    all_params = total + (trainable if use_lora else 0)
    pb = dtype_bytes(dtype)
    mixed = pb == 2
    grad_b = 4  # fp32 gradient partition (DeepSpeed's 18 = 2 + 4 + 12 under mixed precision)
    opt_b = 12 if mixed else 8  # fp32 master + momentum + variance; fp32 training has no master copy

    # Which states are partitioned across the world, per ZeRO stage.
    p_div = world if zero_stage == 3 else 1
    g_div = world if zero_stage >= 2 else 1
    o_div = world if zero_stage >= 1 else 1

    params = all_params * pb // p_div
    grads = trainable * grad_b // g_div
    optim = trainable * opt_b // o_div
    defense_fp32 = int(cost.fp32_copies * trainable * 4) // world
    if use_lora and cost.adapted_fp32_copies:  # e.g. AsFT's alignment direction V of the adapted frozen weights
        defense_fp32 += int(cost.adapted_fp32_copies * count_lora_adapted(model_config, lora) * 4) // world  # type: ignore[arg-type]
    defense_16 = int(cost.dtype_copies * trainable * pb) // world
    # ZeRO-0/1/2 keep whole weights on every rank, so a defense that rebuilds them keeps a whole copy
    defense_replica = int(cost.replica_dtype_copies * trainable * pb) if zero_stage < 3 else 0
    cpu_per_rank = 0
    if offload_optimizer:
        # Gradients and optimizer states live on the host (DeepSpeed ZeRO-Offload); the defense's fp32
        # buffers sit beside the fp32 master partitions they are combined with, so they move too.
        cpu_per_rank += grads + optim + defense_fp32
        grads = optim = defense_fp32 = 0
    if offload_param:
        # copies of the 16-bit partitions are made where those partitions are
        cpu_per_rank += params + defense_16
        params = defense_16 = 0
    defense_b = defense_fp32 + defense_16 + defense_replica
    cpu_per_node = int(cpu_per_rank * gpus_per_node * CPU_BUFFER_FACTOR)

    h, layers, heads, vocab = lay["hidden"], lay["layers"], lay["heads"], lay["vocab"]
    s, b = seq_len, micro_batch_size
    act_scale = pb / 2  # the paper's figures are for 16-bit activations
    scores = 5 * heads * s / h if attention == "eager" else 0  # the s x s scores only eager attention keeps
    full_layer = s * b * h * (34 + scores) * act_scale
    if gradient_checkpointing:
        per_model = layers * 2 * s * b * h * act_scale + full_layer
    else:
        per_model = layers * full_layer
    logits = s * b * vocab * (pb + 4)
    # a defense's extra graphs are whole forwards (stacked rows or a second pass), logits included
    activations = int((per_model + logits) * cost.activation_factor)
    activations += int(layers * s * b * h * (cost.layer_outputs * pb + cost.layer_outputs_fp32 * 4))
    activations += int(s * b * vocab * 4 * (cost.logits_fp32 + cost.logits_fp32_per_layer * layers))

    buffers = RUNTIME_RESERVE_BYTES + (4 * lay["largest_module"] if zero_stage == 3 else 0)

    plan = MemoryPlan(
        world_size=world, total_params=total, trainable_params=trainable, params_bytes=params,
        grads_bytes=grads, optimizer_bytes=optim, defense_bytes=defense_b, activation_bytes=activations,
        buffer_bytes=buffers, gpu_mem_bytes=int(gpu_mem_gib * GIB), cpu_bytes_per_node=cpu_per_node,
        cpu_mem_bytes=None if cpu_mem_gib is None else int(cpu_mem_gib * GIB),
    )
    plan.fits = plan.total_bytes <= plan.gpu_mem_bytes and plan.cpu_over_bytes == 0
    plan.notes.append(f"defense {defense}: {cost.what}")
    if not gradient_checkpointing:
        plan.notes.append(f"activations counted without checkpointing, {attention} attention (Korthikanti et al. 2022"
                          + (", s x s scores included)" if attention == "eager" else ", no s x s scores stored)"))
    if cpu_per_node:
        plan.notes.append(f"host memory for offloaded states: {cpu_per_node / GIB:.1f} GiB per node")

    if with_advice and not plan.fits:
        args: dict[str, Any] = dict(
            nodes=nodes, gpus_per_node=gpus_per_node, zero_stage=zero_stage,
            offload_optimizer=offload_optimizer, offload_param=offload_param, dtype=dtype, lora=lora,
            defense=defense, micro_batch_size=micro_batch_size, seq_len=seq_len, gpu_mem_gib=gpu_mem_gib,
            gradient_checkpointing=gradient_checkpointing, cpu_mem_gib=cpu_mem_gib, attention=attention,
        )
        plan.advice = _advice(model_config, args)
    return plan


def checkpoint_bytes(model_config: dict[str, Any], *, lora: dict[str, Any] | None = None,
                     defense: str = "sft") -> int:
    """Disk for one DeepSpeed checkpoint of a run, all ranks together.

    The optimizer-state files hold the fp32 master weights and both AdamW moments of the trainable
    parameters (12 bytes each, also for fp32 training); ZeRO-3's model-state files hold shapes only;
    each rank's `bulwark_rank<r>.pt` holds the defense's fp32 copies (Lisa's anchor, SMART's EMA: 4 bytes
    each; counted for every declared copy, so an upper bound for defenses whose copies only live inside
    a step, Booster's). Measured on the tiny Llama (Lisa, bf16, ZeRO-3, 2 ranks): 12.3 + 5.1 bytes per
    parameter, the excess being pickle headers and RNG states that do not grow with the model.
    """
    from bulwark.defenses import REGISTRY

    use_lora = bool(lora and lora.get("enabled", True))
    trainable = count_lora_params(model_config, lora) if use_lora else count_params(model_config)  # type: ignore[arg-type]
    copies = REGISTRY[defense].memory.fp32_copies if defense in REGISTRY else 0
    return int(trainable * (12 + 4 * copies))


def _advice(model_config: dict[str, Any], args: dict[str, Any]) -> list[str]:
    """Each change that lowers memory, with the per-GPU total it gives (re-planned)."""

    def total_with(**change: Any) -> MemoryPlan:
        return plan_memory(model_config, **{**args, **change, "with_advice": False})

    def line(what: str, p: MemoryPlan) -> str:
        verdict = "fits" if p.fits else "still over"
        if p.cpu_over_bytes:
            verdict += f", host memory over by {p.cpu_over_bytes / GIB:.0f} GiB per node"
        return f"{what}: {p.total_gib:.1f} GiB per GPU ({verdict})"

    out: list[str] = []
    if args["zero_stage"] < 3:
        out.append(line("use ZeRO-3 (launch.ds_config: ds_configs/zero3.json)", total_with(zero_stage=3)))
    stage = max(args["zero_stage"], 2)
    if not args["offload_optimizer"]:
        out.append(line("offload optimizer states to CPU (zero_optimization.offload_optimizer)",
                        total_with(zero_stage=stage, offload_optimizer=True)))
    if not args["offload_param"]:
        out.append(line("offload optimizer and parameters to CPU (launch.ds_config: ds_configs/zero3_offload.json)",
                        total_with(zero_stage=3, offload_optimizer=True, offload_param=True)))
    if args["zero_stage"] >= 2:
        for n in range(args["nodes"] + 1, 129):
            p = total_with(nodes=n)
            if p.fits:
                out.append(line(f"use more nodes: {n} nodes x {args['gpus_per_node']} GPUs", p))
                break
        else:
            floor = total_with(nodes=1024)
            out.append(f"more nodes alone cannot fit it: at 1024 nodes still {floor.total_gib:.1f} GiB per GPU "
                       "(activations and buffers do not shrink with the world size)")
    if not (args["lora"] and args["lora"].get("enabled", True)):
        lora = {"enabled": True, "r": 16, "target_modules": list(DEFAULT_LORA_TARGETS)}
        out.append(line("train LoRA adapters instead (model.lora.enabled=true, r=16)", total_with(lora=lora)))
    if args["micro_batch_size"] > 1:
        out.append(line("train.micro_batch_size=1 (raise train.grad_accum to keep the global batch)",
                        total_with(micro_batch_size=1)))
    if not args["gradient_checkpointing"]:
        out.append(line("activation checkpointing (train.gradient_checkpointing=true)",
                        total_with(gradient_checkpointing=True)))
    return out


def resolve_model_config(name: str) -> dict[str, Any]:
    """HF config fields for a run config's ``model.name``.

    Accepts a local HF folder (reads its config.json), a config.json path, ``"embedded"``,
    ``"tiny"``, or a name in :data:`KNOWN_MODELS` / :data:`MODEL_ALIASES`.
    """
    key = MODEL_ALIASES.get(name, name)
    if key in KNOWN_MODELS:
        return dict(KNOWN_MODELS[key])
    p = Path(name).expanduser()
    cfg_file = p / "config.json" if p.is_dir() else p
    if cfg_file.is_file() and cfg_file.suffix == ".json":
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BulwarkInputError(f"{cfg_file}: cannot read model config ({e})") from e
        return cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    raise BulwarkInputError(
        f"model.name {name!r}: no local folder with config.json and not a known model; "
        f"use a local HF folder or one of: {', '.join(sorted(set(KNOWN_MODELS) | set(MODEL_ALIASES)))}"
    )
