"""SMART: smoothness-inducing adversarial regularization + Bregman proximal point (Jiang et al., 2020).

"SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language Models through Principled
Regularized Optimization", ACL 2020; here at the fine-tuning stage. Every micro-batch minimises

    L(θ) = CE(f(x; θ), y) + λ_s SymKL(f(x; θ), f(x + δ; θ)) + μ SymKL(f(x; θ), f(x; θ_ema))

    SymKL(p, q) = mean over the attended tokens t of  KL(p_t || q_t) + KL(q_t || p_t)

with f the model's next-token distributions. The second term is the smoothness-inducing regulariser
R_s, δ a perturbation of the input embeddings (one vector per token) found by projected ascent:

    δ ~ N(0, σ² I) on attended tokens, then K times, with f(x; θ) held fixed:
        g = ∇_δ D(f(x; θ), f(x + δ; θ));   δ ← clip(δ + η g / ||g||_∞, -ε, ε)

with D the ascent divergence (`ascent_divergence`) and ||g||_∞ taken per token (`normalize="token"`) or
over each row's whole (tokens, hidden) block (`normalize="example"`); the clip is per entry either way.
The third term is the Bregman proximal point term D_Breg (the paper's momentum form): θ_ema starts at
the initial trainable weights and after every optimizer step θ_ema ← β θ_ema + (1 - β) θ.
Defaults: the reference code's values (namisan/mt-dnn: adv_noise_var σ = 1e-5, adv_step_size η = 1e-5,
adv_epsilon ε = 1e-6, adv_k K = 1, adv_alpha λ_s = 1) and the paper's (μ = 1, β = 0.99). At these
values SMART does not act: R_s is ~3e-11 (tiny test Llama) / ~1.5e-9 (SmolLM2-135M) and moves a
step's gradient by ~2e-7 / ~9e-7 of its norm, about float32 rounding (the issue-19 check: ~7e-8 of
the update); choosing values that act is the defense-table issue's work, on validation prompts.

Where the paper (Algorithm 1) and mt-dnn's code differ, both are offered:
- Projection (`projection`): the paper's by default ("ball": normalise the gradient, step, clip δ to
  the ε ball). mt-dnn's code instead rescales δ + η g to ∞-norm 1, ε only keeping the division finite
  ("unit"): |δ| ~ 1 whatever η is, and with η = 1e-5 it is mostly the normalised initial noise. With
  the ball and ε = 1e-6, R_s is tiny: the term is nearly inert at the defaults, as in the paper's
  equations; "unit" reproduces the reference code's much larger perturbation.
- Ascent divergence (`ascent_divergence`): the paper ascends ℓ_s itself, the SymKL it then minimises
  ("symmetric", the default). mt-dnn's code ascends a one-sided KL against the detached clean
  prediction: its first release KL(f(x) || f(x + δ)) (F.kl_div with the clean softmax as target:
  "forward"), its current one stable_kl(adv, clean) ≈ 2 KL(f(x + δ) || f(x)) in log-odds ("reverse";
  here in log-probabilities without the factor 2, which only the "unit" projection sees). Default
  symmetric because it is the paper's and the shipped behaviour, and because at the defaults the
  choice does not matter: the three divergences vanish at δ = 0 with the same Hessian (the Fisher
  information), so while |δ| is small against the embeddings the normalised ascent direction is the
  same (measured at the defaults: cos(δ_forward, δ_symmetric) = 1.0000 on the tiny Llama, 0.9988 on
  SmolLM2-135M, R_s within 2%). They part only for perturbations the size of the embeddings
  (tests/test_smart.py uses |δ| ~ 0.05).
- Gradient normalisation (`normalize`): mt-dnn's default (norm_level 0) divides g by each token's
  ∞-norm ("token", the default); the paper's Algorithm 1 by the whole example's ("example"). Default
  per token because it is the better ascent on the paper's own objective: the linearised maximiser
  over the ε ball is ε sign(g) on every entry, and with η ≥ ε a per-token step puts every token on the
  ball's surface, where a per-example step leaves tokens with small gradients nearly unperturbed
  (measured at the defaults: R_s 11% lower per example on the tiny Llama, 4.6x lower on SmolLM2-135M;
  docs/DEFENSES.md). It is also the shipped behaviour, so results at the defaults are unchanged.
Where Bulwark differs from both, and why:
- Reduction: the mean over attended tokens (the CE convention of `bulwark.losses`) instead of
  mt-dnn's sum over classes / batch size: a causal LM has one output distribution per token.
- Gradient: the loss above is differentiated as written (both KL directions, both arguments; only
  θ_ema and, in R_s's ascent, the clean output are constants). mt-dnn's criterion detaches the target
  of each KL direction.
- Precision: with bf16 weights the embeddings are bf16, and perturbations of 1e-6 round away on all
  but the smallest entries; the defaults act as intended in fp32 (raise η, ε, σ for bf16 runs).

Passes per micro-batch, all at the same weights (B rows):
1. μ > 0: f(x; θ_ema) without grad. Under ZeRO-3 the engine swaps its local model-dtype weight
   partitions for the EMA shard and back (`swapped_weights`), so no rank holds more than its usual
   share. Under ZeRO-1/2 (whole weights on every rank anyway) the EMA shards are all-gathered into
   whole weights once per optimizer step and the module is called functionally with them.
2. ascent: clean and perturbed inputs stacked into one batch of 2B rows through `engine.module`,
   gradient w.r.t. δ only (`torch.autograd.grad`).
3. stepping: the same stacked batch with the final δ through `engine.forward_logits`: one forward
   and one backward through the engine, the only shape that is correct under ZeRO-3 (DESIGN.md).
δ enters through a forward hook on the input embedding module, out of place, so ZeRO-3 gathers the
embedding weight inside its own forward as usual. Passes 1 and 2 each keep their own ZeRO-3 prefetch
trace (`Engine.extra_pass`; `own_trace=false` turns it off): with one trace for three differently
shaped passes, ZeRO-3 dropped it every pass and fetched every module on demand (3.5x SFT instead of
2.3x, tiny model, 2 ranks). The softmax of each set of logits is computed once and shared by the CE
and both SymKL terms.

Cost floor: per micro-batch 1 no-grad forward of B rows (EMA), 2B rows forward + input-only backward
(ascent), 2B rows forward + backward (stepping). In passes over the model that is 5 against SFT's 2
(fetch/communication-bound: ~2.5x); in row-work, counting a backward as two forwards and an
input-only backward as one, 1 + 2 + 2 + 6 = 11 against 3 (compute-bound: ~3.7x; 3.3x would need the
ascent's clean rows in a separate no-grad forward, which costs one more pass over the model). The
issue's 2.2x target is below both floors.

ZeRO-3: the EMA is a copy of this rank's flat fp32 master shard only (trainable bytes / world size),
updated in place after each optimizer step; it and the noise generator go into the per-rank checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bulwark.defenses.base import Defense, MemoryCost, TrainingView, register
from bulwark.errors import BulwarkInputError
from bulwark.losses import causal_lm_nll

Batch = dict[str, torch.Tensor]
LAYOUT_ERROR = ("SMART: the optimizer's flat shards are not the trainable weights in order (the ZeRO-1/2 "
                "layout the EMA forward assumes there); use launch.ds_config=zero3 or defense.mu=0")


@dataclass
class SmartConfig:
    lambda_s: float = 1.0  # weight of the smoothness regulariser R_s (mt-dnn adv_alpha)
    mu: float = 1.0  # weight of the Bregman proximal term (paper)
    beta: float = 0.99  # momentum of the EMA weights θ_ema (paper)
    # σ, η, ε: 1e4 x mt-dnn's (1e-5, 1e-5, 1e-6), where R_s acts: at mt-dnn's values it moves the update by
    # ~1e-6 of its norm on SmolLM2, here by ~4.5% (bench/smart_sweep.py); chosen on validation prompts
    # (configs/smart_sweep.yaml, docs/DEFENSES.md), lambda_s 1 over 10 for its lower over-refusal
    noise_std: float = 1e-1  # σ: standard deviation of δ's initial noise (mt-dnn adv_noise_var: 1e-5)
    step_size: float = 1e-1  # η: ascent step on δ (mt-dnn adv_step_size: 1e-5)
    epsilon: float = 1e-2  # ε: per-token ∞-norm radius of δ (mt-dnn adv_epsilon: 1e-6)
    ascent_steps: int = 1  # K (mt-dnn adv_k)
    projection: str = "ball"  # "ball": clip δ to the ε ball (paper); "unit": mt-dnn's rescaling to ∞-norm 1
    # what the ascent maximises: "symmetric" SymKL (paper); "forward" KL(f(x) || f(x + δ)) (mt-dnn's first
    # release); "reverse" KL(f(x + δ) || f(x)) (mt-dnn's current stable_kl); the clean side is held fixed
    ascent_divergence: str = "symmetric"
    # where the ascent gradient is normalised (and "unit" rescales): "token" per token (mt-dnn's default,
    # norm_level 0), "example" over each row's whole (tokens, hidden) block (the paper's Algorithm 1)
    normalize: str = "token"
    seed: int = 0  # noise generator seed; rank r draws from its own stream
    # ZeRO-3: the EMA and ascent passes each keep their own parameter-prefetch trace (faster; may hold
    # up to a prefetch bucket more gathered: docs/DEFENSES.md); false shares the stepping pass's trace
    own_trace: bool = True


def sym_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens with mask 1 of KL(p||q) + KL(q||p), in fp32; logits are (batch, tokens, vocab)."""
    return sym_kl_of(Distribution(p_logits), Distribution(q_logits), mask)


class Distribution:
    """log-probabilities and probabilities of one set of logits, computed once and shared by every
    SymKL and the CE that read them (a vocabulary-sized softmax is a large part of a small model's step)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.log = F.log_softmax(logits.float(), dim=-1)
        self.prob = self.log.exp()


def sym_kl_of(p: Distribution, q: Distribution, mask: torch.Tensor) -> torch.Tensor:
    # KL(p||q) + KL(q||p) = sum_v (p_v - q_v)(log p_v - log q_v)
    per_token = ((p.prob - q.prob) * (p.log - q.log)).sum(-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


ASCENT_DIVERGENCES = ("symmetric", "forward", "reverse")
NORMALIZATIONS = ("token", "example")


def kl_of(p: Distribution, q: Distribution, mask: torch.Tensor) -> torch.Tensor:
    """Mean over tokens with mask 1 of KL(p || q)."""
    per_token = (p.prob * (p.log - q.log)).sum(-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def ascent_objective(clean: Distribution, perturbed: Distribution, mask: torch.Tensor, divergence: str) -> torch.Tensor:
    """What the ascent on δ maximises (`SmartConfig.ascent_divergence`); `clean` is held fixed by the caller."""
    if divergence == "forward":
        return kl_of(clean, perturbed, mask)
    if divergence == "reverse":
        return kl_of(perturbed, clean, mask)
    return sym_kl_of(clean, perturbed, mask)


def _inf_norm(x: torch.Tensor, normalize: str) -> torch.Tensor:
    # "token": over the last dim (hidden); "example": over all dims but the first (row)
    dims = -1 if normalize == "token" else tuple(range(1, x.dim()))
    return x.abs().amax(dim=dims, keepdim=True)


def project_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float, epsilon: float,
                 projection: str = "ball", normalize: str = "token") -> torch.Tensor:
    """One ascent step on δ (rows, tokens, hidden). "ball": δ + η g / ||g||_∞ clipped to the ∞-norm
    ε ball (a zero gradient leaves δ as it is); "unit": (δ + η g) / (||δ + η g||_∞ + ε), as mt-dnn's
    code. The ∞-norms are per token or per row (`normalize`); the ε ball's clip is per entry either way."""
    if projection == "unit":
        step = delta + step_size * grad
        return step / (_inf_norm(step, normalize) + epsilon)
    scale = _inf_norm(grad, normalize).clamp_min(torch.finfo(grad.dtype).tiny)
    return (delta + step_size * grad / scale).clamp(-epsilon, epsilon)


@register
class Smart(Defense):
    name = "smart"
    stages = ("finetune",)
    Config = SmartConfig
    summary = "adversarial smoothness on input embeddings + proximal pull to an EMA of the weights (SymKL)"
    # attach(): self.ema = a clone of every local fp32 shard; ZeRO-1/2: _full_ema, whole weights, all step long;
    # loss(): clean + perturbed rows stacked (2x rows); fp32 (s, b, v) beyond that: log + prob of 3
    # Distributions (+4 over SFT's 2), both sym_kl_of's saved differences (4), causal_lm_nll's reshape copy of
    # the shifted log-probs (1), the EMA Distribution's 16-bit logits (~0.5)
    memory = MemoryCost(fp32_copies=1, replica_dtype_copies=1, activation_factor=2, logits_fp32=9.5,
                        what="EMA weights (fp32, sharded); clean + perturbed rows; fp32 softmaxes and SymKL terms")

    def __init__(self, config: SmartConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        checks = [
            (config.lambda_s >= 0 and config.mu >= 0, "defense.lambda_s and defense.mu must be >= 0"),
            (0.0 <= config.beta <= 1.0, "defense.beta must be in [0, 1]"),
            (config.noise_std >= 0 and config.step_size >= 0, "defense.noise_std and defense.step_size must be >= 0"),
            (config.epsilon > 0, "defense.epsilon must be > 0"),
            (config.ascent_steps >= 0, "defense.ascent_steps must be >= 0"),
            (config.projection in ("ball", "unit"), "defense.projection must be ball or unit"),
            (config.ascent_divergence in ASCENT_DIVERGENCES,
             f"defense.ascent_divergence must be one of {', '.join(ASCENT_DIVERGENCES)}"),
            (config.normalize in NORMALIZATIONS, f"defense.normalize must be one of {', '.join(NORMALIZATIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BulwarkInputError(message)
        self.ema: list[torch.Tensor] = []  # this rank's flat fp32 shards of θ_ema
        self.steps_done = 0
        self.generator = torch.Generator()
        self._offset: torch.Tensor | None = None  # added to the input embeddings while set
        self._full_ema: dict[str, torch.Tensor] | None = None  # fallback path: full EMA weights, per step
        self._hidden = 0  # embedding width, read in attach
        self._partitioned = False  # ZeRO-3: weights live as shards, the EMA forward swaps them in
        self._last: dict[str, float] = {}

    # ---- set-up ----------------------------------------------------------------------------------

    def attach(self, engine: TrainingView) -> None:
        self.ema = [shard.detach().clone() for shard in engine.local_shards()]
        # drawn where the embeddings live (on a GPU a CPU draw of rows x tokens x hidden normals and
        # its copy cost ~10% of a 1B step); distinct streams per rank, saved with the checkpoint, so
        # resume is exact
        self.generator = torch.Generator(device=next(engine.module.parameters()).device)
        self.generator.manual_seed(self.config.seed * 1_000_003 + engine.rank)
        embeddings = engine.module.get_input_embeddings()
        self._hidden = int(embeddings.embedding_dim)
        embeddings.register_forward_hook(self._perturb_embeddings)
        self._partitioned = engine.partitioned
        if self.config.mu > 0 and not self._partitioned:
            self._check_fallback(engine)

    def _perturb_embeddings(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self._offset is None:
            return None
        if output.shape != self._offset.shape:
            raise RuntimeError(f"SMART: embedding output {tuple(output.shape)} != perturbation {tuple(self._offset.shape)}")
        return output + self._offset.to(output.dtype)

    @contextmanager
    def _perturbed(self, offset: torch.Tensor) -> Iterator[None]:
        self._offset = offset
        try:
            yield
        finally:
            self._offset = None

    # ---- the loss --------------------------------------------------------------------------------

    def loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        cfg = self.config
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = ids.size(0)
        ema = None
        if cfg.mu > 0:
            with torch.no_grad():
                ema = Distribution(self._ema_logits(engine, batch))
        if cfg.lambda_s > 0:
            stacked = {"input_ids": torch.cat([ids, ids]), "attention_mask": torch.cat([mask, mask])}
            delta = self._adversarial_delta(engine, stacked, rows)
            with self._perturbed(torch.cat([torch.zeros_like(delta), delta])):
                logits = engine.forward_logits(stacked)
        else:
            logits = engine.forward_logits({"input_ids": ids, "attention_mask": mask})
        clean = Distribution(logits[:rows])
        ce = causal_lm_nll(clean.log, batch["labels"])
        total = ce
        self._last = {"smart_ce": ce.item()}
        if cfg.lambda_s > 0:
            smooth = sym_kl_of(clean, Distribution(logits[rows:]), mask)
            total = total + cfg.lambda_s * smooth
            self._last["smart_smooth"] = smooth.item()
        if ema is not None:
            breg = sym_kl_of(clean, ema, mask)
            total = total + cfg.mu * breg
            self._last["smart_breg"] = breg.item()
        return total

    def _pass(self, engine: TrainingView, kind: str) -> AbstractContextManager:
        return engine.extra_pass(kind) if self.config.own_trace else nullcontext()

    def _adversarial_delta(self, engine: TrainingView, stacked: Batch, rows: int) -> torch.Tensor:
        """δ after K projected ascent steps on the ascent divergence of f(x) (fixed) and f(x + δ); pad
        tokens stay unperturbed."""
        cfg = self.config
        mask = stacked["attention_mask"][:rows]
        keep = mask.unsqueeze(-1).float()
        tokens = mask.size(1)
        # one draw per row: a micro-batch of 2B rows sees the same noise as two of B (grad accumulation)
        noise = torch.stack([torch.randn(tokens, self._hidden, generator=self.generator, device=self.generator.device)
                             for _ in range(rows)])
        delta = noise.to(keep.device) * cfg.noise_std * keep
        clean = None
        for _ in range(cfg.ascent_steps):
            delta = delta.detach().requires_grad_(True)
            with self._pass(engine, "smart-ascent"):
                if clean is None:  # first step: clean and perturbed rows in one pass
                    with self._perturbed(torch.cat([torch.zeros_like(delta), delta])):
                        logits = engine.module(**stacked).logits
                    clean, perturbed = Distribution(logits[:rows].detach()), logits[rows:]
                else:
                    with self._perturbed(delta):
                        perturbed = engine.module(input_ids=stacked["input_ids"][:rows], attention_mask=mask).logits
                objective = ascent_objective(clean, Distribution(perturbed), mask, cfg.ascent_divergence)
                (grad,) = torch.autograd.grad(objective, delta)
            delta = project_step(delta.detach(), grad, cfg.step_size, cfg.epsilon, cfg.projection, cfg.normalize) * keep
        return delta.detach()

    def _ema_logits(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            if self._partitioned:
                with engine.swapped_weights(self.ema), self._pass(engine, "smart-ema"):
                    return engine.module(**inputs).logits
            if self._full_ema is None:
                self._full_ema = {name: value.to(p.dtype) for (name, p), value in
                                  zip(engine.trainable_parameters(), self._unflatten(engine, self.ema), strict=True)}
            return torch.func.functional_call(engine.module, self._full_ema, args=(), kwargs=inputs).logits

    # ---- the EMA forward without ZeRO-3 ------------------------------------------------------------

    def _unflatten(self, engine: TrainingView, shards: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full weights from per-rank flat shards in ZeRO-1/2's layout: the trainable weights flattened
        in order, padded at the end, split evenly over the ranks (checked once in attach)."""
        pieces = []
        for shard in shards:
            full = shard.new_zeros(shard.numel() * engine.world_size)
            full[engine.rank * shard.numel():(engine.rank + 1) * shard.numel()] = shard.detach()
            pieces.append(engine.all_reduce_sum(full))
        flat = torch.cat(pieces)
        params = engine.trainable_parameters()
        if flat.numel() < sum(p.numel() for _, p in params):
            raise RuntimeError(LAYOUT_ERROR)
        out, offset = [], 0
        for _, p in params:
            out.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out

    def _check_fallback(self, engine: TrainingView) -> None:
        params = engine.trainable_parameters()
        full = self._unflatten(engine, engine.local_shards())
        if not all(torch.equal(value.to(p.dtype), p.detach()) for (_, p), value in zip(params, full, strict=True)):
            raise RuntimeError(LAYOUT_ERROR)

    # ---- after the step, state --------------------------------------------------------------------

    def after_step(self, engine: TrainingView, step: int) -> None:
        beta = self.config.beta
        for ema, shard in zip(self.ema, engine.local_shards(), strict=True):
            ema.mul_(beta).add_(shard.detach(), alpha=1.0 - beta)
        self.steps_done = step
        self._full_ema = None

    def metrics(self) -> dict[str, Any]:
        return dict(self._last)  # this rank's terms on its last micro-batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": [e.clone() for e in self.ema],
            "steps_done": self.steps_done,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for ema, saved in zip(self.ema, state["ema"], strict=True):
            ema.copy_(saved)
        self.steps_done = state["steps_done"]
        self.generator.set_state(state["generator"])
        self._full_ema = None
