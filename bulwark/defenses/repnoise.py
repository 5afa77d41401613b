"""RepNoise: representation noising against harmful fine-tuning (Rosati et al., 2024).

"Representation Noising: A Defence Mechanism Against Harmful Finetuning", NeurIPS 2024
(domenicrosati/representation-noising). Alignment pushes the representations of harmful text
towards Gaussian noise and away from predicting the harmful answer, while keeping the refusals:

    L = CE(harmless) + β · (1/L) Σ_l MMD(a_l(harmful), N(0, I)) - α · log( H / (L + 1) + 1 )

    H = CE(f(harmful)) + Σ_{i=0..L} CE(lm_head(norm(h_i(harmful))))

with, as in the reference loss:
- a_l the output of decoder layer l's MLP on the harmful batch, zeroed outside the harmful answer
  tokens and flattened to one vector per row; the noise is drawn with the same shape (rows, padded
  tokens, width) and masked the same way;
- MMD the biased MMD² estimate mean(K_xx + K_yy - K_xy - K_yx) with a sum of 5 Gaussian kernels
  exp(-d² / (s · 2^k)), k = 0..4, s = (Σ_ij d²_ij / (n² - n)) / 2² over the n = 2 · rows pooled
  samples (the bandwidth is a constant: no gradient flows through it);
- h_0..h_L the model's hidden states (embeddings, then each decoder layer; transformers hands the
  last one out after the final norm, and the reference normalises it once more, as here), so H sums
  L + 2 cross entropies and is divided by L + 1: the reference's "logit lens" ascent term;
- CE the mean next-token cross entropy over the answer tokens (`bulwark.losses.causal_lm_loss`).
Defaults: β = 0.001, α = 1 (the reference's and the issue's); 5 kernels with multiplier 2. At β = 1e-3
the MMD term moves a step's update by about 1e-6 (issue 19): it barely acts; choosing values that act
is the defense-table issue's work, on validation prompts.

Where this differs from the reference and why:
- Masks: the reference pairs each harmful row with a harmless row of the same question and masks
  the tokens where the two differ. Bulwark's streams are not paired, so the answer tokens
  (labels != -100) of each batch are used: the same tokens when the pairs share their prompt.
- CE: the plain causal-LM CE of the loop over all answer tokens, for all terms. The reference's CE
  multiplies the logits by the answer mask shifted one token (and drops token id 0), which zeroes the
  logits predicting the FIRST answer token: its loss is the constant log V and it gets no gradient,
  in the refusal CE and in every term of the harmful ascent. Kept plain because that token is where
  the model refuses or complies and the paper's loss is a plain CE; measured, one step at the
  defaults: the reference form changes the gradient by 13% of its norm on SmolLM2-135M (19% on the
  tiny test Llama), whose first answer token is its least learned (refusal CE 3.36 against 2.16 for
  the rest). docs/DEFENSES.md has the numbers.
- d² is computed from the Gram matrix (|x|² + |y|² - 2 x·y, clamped at 0) instead of broadcasting
  the (n, n, d) differences: same value up to rounding, O(n · d) memory instead of O(n² · d).

One pass: the refusal batch and the harmful batch are stacked (right-padded to one length) into ONE
forward through the engine with output_hidden_states=True and split afterwards, so one forward and
one backward go through DeepSpeed, the shape that is correct under ZeRO-3. The MLP outputs come from
forward hooks; the logit-lens terms call the final norm and lm_head again after the forward (ZeRO-3
gathers them as for any module call). Cost: a forward/backward of twice the rows, plus L + 1 extra
lm_head projections of the harmful rows (`logit_lens=false` keeps only CE(f(harmful)) in H; for a
large vocabulary these projections are the main cost).

Data parallel: the loss, MMD included, is per rank (over this rank's micro-batch) and DeepSpeed
averages the gradients over ranks and micro-batches. Since MMD and log are not linear in the batch,
accumulating k micro-batches equals k ranks with one micro-batch each, not one micro-batch of k·b
rows (neither does the reference's per-batch loss). The noise generator is seeded per rank and saved
with the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bulwark.defenses.base import Defense, MemoryCost, Stream, TrainingView, register
from bulwark.defenses.perturbation import StackedSideBatch
from bulwark.errors import BulwarkInputError
from bulwark.losses import IGNORE_INDEX, causal_lm_loss

Batch = dict[str, torch.Tensor]


@dataclass
class RepNoiseConfig:
    beta: float = 0.001  # β: weight of the MMD to Gaussian noise
    alpha: float = 1.0  # α: weight of the -log(harmful loss + 1) ascent term
    kernel_num: int = 5  # Gaussian kernels in the MMD (reference MMD_loss)
    kernel_mul: float = 2.0  # ratio between successive kernel bandwidths (reference MMD_loss)
    logit_lens: bool = True  # ascent on every hidden state's lm_head(norm(h)) (reference) or the output only
    seed: int = 0  # noise generator seed; rank r draws from its own stream


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, kernel_num: int = 5, kernel_mul: float = 2.0) -> torch.Tensor:
    """Biased MMD² between the rows of x and y (both (n, d), fp32) with a sum of Gaussian kernels."""
    total = torch.cat([x, y])
    sq = total.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * total @ total.T).clamp_min(0.0)
    n = total.size(0)
    bandwidth = d2.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    kernels = sum(torch.exp(-d2 / (bandwidth * kernel_mul**k)) for k in range(kernel_num))
    b = x.size(0)
    return (kernels[:b, :b] + kernels[b:, b:] - kernels[:b, b:] - kernels[b:, :b]).mean()


def decoder_mlps(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The MLP of every decoder layer, in depth order (works through PEFT wrappers)."""
    layers = [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers or not all(hasattr(layer, "mlp") for layer in layers):
        raise BulwarkInputError(
            f"repnoise: found no '*DecoderLayer' modules with an 'mlp' in {type(module).__name__}"
        )
    return [layer.mlp for layer in layers]


@register
class RepNoise(Defense):
    name = "repnoise"
    stages = ("align",)
    Config = RepNoiseConfig
    side_streams = ("harmful",)
    summary = "refusal CE + β·MMD(harmful MLP outputs, Gaussian noise) - α·log(harmful CE + 1)"
    # loss(): refusal + harmful rows stacked (2x rows); noise_mmd keeps torch.cat([x, noise]) in fp32 per layer
    # (2); harmful_ce's logit lens keeps per hidden state (layers + 1) an fp32 log-softmax over the vocabulary
    # and RMSNorm's fp32 input + the 16-bit normed input lm_head saves (~2 fp32 of (s, b, h))
    memory = MemoryCost(activation_factor=2, layer_outputs_fp32=4, logits_fp32=1, logits_fp32_per_layer=1,
                        what="2x rows in one forward; fp32 MMD inputs per layer; logit lens: one fp32 "
                             "log-softmax per hidden state (logit_lens=false drops it)")

    def __init__(self, config: RepNoiseConfig, total_steps: int) -> None:
        super().__init__(config, total_steps)
        if config.beta < 0 or config.alpha < 0:
            raise BulwarkInputError("defense.beta and defense.alpha must be >= 0")
        if config.kernel_num < 1 or config.kernel_mul <= 0:
            raise BulwarkInputError("defense.kernel_num must be >= 1 and defense.kernel_mul > 0")
        self.generator = torch.Generator()
        self.harmful = StackedSideBatch("harmful", "repnoise")
        self._capturing = False
        self._mlp_outputs: list[torch.Tensor] = []
        self._last: dict[str, float] = {}

    def attach(self, engine: TrainingView) -> None:
        # drawn where the activations live (a CPU stream would dominate a GPU step: the noise has the
        # size of every layer's activations); distinct streams per rank, saved with the checkpoint
        self.generator = torch.Generator(device=next(engine.module.parameters()).device)
        self.generator.manual_seed(self.config.seed * 1_000_003 + engine.rank)
        for mlp in decoder_mlps(engine.module):
            mlp.register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._capturing:  # only the stepping forward (not a recomputation in backward)
            self._mlp_outputs.append(output)

    def next_batch(self, streams: dict[str, Stream], step: int) -> Batch:
        self.harmful.draw(streams)
        return streams["main"].next_batch()

    def loss(self, engine: TrainingView, batch: Batch) -> torch.Tensor:
        stacked, rows = self.harmful.stack(batch)
        self._mlp_outputs = []
        self._capturing = True
        try:
            out = engine.forward_outputs(stacked, output_hidden_states=True)
        finally:
            self._capturing = False
        labels = stacked["labels"]
        harmless_ce = causal_lm_loss(out.logits[:rows], labels[:rows])
        mmd = self.noise_mmd([a[rows:] for a in self._mlp_outputs], labels[rows:])
        self._mlp_outputs = []
        harmful_ce = self.harmful_ce(engine, out, rows, labels[rows:])
        cfg = self.config
        loss = harmless_ce + cfg.beta * mmd - cfg.alpha * torch.log(harmful_ce + 1.0)
        self._last = {"repnoise_harmless_ce": float(harmless_ce.detach()), "repnoise_mmd": float(mmd.detach()),
                      "repnoise_harmful_ce": float(harmful_ce.detach())}
        return loss

    def noise_mmd(self, activations: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """(1/L) Σ_l MMD(masked a_l rows, masked N(0, I) rows), noise drawn layer by layer."""
        mask = (labels != IGNORE_INDEX).unsqueeze(-1)
        total = torch.zeros((), device=labels.device)
        for a in activations:
            noise = torch.randn(a.shape, generator=self.generator, device=self.generator.device).to(a.device)
            x = (a.float() * mask).flatten(1)
            y = (noise * mask).flatten(1)
            total = total + gaussian_mmd(x, y, self.config.kernel_num, self.config.kernel_mul)
        return total / len(activations)

    def harmful_ce(self, engine: TrainingView, out: Any, rows: int, labels: torch.Tensor) -> torch.Tensor:
        """H / (L + 1): the output's CE plus the logit lens of every hidden state (or the output's CE only)."""
        final = causal_lm_loss(out.logits[rows:], labels)
        if not self.config.logit_lens:
            return final
        module = engine.module
        head, norm = module.get_output_embeddings(), module.get_decoder().norm
        hidden = out.hidden_states
        total = final
        for h in hidden:
            total = total + causal_lm_loss(head(norm(h[rows:])), labels)
        return total / len(hidden)

    def metrics(self) -> dict[str, Any]:
        return dict(self._last)  # this rank's last micro-batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
