"""Shared fixtures: the real data folder, a tiny saved Llama, and multi-process runners with timeouts."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
# A failed collective can hang the other rank forever: every multi-process run gets a deadline.
RUN_TIMEOUT_S = 240


def bench_script(name: str) -> ModuleType:
    """bench/<name>.py loaded as a module: bench/ holds scripts, not a package."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data_dir() -> Path | None:
    for candidate in (os.environ.get("BULWARK_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate, "sst2_train.jsonl").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = _data_dir()
    if found is None:
        pytest.skip("real data folder not found (set BULWARK_DATA_DIR)")
    return found


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bulwark.models import save_tiny_llama

    path = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_llama(path, seed=0)
    return path


def subprocess_env(data_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if data_dir is not None:
        env["BULWARK_DATA_DIR"] = str(data_dir)
    return env


def run_cmd(cmd: list[str], data_dir: Path | None = None, timeout: int = RUN_TIMEOUT_S,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, env=subprocess_env(data_dir), capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO
    )


def torchrun(target: list[str], nproc: int = 2, data_dir: Path | None = None,
             timeout: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """`target` is ["-m", "module", args...] or ["script.py", args...]."""
    from bulwark.engine.dist import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target]
    return run_cmd(cmd, data_dir, timeout)


def bulwark_cli(args: list[str], data_dir: Path | None = None, timeout: int = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "cli.main", *args], data_dir, timeout)


def cli_in_process(args: list[str], data_dir: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in this process, for input it must reject before starting any rank (a process of its own
    costs seconds of imports per case); stdout and stderr come back together as stderr."""
    from typer.testing import CliRunner

    from cli.main import app

    env = {"BULWARK_DATA_DIR": str(data_dir)} if data_dir is not None else {}
    result = CliRunner().invoke(app, args, env=env)
    return subprocess.CompletedProcess(args, result.exit_code, "", result.output)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def plain_model(model_dir: Path, lora: bool, state: dict) -> torch.nn.Module:
    """The plain-PyTorch reference model: the tiny base (plus a fresh LoRA) loaded with `state`."""
    from bulwark.config import LoraConfig
    from bulwark.models import apply_lora, load_model

    model = load_model(str(model_dir), "fp32")
    if lora:
        model = apply_lora(model, LoraConfig(enabled=True))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    return model


def save_subspace_models(root: Path, targets: list[str], dtype: torch.dtype | None = None,
                         unaligned: str = "") -> Path:
    """SafeLoRA's and SafeMERGE's models under root: base (tiny seed 0), aligned = base + noise (but the weight
    named `unaligned`, which alignment leaves alone), a LoRA adapter on aligned (`targets`), and a full
    fine-tune = aligned + noise; in `dtype` (default fp32)."""
    import peft

    from bulwark.models import tiny_llama

    dtype = dtype or torch.float32
    model, tokenizer = tiny_llama(seed=0)
    model = model.to(dtype)
    model.save_pretrained(root / "base")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != unaligned:
                p.add_((0.05 * torch.randn(p.shape, generator=gen)).to(dtype))
    model.save_pretrained(root / "aligned")
    tokenizer.save_pretrained(root / "aligned")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
                               autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    lora.save_pretrained(root / "adapter")
    model = lora.unload()
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.02 * torch.randn(p.shape, generator=gen)).to(dtype))
    model.save_pretrained(root / "full")
    return root


def save_adapter_on(model_dir: Path, out: Path, targets: list[str], value: float = 0.05) -> Path:
    """A LoRA adapter (r 2, alpha 4) on `model_dir` with every lora_B set to `value`, so that it moves the
    model, and its adapter_config naming that folder as its base (as a Bulwark run writes it)."""
    import json

    import peft

    from bulwark.models import load_model

    lora = peft.get_peft_model(load_model(str(model_dir)), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(value)
    lora.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(model_dir)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def save_recover_pair(root: Path) -> Path:
    """The recover tests' models: A (tiny seed 0) and B = A + 0.05 * noise, saved in fp32 under root/A, root/B."""
    from bulwark.models import tiny_llama

    model, tokenizer = tiny_llama(seed=0)
    model.save_pretrained(root / "A")
    tokenizer.save_pretrained(root / "A")
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    model.save_pretrained(root / "B")
    tokenizer.save_pretrained(root / "B")
    return root
