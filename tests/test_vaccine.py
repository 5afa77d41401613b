"""Vaccine, vaccine-random and T-Vaccine against a plain single-process PyTorch computation.

    Vaccine:    g_l = ∂f/∂h_l,  e_l = ρ g_l / (||g|| + 1e-7) (one norm over all layers, tokens, rows
                and ranks), then step ∇_w f(w; h_l + e_l)
    random:     e_l ~ N(0, ρ I), one pass
    T-Vaccine:  the same on n layers drawn ∝ ||∂h/∂h_l|| of a harmful batch; unselected adapters frozen

The plain versions below are written independently of bulwark.defenses.vaccine: they capture h_l
itself with forward hooks (the defense differentiates w.r.t. a zero tensor added to it), take one
norm over the concatenation of all ranks' gradients, and step SGD by hand. The engine runs go
through one torchrun per world size (tests/scenarios/vaccine_step.py runs several cases per start).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

from bulwark.defenses import build_defense
from bulwark.defenses.tvaccine import TVaccine, TVaccineConfig, sample_layers
from bulwark.defenses.vaccine import RandomVaccineConfig, Vaccine, VaccineConfig
from bulwark.errors import BulwarkInputError
from bulwark.losses import model_loss
from bulwark.models import save_tiny_llama, tiny_llama
from tests.conftest import SCENARIOS, check, plain_model, torchrun

LR = 0.5  # the scenario's SGD learning rate
Batch = dict[str, torch.Tensor]
TV = {"n_layers": 2, "resample_every": 2, "probe_every": 3}  # 4-layer model: draws and probes both repeat


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one thread is faster, and on a shared 2-core CPU far faster than two spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the plain computation -------------------------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def block(model: torch.nn.Module, index: int, kind: str) -> torch.nn.Module:
    layer = decoder_layers(model)[index]
    return layer.self_attn if kind == "attention" else layer


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def plain_hidden_grads(model: torch.nn.Module, batch: Batch, indices: list[int], kind: str) -> list[torch.Tensor]:
    captured: dict[int, torch.Tensor] = {}
    handles = [block(model, i, kind).register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, _first(o)))
               for i in indices]
    try:
        loss = model_loss(model, batch)
    finally:
        for h in handles:
            h.remove()
    return list(torch.autograd.grad(loss, [captured[i] for i in indices]))


@contextmanager
def adding(model: torch.nn.Module, offsets: dict[int, torch.Tensor], kind: str) -> Iterator[None]:
    def hook(index: int):  # noqa: ANN202
        def add(module: torch.nn.Module, args: object, output: object) -> object:
            if isinstance(output, tuple):
                return (output[0] + offsets[index], *output[1:])
            return output + offsets[index]

        return add

    handles = [block(model, i, kind).register_forward_hook(hook(i)) for i in offsets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def plain_vaccine_backward(model: torch.nn.Module, groups: list[list[Batch]], rho: float, indices: list[int],
                           scale: float, kind: str = "attention") -> list[float]:
    """Each group (a global micro-batch: one batch per rank) shares one norm; every batch's perturbed
    loss is backpropagated times `scale`. Returns each group's ||g||."""
    norms = []
    for group in groups:
        grads = [plain_hidden_grads(model, b, indices, kind) for b in group]
        norm = torch.sqrt(sum(g.pow(2).sum() for gs in grads for g in gs))
        norms.append(float(norm))
        for batch, gs in zip(group, grads, strict=True):
            with adding(model, {i: rho * g / (norm + 1e-7) for i, g in zip(indices, gs, strict=True)}, kind):
                (model_loss(model, batch) * scale).backward()
    return norms




def sgd_step(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= LR * p.grad
                p.grad = None


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tensors(batch: dict) -> Batch:
    return {k: torch.tensor(v) for k, v in batch.items()}


def cat_rows(batches: list[Batch]) -> Batch:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def assert_close_states(got: dict, want: dict, atol: float = 1e-5) -> None:
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=atol, rtol=0, msg=name)


def max_gap(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in b)


# ---- the engine runs: one torchrun per world size, several cases each ---------------------------------


def case(name: str, model: str, defense: str, config: dict | None = None, lora: bool = False, grad_accum: int = 1,
         mbs: int = 2, steps: int = 2, ragged: bool = True, snapshots: bool = False) -> dict:
    return {"name": name, "model": model, "defense": defense, "config": config or {}, "lora": lora,
            "grad_accum": grad_accum, "mbs": mbs, "steps": steps, "ragged": ragged, "snapshots": snapshots}


ONE_PROC = [
    case("vac_full", "m2", "vaccine"),
    case("vac_ga2", "m2", "vaccine", grad_accum=2, steps=1, ragged=False),
    case("rand_ga2", "m2", "vaccine-random", grad_accum=2, steps=1, ragged=False),
    case("rand_doubled", "m2", "vaccine-random", mbs=4, steps=1, ragged=False),
    case("tv_lora", "m4", "t-vaccine", TV, lora=True, steps=4, snapshots=True),
]
TWO_RANKS = [
    case("vac_full", "m2", "vaccine", ragged=False),
    case("vac_lora", "m2", "vaccine", lora=True),
    case("rand_full", "m2", "vaccine-random", steps=1),
    case("tv_lora", "m4", "t-vaccine", TV, lora=True, steps=4, snapshots=True),
    case("tv_full_all", "m4", "t-vaccine", {"n_layers": 2, "resample_every": 1, "probe_every": 1, "freeze": "all"},
         steps=2, snapshots=True),
    # the same with extra passes sharing the stepping pass's ZeRO-3 prefetch trace (defense.own_trace=false)
    case("vac_full_shared", "m2", "vaccine", {"own_trace": False}),
    case("tv_lora_shared", "m4", "t-vaccine", {**TV, "own_trace": False}, lora=True, steps=4, snapshots=True),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vaccine_models")
    return {"m2": save_tiny_llama(root / "m2", seed=0), "m4": save_tiny_llama(root / "m4", seed=1, layers=4)}


def run_cases(root: Path, models: dict[str, Path], nproc: int, cases: list[dict]) -> dict[str, dict]:
    specs = [{**c, "model_dir": str(models[c["model"]])} for c in cases]
    (root / "cases.json").write_text(json.dumps(specs))
    check(torchrun([str(SCENARIOS / "vaccine_step.py"), str(root), str(root / "cases.json")], nproc=nproc))
    out = {}
    for c in specs:
        ranks = [json.loads((root / f"{c['name']}.rank{r}.json").read_text()) for r in range(nproc)]
        out[c["name"]] = {"case": c, "ranks": ranks, "states": torch.load(root / f"{c['name']}.states.pt")}
    return out


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> dict[str, dict]:
    return run_cases(tmp_path_factory.mktemp("vaccine_1proc"), models, 1, ONE_PROC)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> dict[str, dict]:
    return run_cases(tmp_path_factory.mktemp("vaccine_2ranks"), models, 2, TWO_RANKS)


def micro_groups(run: dict, step: int) -> list[list[Batch]]:
    """The global micro-batches of `step`: group m holds every rank's m-th micro-batch."""
    per_rank = [[tensors(b) for b in r["log"][step]["batches"]] for r in run["ranks"]]
    return [list(group) for group in zip(*per_rank, strict=True)]


def plain_vaccine_run(run: dict, rho: float, doubled: bool = False) -> dict[str, torch.Tensor]:
    c = run["case"]
    model = plain_model(Path(c["model_dir"]), c["lora"], run["states"][0])
    indices = list(range(len(decoder_layers(model))))
    world = len(run["ranks"])
    for step in range(c["steps"]):
        groups = micro_groups(run, step)
        scale = 1.0 / (world * len(groups))  # the engine: mean over ranks and accumulated micro-batches
        if doubled:  # one micro-batch made of every rank's and every accumulated one
            groups, scale = [[cat_rows([b for g in groups for b in g])]], 1.0
        plain_vaccine_backward(model, groups, rho, indices, scale)
        sgd_step(model)
    return weights(model)


# ---- Vaccine -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "name"), [(1, "vac_full"), (2, "vac_full"), (2, "vac_lora"), (2, "vac_full_shared")],
                         ids=["1proc-zero3-full", "2rank-zero3-full", "2rank-zero3-lora", "2rank-zero3-shared-trace"])
def test_vaccine_steps_equal_plain_pytorch(request: pytest.FixtureRequest, world: int, name: str) -> None:
    run = request.getfixturevalue("one_proc" if world == 1 else "two_ranks")[name]
    before, after = run["states"][0], run["states"][-1]
    expected = plain_vaccine_run(run, rho=2.0)
    assert_close_states(after, expected)
    assert max_gap(expected, before) > 1e-3, "the steps changed no weight: the comparison would be vacuous"
    assert max_gap(expected, plain_vaccine_run(run, rho=0.0)) > 1e-4, "the perturbation changed nothing"
    # every rank divides by the same global ||g||
    for step in range(run["case"]["steps"]):
        assert len({r["log"][step]["metrics"]["vaccine_grad_norm"] for r in run["ranks"]}) == 1


def test_extra_pass_keeps_the_zero3_prefetch_trace(two_ranks: dict) -> None:
    """With one trace for all passes, pass 1 and pass 2 invalidate ZeRO-3's prefetch trace every step
    (per-module fetching: the 2-rank slowdown); with `Engine.extra_pass` (the default) Vaccine never
    does, and T-Vaccine only when a new layer draw or a probe changes its pass 1."""
    for r in two_ranks["vac_full_shared"]["ranks"]:
        assert r["trace_invalidations"] >= 1
    for r in two_ranks["vac_full"]["ranks"]:
        assert r["trace_invalidations"] == 0
    for own, shared in zip(two_ranks["tv_lora"]["ranks"], two_ranks["tv_lora_shared"]["ranks"], strict=True):
        assert own["trace_invalidations"] < shared["trace_invalidations"], (own, shared)


@pytest.mark.parametrize("world", [1, 2], ids=["1proc", "2rank-zero3"])
def test_vaccine_perturbation_has_global_norm_rho(request: pytest.FixtureRequest, world: int) -> None:
    run = request.getfixturevalue("one_proc" if world == 1 else "two_ranks")["vac_full"]
    for step in range(run["case"]["steps"]):
        per_rank = [r["log"][step]["e_sq"][0] for r in run["ranks"]]
        assert math.isclose(sum(per_rank), 2.0**2, rel_tol=1e-5), per_rank
        if world == 2:  # neither rank's share is the whole: the norm is over both ranks
            assert all(0.1 < s < 3.9 for s in per_rank), per_rank


def test_vaccine_data_parallel_equals_doubled_micro_batch(two_ranks: dict) -> None:
    """2 ranks x 2 rows under ZeRO-3 == one process on the 4 rows with one norm over all of them
    (rows of equal length: the rank-mean loss is the 4-row batch's loss)."""
    run = two_ranks["vac_full"]
    assert_close_states(run["states"][-1], plain_vaccine_run(run, rho=2.0, doubled=True))


def test_vaccine_grad_accumulation_normalises_each_micro_batch(one_proc: dict) -> None:
    """Accumulating 2 micro-batches == the mean of two Vaccine gradients, each with its own norm;
    NOT one doubled micro-batch (whose single norm spans both): see the module docstring."""
    run = one_proc["vac_ga2"]
    after = run["states"][-1]
    assert_close_states(after, plain_vaccine_run(run, rho=2.0))
    assert max_gap(after, plain_vaccine_run(run, rho=2.0, doubled=True)) > 1e-4
    assert all(math.isclose(s, 4.0, rel_tol=1e-5) for s in run["ranks"][0]["log"][0]["e_sq"])


# ---- vaccine-random --------------------------------------------------------------------------------------


def plain_random_run(run: dict, rho: float, seed: int = 0) -> dict[str, torch.Tensor]:
    c = run["case"]
    model = plain_model(Path(c["model_dir"]), c["lora"], run["states"][0])
    layers, hidden = len(decoder_layers(model)), model.config.hidden_size
    world = len(run["ranks"])
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + r) for r in range(world)]
    for step in range(c["steps"]):
        for r, result in enumerate(run["ranks"]):
            micro = [tensors(b) for b in result["log"][step]["batches"]]
            for batch in micro:
                rows, tokens = batch["input_ids"].shape
                noise = [[torch.randn(tokens, hidden, generator=gens[r]) for _ in range(layers)] for _ in range(rows)]
                offsets = {i: math.sqrt(rho) * torch.stack([noise[b][i] for b in range(rows)]) for i in range(layers)}
                with adding(model, offsets, "attention"):
                    (model_loss(model, batch) / (world * len(micro))).backward()
        sgd_step(model)
    return weights(model)


def test_random_vaccine_two_ranks_equals_plain_pytorch(two_ranks: dict) -> None:
    run = two_ranks["rand_full"]
    expected = plain_random_run(run, rho=2.0)
    assert_close_states(run["states"][-1], expected)
    assert max_gap(expected, run["states"][0]) > 1e-3


def test_random_vaccine_grad_accumulation_equals_doubled_micro_batch(one_proc: dict) -> None:
    ga2, doubled = one_proc["rand_ga2"], one_proc["rand_doubled"]
    assert_close_states(ga2["states"][-1], doubled["states"][-1])
    assert_close_states(ga2["states"][-1], plain_random_run(ga2, rho=2.0))
    assert max_gap(ga2["states"][-1], ga2["states"][0]) > 1e-3
    # variance rho per element: 2 layers x 4 rows x 12 tokens x 32 features
    e_sq = sum(doubled["ranks"][0]["log"][0]["e_sq"])
    assert 0.9 < e_sq / (2.0 * 2 * 4 * 12 * 32) < 1.1


# ---- T-Vaccine -------------------------------------------------------------------------------------------


def frozen_names(state: dict, layer: int, freeze: str) -> list[str]:
    marker = f"layers.{layer}."
    return [k for k in state if marker in k and (freeze == "all" or "lora_" in k)]


def plain_tvaccine_run(run: dict) -> list[dict[str, torch.Tensor]]:
    """Every step: probe (the per-layer norms must equal the logged ones), draw (the same layers as
    logged, from the same seeded generator), perturb the drawn layers, zero the frozen gradients."""
    c = run["case"]
    cfg = TVaccineConfig(**c["config"])
    model = plain_model(Path(c["model_dir"]), c["lora"], run["states"][0])
    n_layers = len(decoder_layers(model))
    world = len(run["ranks"])
    gen = torch.Generator().manual_seed(cfg.seed)
    norms, selected, states = None, [], []
    for step in range(c["steps"]):
        logs = [r["log"][step] for r in run["ranks"]]
        if step % cfg.probe_every == 0:
            harmful = [tensors(log["harmful"][0]) for log in logs]
            grads = [plain_hidden_grads(model, b, list(range(n_layers)), "attention") for b in harmful]
            norms = torch.tensor([math.sqrt(sum(float(g[i].pow(2).sum()) for g in grads)) / world
                                  for i in range(n_layers)], dtype=torch.float64)
            model.zero_grad()
        for log in logs:
            torch.testing.assert_close(torch.tensor(log["norms"], dtype=torch.float64), norms, rtol=1e-5, atol=0)
        if step % cfg.resample_every == 0:
            selected = sample_layers(norms, cfg.n_layers, gen)
        assert all(log["metrics"]["tvaccine_layers"] == selected for log in logs)
        groups = micro_groups(run, step)
        plain_vaccine_backward(model, groups, cfg.rho, selected, 1.0 / (world * len(groups)))
        params = dict(model.named_parameters())
        for layer in range(n_layers):
            if layer not in selected:
                for name in frozen_names(params, layer, cfg.freeze):
                    params[name].grad = None  # plain SGD: no gradient, no update
        sgd_step(model)
        states.append(weights(model))
    return states


@pytest.mark.parametrize(("world", "name"), [(1, "tv_lora"), (2, "tv_lora"), (2, "tv_full_all"), (2, "tv_lora_shared")],
                         ids=["1proc-zero3-lora", "2rank-zero3-lora", "2rank-zero3-full-freeze-all",
                              "2rank-zero3-lora-shared-trace"])
def test_tvaccine_steps_equal_plain_pytorch_and_freeze(request: pytest.FixtureRequest, world: int, name: str) -> None:
    run = request.getfixturevalue("one_proc" if world == 1 else "two_ranks")[name]
    cfg = TVaccineConfig(**run["case"]["config"])
    snapshots = run["states"]
    expected = plain_tvaccine_run(run)
    for step, want in enumerate(expected):
        assert_close_states(snapshots[step + 1], want)
    draws = {tuple(r["log"][s]["metrics"]["tvaccine_layers"]) for r in run["ranks"] for s in range(len(expected))}
    assert all(len(d) == 2 for d in draws)
    for step in range(len(expected)):
        selected = run["ranks"][0]["log"][step]["metrics"]["tvaccine_layers"]
        old, new = snapshots[step], snapshots[step + 1]
        for layer in range(4):
            names = frozen_names(old, layer, cfg.freeze)
            assert names
            moved = [n for n in names if not torch.equal(old[n], new[n])]
            if layer in selected:
                assert moved, f"step {step + 1}: selected layer {layer} did not train"
            else:
                assert not moved, f"step {step + 1}: unselected layer {layer} moved: {moved[:3]}"
        # the perturbation's norm over the selected layers and all ranks is rho
        assert math.isclose(sum(r["log"][step]["e_sq"][0] for r in run["ranks"]), cfg.rho**2, rel_tol=1e-5)


def test_tvaccine_lora_probe_and_draw_schedule(two_ranks: dict) -> None:
    run = two_ranks["tv_lora"]
    for r in run["ranks"]:
        assert [len(log["harmful"]) for log in r["log"]] == [1, 0, 0, 1]  # probes at steps 0 and 3
        assert r["frozen_numel"] == [4096] * 4  # r=8 adapters on 7 projections of a 32-wide layer
    assert run["ranks"][0]["log"][0]["harmful"] != run["ranks"][1]["log"][0]["harmful"]  # each rank its own rows


# ---- in process: sampling, resume, checkpointing, registry ---------------------------------------------


def test_layer_sampling_is_proportional_to_norms() -> None:
    gen = torch.Generator().manual_seed(0)
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    draws = 6000
    counts = torch.zeros(5)
    for _ in range(draws):
        counts[sample_layers(norms, 1, gen)] += 1
    torch.testing.assert_close(counts / draws, norms / norms.sum(), atol=0.02, rtol=0)
    # two without replacement: P(i drawn) = p_i + sum_{j != i} p_j p_i / (1 - p_j)
    p = norms / norms.sum()
    inclusion = torch.tensor([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(5) if j != i) for i in range(5)])
    counts.zero_()
    for _ in range(draws):
        chosen = sample_layers(norms, 2, gen)
        assert len(set(chosen)) == 2 and 4 not in chosen
        counts[chosen] += 1
    torch.testing.assert_close(counts / draws, inclusion, atol=0.02, rtol=0)
    assert sample_layers(norms, 8, gen) == [0, 1, 2, 3, 4]  # more wanted than there are: all, zero-norm last
    a, b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert [sample_layers(norms, 2, a) for _ in range(20)] == [sample_layers(norms, 2, b) for _ in range(20)]


class PlainView:
    """The TrainingView of one process without DeepSpeed."""

    rank, world_size = 0, 1

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def forward_loss(self, batch: Batch) -> torch.Tensor:
        return model_loss(self.module, batch)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def extra_pass(self, kind: str = "extra") -> AbstractContextManager:
        return nullcontext()


class CountStream:
    def __init__(self, seed: int) -> None:
        self.seed, self.count = seed, 0

    def next_batch(self) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.count)
        self.count += 1
        ids = torch.randint(3, 200, (2, 10), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run_defense(defense: object, view: PlainView, streams: dict, steps: range) -> list[dict]:
    out = []
    for step in steps:
        batch = defense.next_batch(streams, step)
        defense.loss(view, batch)
        out.append({"offsets": {i: e.clone() for i, e in defense.hooks.offsets.items()},
                    "metrics": defense.metrics()})
        defense.after_step(view, step + 1)
    return out


@pytest.mark.parametrize("name", ["vaccine-random", "t-vaccine"])
def test_resume_reproduces_noise_and_layer_draws(name: str) -> None:
    config = {"resample_every": 2, "probe_every": 3, "n_layers": 2} if name == "t-vaccine" else {}
    model = tiny_llama(seed=2, layers=4)[0]
    view = PlainView(model)

    def fresh() -> object:
        defense = build_defense({"name": name, **config}, "align", 8)
        defense.attach(view)
        return defense

    first, streams = fresh(), {"main": CountStream(1), "harmful": CountStream(2)}
    straight = run_defense(first, view, streams, range(3))
    saved, counts = first.state_dict(), {k: s.count for k, s in streams.items()}
    straight += run_defense(first, view, streams, range(3, 7))
    first.hooks.remove()
    second, streams = fresh(), {"main": CountStream(1), "harmful": CountStream(2)}
    for k, s in streams.items():
        s.count = counts[k]
    second.load_state_dict(saved)
    resumed = run_defense(second, view, streams, range(3, 7))
    for a, b in zip(straight[3:], resumed, strict=True):
        assert a["metrics"] == b["metrics"]
        assert a["offsets"].keys() == b["offsets"].keys()
        for i in a["offsets"]:
            assert torch.equal(a["offsets"][i], b["offsets"][i])
    if name == "t-vaccine":
        draws = [tuple(s["metrics"]["tvaccine_layers"]) for s in straight]
        assert draws[0] == draws[1] and draws[2] == draws[3] and draws[4] == draws[5]


@pytest.mark.parametrize("kind", ["attention", "decoder"])
def test_vaccine_gradient_in_process_and_under_gradient_checkpointing(kind: str) -> None:
    """The defense's gradient == the plain one for both block kinds; recomputing activations in
    backward (gradient checkpointing) sees the same perturbation."""
    batch = CountStream(5).next_batch()
    batch["labels"][:, :4] = -100
    grads = {}
    for checkpointing in (False, True):
        model = tiny_llama(seed=3, layers=3)[0]
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        defense = Vaccine(VaccineConfig(layers=kind), 1)
        view = PlainView(model)
        defense.attach(view)
        defense.loss(view, batch).backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters()}
    plain = tiny_llama(seed=3, layers=3)[0]
    plain_vaccine_backward(plain, [[batch]], 2.0, [0, 1, 2], 1.0, kind)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[False][name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(grads[True][name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_registered_for_align_with_reference_defaults() -> None:
    assert build_defense({"name": "vaccine"}, "align", 10).config == VaccineConfig(rho=2.0, layers="attention")
    assert build_defense({"name": "vaccine-random"}, "align", 10).config == RandomVaccineConfig(rho=2.0)
    tv = build_defense({"name": "t-vaccine"}, "align", 10)
    assert isinstance(tv, TVaccine) and tv.side_streams == ("harmful",)
    assert tv.config == TVaccineConfig(rho=3.0, n_layers=8, resample_every=20, probe_every=200, freeze="lora")
    for name in ("vaccine", "vaccine-random", "t-vaccine"):
        with pytest.raises(BulwarkInputError, match="align"):
            build_defense({"name": name}, "finetune", 10)
        with pytest.raises(BulwarkInputError, match="layers"):
            build_defense({"name": name, "layers": "mlp"}, "align", 10)
        with pytest.raises(BulwarkInputError, match="rho"):
            build_defense({"name": name, "rho": -1.0}, "align", 10)
    for bad in ({"n_layers": 0}, {"probe_every": 0}, {"freeze": "some"}):
        with pytest.raises(BulwarkInputError):
            build_defense({"name": "t-vaccine", **bad}, "align", 10)
