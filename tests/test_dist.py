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
