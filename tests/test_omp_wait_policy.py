"""bench/omp_wait_policy.py: each setting reaches the jobs as named, and "launcher" leaves the choice to the launcher."""

from __future__ import annotations

import pytest
from conftest import bench_script

from bulwark.launch import CPU_SPIN_ROUNDS, with_cpu_rank_env


def test_a_setting_replaces_any_wait_variable_of_the_callers(monkeypatch) -> None:
    script = bench_script("omp_wait_policy")
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")

    launcher = with_cpu_rank_env(script.job_env("launcher"), nproc=1)
    assert launcher["GOMP_SPINCOUNT"] == CPU_SPIN_ROUNDS and "OMP_WAIT_POLICY" not in launcher

    libgomp_default = with_cpu_rank_env(script.job_env("GOMP_SPINCOUNT=300000"), nproc=1)
    assert libgomp_default["GOMP_SPINCOUNT"] == "300000" and "OMP_WAIT_POLICY" not in libgomp_default

    passive = with_cpu_rank_env(script.job_env("OMP_WAIT_POLICY=passive"), nproc=1)
    assert passive["OMP_WAIT_POLICY"] == "passive" and "GOMP_SPINCOUNT" not in passive


@pytest.mark.parametrize("setting", ["OMP_NUM_THREADS=1", "GOMP_SPINCOUNT=", "unset"])
def test_a_setting_that_is_not_a_wait_variable_is_refused(setting: str) -> None:
    with pytest.raises(SystemExit, match="give 'launcher' or one of"):
        bench_script("omp_wait_policy").job_env(setting)
