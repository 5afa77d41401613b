"""AsFT: the regularised step against plain single-process PyTorch, under 1 and 2 ranks, resume, bad input.

The plain reference spells the paper's penalty out densely, in float64: C = V Vᵀ / ||V||_F with
V = W_aligned - W_base, R = λ Σ ||(I - C) ΔW||_F², and differentiates CE + R with autograd.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from bulwark.config import LoraConfig
from bulwark.defenses import build_defense
from bulwark.errors import BulwarkInputError
from bulwark.losses import model_loss
from bulwark.models import apply_lora, load_model, load_tokenizer, save_tiny_llama
from tests.conftest import SCENARIOS, check, cli_in_process, torchrun
from tests.test_hostile import assert_clean_failure

# intermediate 63: gate/up have an odd number of rows, so 2 ZeRO-3 ranks split a row between them
SIZES = {"hidden_size": 40, "heads": 4, "kv_heads": 2, "intermediate": 63}
LAM, STEPS, LR = 4.0, 3, 0.05  # LR: the scenario's
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(aligned, base): base = tiny seed 0, aligned = base + 0.05 noise (the 'alignment')."""
    root = tmp_path_factory.mktemp("asft_models")
    base = save_tiny_llama(root / "base", seed=0, **SIZES)
    model = load_model(str(base), "fp32")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "aligned")
    load_tokenizer(str(base)).save_pretrained(root / "aligned")  # with its chat template
    return root / "aligned", base


# ---- the plain reference ---------------------------------------------------------------------------------

def directions(aligned: Path, base: Path) -> dict[str, torch.Tensor]:
    """V = W_aligned - W_base (float64) of every targeted weight, by its plain-model name."""
    from safetensors.torch import load_file

    a, b = load_file(str(aligned / "model.safetensors")), load_file(str(base / "model.safetensors"))
    return {k: (a[k].double() - b[k].double()) for k in a if k.endswith(".weight") and
            k[: -len(".weight")].rsplit(".", 1)[-1] in TARGETS}


def penalty(model: torch.nn.Module, v: dict[str, torch.Tensor], start: dict[str, torch.Tensor], lam: float,
            lora: bool) -> torch.Tensor:
    """λ Σ ||(I - C) ΔW||², dense, float64, differentiable in the model's parameters."""
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    for key, direction in v.items():
        if lora:
            module = "base_model.model." + key[: -len(".weight")]
            a, b = params[f"{module}.lora_A.default.weight"], params[f"{module}.lora_B.default.weight"]
            a0 = start[f"{module}.lora_A.default.weight"].double()
            b0 = start[f"{module}.lora_B.default.weight"].double()
            scale = model.peft_config["default"].lora_alpha / model.peft_config["default"].r
            delta = scale * (b.double() @ a.double() - b0 @ a0)
            # the aligned weight is the frozen layer plus the adapter the run starts from (zero when fresh)
            direction = direction + scale * b0 @ a0
        else:
            delta = params[key].double() - start[key].double()
        c = direction @ direction.T / direction.norm()
        eye = torch.eye(c.shape[0], dtype=torch.float64)
        total = total + ((eye - c) @ delta).pow(2).sum()
    return lam * total


def plain_step(aligned: Path, v: dict, lora: bool, r: int, alpha: int, start: dict, before: dict,
               rank_batches: list[list[dict]], lam: float) -> tuple[dict[str, torch.Tensor], float]:
    """One SGD step in one process: CE averaged over ranks and micro-batches (the engine's convention)
    plus the penalty; returns the weights after it and the penalty before it."""
    model = load_model(str(aligned), "fp32")
    if lora:
        model = apply_lora(model, LoraConfig(enabled=True, r=r, alpha=alpha))
    missing, unexpected = model.load_state_dict(before, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    trainable = [p for p in model.parameters() if p.requires_grad]
    count = sum(len(b) for b in rank_batches)
    loss = sum(model_loss(model, {k: torch.tensor(x) for k, x in batch.items()})
               for batches in rank_batches for batch in batches) / count
    reg = penalty(model, v, start, lam, lora)
    grads = torch.autograd.grad(loss + reg.float(), trainable)
    with torch.no_grad():
        for p, g in zip(trainable, grads, strict=True):
            p.sub_(LR * g)
    return {k: t.detach().clone() for k, t in model.state_dict().items()}, float(reg.detach())


# ---- the math in one process, without DeepSpeed -----------------------------------------------------------

class StandIn:
    """The TrainingView surface AsFT reads, for one process: one flat fp32 shard of the trainable weights."""

    rank, world_size = 0, 1

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model
        params = self.trainable_parameters()
        self.shard = torch.cat([p.detach().flatten() for _, p in params]).clone()
        self.offsets, at = {}, 0
        for _, p in params:
            self.offsets[id(p)] = at
            at += p.numel()

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def full_shape(self, p: torch.nn.Parameter) -> torch.Size:
        return p.shape

    def full_numel(self, p: torch.nn.Parameter) -> int:
        return p.numel()

    def local_shards(self) -> list[torch.Tensor]:
        return [self.shard]

    def shard_slice(self, p: torch.nn.Parameter) -> tuple[int, int, int] | None:
        return (0, self.offsets[id(p)], p.numel()) if id(p) in self.offsets else None

    def gathered(self, params: list, modify: bool = False) -> nullcontext:
        return nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


@pytest.mark.parametrize("mode", ["full", "lora", "single"])
def test_penalty_gradient_equals_autograd_of_the_dense_formula(models: tuple[Path, Path], mode: str) -> None:
    aligned, base = models
    model = load_model(str(aligned), "fp32")
    gen = torch.Generator().manual_seed(3)
    if mode != "full":
        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
        if mode == "single":
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    view = StandIn(model)
    defense = build_defense({"name": "asft", "base": str(base), "lambda_reg": LAM}, "finetune", 1)
    defense.attach(view)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the weights the step starts from: moved away from the start, as after some fine-tuning
    view.shard += 0.03 * torch.randn(view.shard.shape, generator=gen)
    view.shard.grad = torch.zeros_like(view.shard)
    defense.before_step(iter([(0, view.shard)]))
    with torch.no_grad():
        for _, p in view.trainable_parameters():
            at = view.offsets[id(p)]
            p.copy_(view.shard[at:at + p.numel()].view_as(p))
    v = directions(aligned, base)
    reg = penalty(model, v, start, LAM, mode != "full")
    trainable = [p for _, p in view.trainable_parameters()]
    want = torch.cat([g.flatten().double() for g in torch.autograd.grad(reg, trainable, allow_unused=True)
                      if g is not None])
    if mode == "full":  # only the targeted weights have a penalty gradient
        mask = torch.zeros_like(view.shard, dtype=torch.bool)
        for n, p in view.trainable_parameters():
            if n[: -len(".weight")].rsplit(".", 1)[-1] in TARGETS:
                mask[view.offsets[id(p)]:view.offsets[id(p)] + p.numel()] = True
        assert not view.shard.grad[~mask].any()
        got = view.shard.grad[mask]
    else:
        got = view.shard.grad
    assert want.abs().max() > 1e-2, "the penalty has no gradient: the test proves nothing"
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert defense.metrics()["asft_reg"] == pytest.approx(float(reg), rel=1e-5)


def test_no_base_is_a_pull_to_the_aligned_weights(models: tuple[Path, Path]) -> None:
    aligned, _ = models
    model = load_model(str(aligned), "fp32")
    view = StandIn(model)
    defense = build_defense({"name": "asft", "lambda_reg": 0.5}, "finetune", 1)
    defense.attach(view)
    start = view.shard.clone()
    view.shard += 0.01
    view.shard.grad = torch.zeros_like(view.shard)
    defense.before_step(iter([(0, view.shard)]))
    moved = view.shard.grad != 0
    assert moved.any()
    torch.testing.assert_close(view.shard.grad[moved], (2 * 0.5 * (view.shard - start))[moved])


# ---- DeepSpeed: 1 rank (ZeRO-2) and 2 ranks (ZeRO-3) ------------------------------------------------

# mode:grad_accum[:resume after this step]
CASES = {1: ("zero2", ["full:1", "lora:1"]), 2: ("zero3", ["full:2:2", "lora:1:2", "single:1"])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, models: tuple[Path, Path]) -> dict[int, dict[str, dict]]:
    aligned, base = models
    out = {}
    for nproc, (ds_config, cases) in CASES.items():
        root = tmp_path_factory.mktemp(f"asft_{nproc}")
        # torchrun() has a timeout (conftest.RUN_TIMEOUT_S): a hung collective fails the test, not the session
        check(torchrun([str(SCENARIOS / "asft_step.py"), str(root), str(aligned), str(base), ds_config,
                        str(STEPS), str(LAM), *cases], nproc=nproc))
        out[nproc] = {}
        for case in cases:
            mode = case.split(":")[0]
            out[nproc][mode] = {
                "ranks": [torch.load(root / f"{mode}.rank{r}.pt", weights_only=False) for r in range(nproc)],
                **torch.load(root / f"{mode}.states.pt", weights_only=False),
            }
    return out


@pytest.mark.parametrize(("nproc", "mode"),
                         [(1, "full"), (1, "lora"), (2, "full"), (2, "lora"), (2, "single")],
                         ids=["1rank-zero2-full", "1rank-zero2-lora", "2rank-zero3-full-ga2",
                              "2rank-zero3-lora", "2rank-zero3-lora-single"])
def test_steps_equal_plain_pytorch(runs: dict, models: tuple[Path, Path], nproc: int, mode: str) -> None:
    aligned, base = models
    run = runs[nproc][mode]
    v = directions(aligned, base)
    states = run["states"]
    start = states[0]
    lora = mode != "full"
    assert len(states) == STEPS + 1
    for step in range(STEPS):
        batches = [r["log"][step]["batches"] for r in run["ranks"]]
        want, reg = plain_step(aligned, v, lora, 4, 8, start, states[step], batches, LAM)
        without, _ = plain_step(aligned, v, lora, 4, 8, start, states[step], batches, 0.0)
        got = states[step + 1]
        gap = max((want[k] - without[k]).abs().max().item() for k in got)
        if step > 0:  # every run starts at ΔW = 0: the penalty acts from the second step on
            assert gap > 1e-3, f"step {step + 1}: the penalty moved nothing; the test proves nothing"
        for key, value in got.items():
            torch.testing.assert_close(value, want[key], rtol=0, atol=1e-6, msg=f"step {step + 1}, {key}")
        for r in run["ranks"]:
            # fp32 against float64: s (B A - B0 A0) cancels when the adapter started non-zero
            assert r["log"][step]["reg"] == pytest.approx(reg, rel=2e-4, abs=1e-9)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_resume_mid_run_is_exact(runs: dict, mode: str) -> None:
    run = runs[2][mode]  # resumed after step 2 of 3 on 2 ZeRO-3 ranks (a fresh engine, attach, then load)
    straight = run["states"][-1]
    for key, value in straight.items():
        assert torch.equal(run["resumed"][key], value), key
    assert run["resumed_regs"] == [e["reg"] for e in run["ranks"][0]["log"][2:]]


# ---- bad input ---------------------------------------------------------------------------------------------

def cli_args(model: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    return [f"model.name={model}", f"out_dir={out}", "data.n=16", "data.max_length=32",
            "data.template=alpaca", "train.micro_batch_size=2", "train.steps=1", f"launch.nproc={nproc}",
            "defense.name=asft", *extra]


BAD = {
    "base_missing": (lambda t: [f"defense.base={t / 'no_base'}"], "defense.base"),
    "base_not_a_model": (lambda t: [f"defense.base={t}"], "defense.base"),
    "lambda_negative": (lambda t: ["defense.lambda_reg=-1"], "defense.lambda_reg"),
    "lambda_nan": (lambda t: ["defense.lambda_reg=.nan"], "defense.lambda_reg"),
    "lambda_inf": (lambda t: ["defense.lambda_reg=.inf"], "defense.lambda_reg"),
    "unknown_key": (lambda t: ["defense.lamda=1"], "defense.lamda"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_before_any_rank(case: str, tmp_path: Path, models: tuple[Path, Path],
                                               data_dir: Path) -> None:
    aligned, _ = models
    extra, says = BAD[case]
    out = tmp_path / "run"
    proc = cli_in_process(["finetune", *cli_args(aligned, out, f"data.dir={data_dir}", *extra(tmp_path))])
    assert_clean_failure(proc, 2, says)
    assert not out.exists(), "a run folder was made for a rejected run"


def test_base_of_another_shape_is_one_line_before_any_rank(
        tmp_path: Path, models: tuple[Path, Path], tiny_model_dir: Path, data_dir: Path) -> None:
    """The base's shapes are compared with the model's files in the launcher (Defense.check_inputs): one line,
    exit 2, no run folder at all."""
    aligned, _ = models
    out = tmp_path / "run"
    proc = cli_in_process(["finetune", *cli_args(aligned, out, f"data.dir={data_dir}",
                                                 f"defense.base={tiny_model_dir}")])
    assert_clean_failure(proc, 2, "defense.base")
    assert "shape" in proc.stderr
    assert not out.exists(), "a run folder was made for a rejected run"


def test_registered_with_its_config_and_listed() -> None:
    from bulwark.defenses import describe

    row = next(r for r in describe() if r["name"] == "asft")
    assert row["stages"] == ["finetune"]
    assert row["params"] == {"base": "", "lambda_reg": 1.0, "target_modules": []}
    with pytest.raises(BulwarkInputError, match="defense.lambda_reg"):
        build_defense({"name": "asft", "lambda_reg": -0.5}, "finetune", 1)
    with pytest.raises(BulwarkInputError, match="asft"):
        build_defense({"name": "asft"}, "align", 1)


def test_config_file_resolves(tmp_path: Path) -> None:
    from bulwark.config import load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "finetune_asft.yaml"
    cfg = load_config(str(config), [], "finetune")
    assert cfg.defense["name"] == "asft" and cfg.defense["base"] == "embedded"
    assert json.loads(json.dumps(cfg.defense))["lambda_reg"] > 0
