"""`exit_after_success`: a rank that started a process group leaves with code 0 and its output flushed;
a process without one is left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bulwark.engine.dist import free_port

CHILD = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
from bulwark.engine.dist import exit_after_success
if sys.argv[2] == "group":
    torch.distributed.init_process_group("gloo")
    held = torch.distributed.new_group([0])  # a group somebody else keeps, as DeepSpeed does
    torch.distributed.all_reduce(torch.ones(3), group=held)
print("written before the exit")  # stdout is a pipe here: block-buffered, lost by a bare os._exit
exit_after_success()
print("after the exit call")
sys.exit(5)
"""


@pytest.mark.parametrize(("mode", "code", "after"), [("group", 0, False), ("none", 5, True)])
def test_exit_after_success(mode: str, code: int, after: bool) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(free_port()), mode], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "written before the exit" in proc.stdout
    assert ("after the exit call" in proc.stdout) == after


def test_collective_helpers_at_two_ranks(tmp_path) -> None:
    """Sums in place with the caller's dtype, rank-ordered gathers, objects, a reduce to one owner."""
    import json

    from tests.conftest import SCENARIOS, check, torchrun

    out = tmp_path / "seen.json"
    check(torchrun([str(SCENARIOS / "collectives.py"), str(out)], nproc=2))
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for seen in ranks:
        assert seen["in_place"] and seen["summed"] == [3.0, 4.0] and seen["dtype"] == "torch.float64"
        assert seen["flags"] == [1] and seen["flags_dtype"] == "torch.int64"
        assert seen["gathered"] == [0.0, 1.0, 10.0, 11.0] and seen["device"] == "cpu"
        assert seen["objects"] == [{"rank": 0, "names": []}, {"rank": 1, "names": ["w"]}]
        assert seen["broadcast"] == "from 1" and seen["collective_device"] == "cpu"
    assert ranks[1]["owned"] == [3.0, 3.0, 3.0]


TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce", "broadcast", "reduce_scatter",
                      "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "scatter", "gather", "send", "recv"}


def test_no_tensor_collective_outside_the_helpers() -> None:
    """The review rule (docs/DESIGN.md): tensor collectives are called in bulwark/engine/dist.py only, whose
    helpers stage tensors on the collective device; anywhere else a CPU tensor could reach NCCL."""
    import ast

    from tests.conftest import REPO

    offenders = []
    for path in sorted((REPO / "bulwark").rglob("*.py")):
        if path == REPO / "bulwark" / "engine" / "dist.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in TENSOR_COLLECTIVES:
                base = ast.unparse(node.value)
                if base.endswith("distributed") or base == "dist":
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {base}.{node.attr}")
    assert not offenders, offenders
