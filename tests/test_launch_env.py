"""The environment the launcher gives CPU ranks: its memory and thread settings fill in what the user
left unset, and a value the user set wins (docs/DESIGN.md, "Heap kept")."""

from __future__ import annotations

from bulwark.launch import CPU_MALLOC_ENV, with_cpu_rank_env


def test_launcher_settings_fill_in_and_user_settings_win() -> None:
    env = with_cpu_rank_env({"MALLOC_MMAP_MAX_": "65536", "OMP_NUM_THREADS": "3", "PATH": "/bin"}, nproc=2)
    assert env["MALLOC_MMAP_MAX_"] == "65536" and env["OMP_NUM_THREADS"] == "3" and env["PATH"] == "/bin"
    assert {k: env[k] for k in CPU_MALLOC_ENV if k != "MALLOC_MMAP_MAX_"} == {
        "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30), "MALLOC_TOP_PAD_": str(2**30)}
    assert with_cpu_rank_env({}, nproc=1)["MALLOC_MMAP_MAX_"] == "0"
