"""T-Vaccine's frozen layers under AdamW with weight decay: not updated at all, as with the reference's
requires_grad=False, at 1 rank and at 2 ZeRO-3 ranks (and ZeRO-2 at 1 rank, whose shard layout differs).

tests/scenarios/tvaccine_adamw.py runs the engine and records, per rank and local shard, the fp32 weights,
gradient and AdamW state around every step. Here, per step:
- the elements of the undrawn layers' adapters: weights and exp_avg / exp_avg_sq bit-identical to before
  (zero where AdamW created its state in this step), although plain AdamW would have moved them;
- every other element: what one step of plain torch.optim.AdamW gives from the recorded weights,
  gradient and state (the step count is the shard's shared one: see tvaccine.py, "Residual");
- the gathered model: every adapter of an undrawn layer bit-identical, every drawn layer moved.
The gradients themselves are checked against a plain-PyTorch Vaccine backward in test_vaccine.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bulwark.models import save_tiny_llama
from tests.conftest import SCENARIOS, check, torchrun

STEPS = 4
LR, WEIGHT_DECAY = 0.01, 0.1  # the scenario's
RUNS = {1: ["zero2", "zero3"], 2: ["zero3"]}  # zero2 first: a ZeRO-3 engine leaves zero.Init armed for later models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tvaccine_model") / "m4", seed=1, layers=4)


def run_scenario(root: Path, model_dir: Path, nproc: int) -> dict[str, dict]:
    # torchrun() has a timeout (conftest.RUN_TIMEOUT_S): a hung collective fails the test, never the session
    check(torchrun([str(SCENARIOS / "tvaccine_adamw.py"), str(root), str(model_dir), str(STEPS), *RUNS[nproc]],
                   nproc=nproc))
    return {
        ds: {"ranks": [torch.load(root / f"{ds}.rank{r}.pt", weights_only=False) for r in range(nproc)],
             "states": torch.load(root / f"{ds}.states.pt")}
        for ds in RUNS[nproc]
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[int, dict[str, dict]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared 2-core machine
    try:
        return {n: run_scenario(tmp_path_factory.mktemp(f"tvaccine_{n}"), model_dir, n) for n in RUNS}
    finally:
        torch.set_num_threads(threads)


def plain_adamw(weight: torch.Tensor, grad: torch.Tensor, state: dict, lr: float) -> tuple[torch.Tensor, dict]:
    """One step of torch.optim.AdamW (single-tensor path) from the given weights, gradient and state."""
    p = torch.nn.Parameter(weight.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=WEIGHT_DECAY, foreach=False, fused=False)
    if state:
        opt.state[p] = {k: v.clone().cpu() if torch.is_tensor(v) else v for k, v in state.items()}
        opt.state[p]["step"] = opt.state[p]["step"].float()
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt.state[p]


def mask_of(ranges: list[tuple[int, int]], numel: int) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool)
    for start, length in ranges:
        mask[start:start + length] = True
    return mask


def check_shards(rank_log: list[dict]) -> bool:
    """Asserts the per-element rules above for one rank; True if a frozen element would have moved under
    plain AdamW (a layer frozen while its moments were non-zero, or weight decay on a non-zero weight)."""
    meaningful = False
    for step, entry in enumerate(rank_log):
        assert entry["before"], f"step {step + 1}: the optimizer did not step"
        for index, pre in entry["before"].items():
            post = entry["after"][index]
            numel = pre["weight"].numel()
            frozen = mask_of(entry["frozen"].get(index, []), numel)
            want_w, want_state = plain_adamw(pre["weight"].cpu(), pre["grad"].cpu(), pre["state"], entry["lr"])
            got_w = post["weight"].cpu()
            where = f"step {step + 1}, shard {index}"
            # trained elements: plain AdamW (fused and single-tensor AdamW round differently)
            torch.testing.assert_close(got_w[~frozen], want_w[~frozen], rtol=1e-5, atol=1e-7, msg=where)
            for key in ("exp_avg", "exp_avg_sq"):
                got = post["state"][key].cpu()
                torch.testing.assert_close(got[~frozen], want_state[key][~frozen], rtol=1e-5, atol=1e-10,
                                           msg=f"{where}, {key}")
                old = pre["state"][key].cpu() if key in pre["state"] else torch.zeros(numel)
                assert torch.equal(got[frozen], old[frozen]), f"{where}: {key} of a frozen layer changed"
            assert torch.equal(got_w[frozen], pre["weight"].cpu()[frozen]), f"{where}: a frozen layer's weights moved"
            if frozen.any() and not torch.equal(want_w[frozen], pre["weight"].cpu()[frozen]):
                meaningful = True
    return meaningful


@pytest.mark.parametrize(("world", "ds_config"), [(1, "zero3"), (1, "zero2"), (2, "zero3")],
                         ids=["1proc-zero3", "1proc-zero2", "2rank-zero3"])
def test_frozen_layers_are_not_updated_and_drawn_ones_step_as_adamw(
        runs: dict[int, dict[str, dict]], world: int, ds_config: str) -> None:
    run = runs[world][ds_config]
    logs = [r["log"] for r in run["ranks"]]
    assert all(r["world_size"] == world for r in run["ranks"])
    draws = [entry["selected"] for entry in logs[0]]
    assert all(len(d) == 2 for d in draws) and all([e["selected"] for e in log] == draws for log in logs)
    # some layer is trained at one step and frozen at a later one: its moments would move it
    assert any(set(draws[a]) - set(draws[b]) for a in range(STEPS) for b in range(a + 1, STEPS)), draws
    assert any([check_shards(log) for log in logs]), "no frozen element would have moved: the test proves nothing"
    states = run["states"]
    for step, selected in enumerate(draws):
        old, new = states[step], states[step + 1]
        for layer in range(4):
            names = [k for k in old if f"layers.{layer}." in k and "lora_" in k]
            assert names
            moved = [n for n in names if not torch.equal(old[n], new[n])]
            if layer in selected:
                assert moved, f"step {step + 1}: drawn layer {layer} did not train"
            else:
                assert not moved, f"step {step + 1}: frozen layer {layer} moved: {moved[:3]}"
