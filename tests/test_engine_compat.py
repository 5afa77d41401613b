"""The DeepSpeed pin and the start-up check of the DeepSpeed internals the engine reads."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from bulwark.engine import compat, core
from bulwark.errors import BulwarkInputError
from tests.conftest import REPO, check, run_cmd

MOVED = re.compile(
    r"^DeepSpeed \S+ moved .+ \(Bulwark is tested with deepspeed >=\S+,<\S+\): install deepspeed==\S+$"
)


def _stub_engine(stage: int) -> SimpleNamespace:
    """An object with every attribute DS_INTERNALS lists for `stage`, shaped like deepspeed.initialize's engine."""

    def filled(key: str) -> SimpleNamespace:
        return SimpleNamespace(**{name: 0 for name in compat.DS_INTERNALS[key][1]})

    def backward(loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> None:
        del loss, retain_graph, scale_wrt_gas

    param = torch.nn.Parameter(torch.zeros(1))
    for name in compat.DS_INTERNALS["param"][1]:
        setattr(param, name, 0)
    param.ds_tensor = filled("param.ds_tensor")
    module = torch.nn.Module()
    module.w = param
    optimizer = SimpleNamespace(**vars(filled("optimizer")))
    optimizer.__dict__.update(vars(filled("optimizer@zero3" if stage == 3 else "optimizer@zero12")))
    if stage == 3:
        optimizer.parameter_offload = filled("parameter_offload")
    engine = SimpleNamespace(**vars(filled("engine")), **vars(filled("engine@zero3")))
    engine.optimizer, engine.module, engine.backward = optimizer, module, backward
    return engine


@pytest.mark.parametrize("stage", [2, 3])
def test_stub_with_every_internal_passes(stage: int) -> None:
    compat.check_deepspeed_internals(_stub_engine(stage), stage)


@pytest.mark.parametrize(
    ("stage", "where", "name"),
    [
        (3, "optimizer", "fp32_partitioned_groups_flat"),
        (3, "optimizer", "_epilogue_ran_this_backward"),
        (3, "parameter_offload", "_DeepSpeedZeRoOffload__inflight_param_registry"),
        (3, "ds_tensor", "ds_numel"),
        (3, "engine", "_zero3_consolidated_16bit_state_dict"),
        (2, "optimizer", "single_partition_of_fp32_groups"),
    ],
)
def test_missing_internal_fails_in_one_line(stage: int, where: str, name: str) -> None:
    engine = _stub_engine(stage)
    owner = {
        "engine": engine,
        "optimizer": engine.optimizer,
        "parameter_offload": getattr(engine.optimizer, "parameter_offload", None),
        "ds_tensor": engine.module.w.ds_tensor,
    }[where]
    delattr(owner, name)
    with pytest.raises(BulwarkInputError) as err:
        compat.check_deepspeed_internals(engine, stage)
    message = str(err.value)
    assert MOVED.match(message), message
    assert name in message and "\n" not in message
    import deepspeed

    assert f"DeepSpeed {deepspeed.__version__} moved" in message
    assert f"install deepspeed=={compat.DS_TESTED_VERSION}" in message


def test_stage2_does_not_ask_for_zero3_internals() -> None:
    engine = _stub_engine(2)
    del engine._zero3_consolidated_16bit_state_dict
    compat.check_deepspeed_internals(engine, 2)


def test_partitioned_param_check() -> None:
    engine = _stub_engine(3)
    compat.check_partitioned_param(engine.module.w)
    del engine.module.w.ds_process_group
    with pytest.raises(BulwarkInputError, match=r"moved Parameter\.ds_process_group \("):
        compat.check_partitioned_param(engine.module.w)


class _Recorder:
    seen: dict[str, Any] = {}

    def __init__(self, **kwargs: Any) -> None:
        _Recorder.seen = kwargs


def test_coordinator_kwargs_constant_matches_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """COORDINATOR_KWARGS (what the start-up check looks for) is exactly what `_coordinator_like` passes."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    monkeypatch.setattr(ppc, "PartitionedParameterCoordinator", _Recorder)
    core._coordinator_like(_stub_engine(3).optimizer.parameter_offload)
    assert sorted(_Recorder.seen) == sorted(compat.COORDINATOR_KWARGS)


def test_coordinator_signature_change_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    class Renamed:
        def __init__(self, prefetch_bucket_sz: int, max_reuse_distance_in_numel: int,
                     max_available_parameters_in_numel: int, allgather_stream: Any,
                     inflight_param_registry: Any, prefetch_nvme_swap: bool = False, timers: Any = None,
                     zero_quantized_weights: bool = False, zero_quantized_nontrainable_weights: bool = False,
                     fast_sharding_for_leaf_module: bool = False, log_trace_cache_warnings: bool = False) -> None:
            pass

    monkeypatch.setattr(ppc, "PartitionedParameterCoordinator", Renamed)
    with pytest.raises(BulwarkInputError) as err:
        compat.check_deepspeed_internals(_stub_engine(3), 3)
    assert MOVED.match(str(err.value)), str(err.value)
    assert "(prefetch_nvme=)" in str(err.value)


def test_missing_module_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "DS_IMPORTS", (*compat.DS_IMPORTS, "deepspeed.runtime.zero.gone_module:Thing"))
    with pytest.raises(BulwarkInputError, match=r"moved deepspeed\.runtime\.zero\.gone_module\.Thing \("):
        compat.check_deepspeed_internals(_stub_engine(3), 3)


def test_installed_deepspeed_is_in_the_pinned_range() -> None:
    import deepspeed
    from packaging.specifiers import SpecifierSet

    # (tomllib is Python 3.11+; the project supports 3.10)
    pinned = re.findall(r'^\s*"(deepspeed[^"]*)",', (REPO / "pyproject.toml").read_text(), flags=re.M)
    assert pinned == [f"deepspeed{compat.DS_TESTED_RANGE}"], "pyproject.toml and compat.DS_TESTED_RANGE disagree"
    assert deepspeed.__version__ in SpecifierSet(compat.DS_TESTED_RANGE)
    assert compat.DS_TESTED_VERSION in SpecifierSet(compat.DS_TESTED_RANGE)


# Built in a child process: a real engine starts a process group, which must not outlive the test.
_BUILD = """
import json, sys
from bulwark.config import TrainConfig
from bulwark.engine import compat, core
from bulwark.engine.partitioned import load_partitioned
from bulwark.errors import BulwarkInputError
from bulwark.models import load_model

model_dir, ds_config = sys.argv[1:3]
train = TrainConfig(steps=1, micro_batch_size=1, grad_accum=1, lr=1e-3)
engine = core.Engine(lambda: load_model(model_dir, "fp32"), train, ds_config, "fp32", 1)  # runs the check
out = {"stage": engine.zero_stage}
if engine.zero_stage == 3:
    load_partitioned(model_dir, "fp32")  # runs the per-parameter check
    del engine.ds.optimizer.grad_partitions_flat_buffer
else:
    del engine.ds.optimizer.single_partition_of_fp32_groups
try:
    compat.check_deepspeed_internals(engine.ds, engine.zero_stage)
except BulwarkInputError as err:
    out["error"] = str(err)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_real_engine_passes_the_check(tmp_path: Path, tiny_model_dir: Path, ds_config: str) -> None:
    proc = check(run_cmd([sys.executable, "-c", _BUILD, str(tiny_model_dir), ds_config], timeout=180))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["stage"] == (3 if ds_config == "zero3" else 2)
    # the engine built (the check passed); with one internal deleted it fails in one line naming it
    assert MOVED.match(out["error"]), out["error"]
    name = "grad_partitions_flat_buffer" if ds_config == "zero3" else "single_partition_of_fp32_groups"
    assert f"moved DeepSpeedZeroOptimizer{'_Stage3' if ds_config == 'zero3' else ''}.{name} (" in out["error"]
