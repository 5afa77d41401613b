"""Render sbatch scripts from the templates in ``slurm/`` and submit them with ``sbatch``.

The templates use ``@@{name}`` placeholders (a :class:`string.Template` with delimiter ``@@``) so the
shell's own ``$VARS`` stay readable in the template files.
"""

from __future__ import annotations

import re
import shlex
import shutil
import string
import subprocess
from pathlib import Path
from typing import Literal

from bulwark.errors import BulwarkInputError

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
Stage = Literal["align", "finetune", "recover", "eval"]

# The module torchrun runs for each stage: `python -m MODULE CONFIG [--resume] k=v ...`.
STAGE_MODULES: dict[str, str] = {
    "align": "bulwark.recipes.align",
    "finetune": "bulwark.recipes.finetune",
    "recover": "bulwark.recipes.recover",
    "eval": "bulwark.recipes.eval",
}
CPUS_PER_GPU = 8
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # SLURM: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class _SbatchTemplate(string.Template):
    delimiter = "@@"


def template_path(nodes: int) -> Path:
    """The template a job of ``nodes`` nodes is rendered from."""
    return TEMPLATE_DIR / ("single_node.sbatch" if nodes == 1 else "multi_node.sbatch")


def render_sbatch(
    config_path: str | Path,
    *,
    stage: Stage = "finetune",
    nodes: int = 1,
    gpus_per_node: int = 8,
    job_name: str | None = None,
    time: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    extra_overrides: list[str] | tuple[str, ...] = (),
    cpus_per_task: int | None = None,
    resume: bool = False,
) -> str:
    """An sbatch script running ``bulwark.recipes.<stage>`` on ``nodes`` x ``gpus_per_node`` GPUs.

    ``config_path`` is written as given (relative paths resolve against the submit folder).
    ``extra_overrides`` are ``key=value`` run-config overrides appended to the command. ``resume``
    passes ``--resume`` on the first start too; a requeued job always gets it.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise BulwarkInputError(f"nodes and gpus per node must be >= 1 (got nodes={nodes}, gpus_per_node={gpus_per_node})")
    if stage not in STAGE_MODULES:
        raise BulwarkInputError(f"stage {stage!r}: use one of {', '.join(STAGE_MODULES)}")
    if not _TIME_RE.match(time):
        raise BulwarkInputError(f"time {time!r}: use a SLURM time limit such as 24:00:00 or 2-00:00:00")
    name = job_name or f"bulwark-{stage}-{Path(config_path).stem}"
    if not _NAME_RE.match(name):
        raise BulwarkInputError(f"job name {name!r}: use letters, digits, '.', '_' and '-' only")
    for item in extra_overrides:
        if "=" not in item or item.startswith("="):
            raise BulwarkInputError(f"override {item!r}: expected key=value")
    cpus = cpus_per_task if cpus_per_task is not None else CPUS_PER_GPU * gpus_per_node
    if cpus < 1:
        raise BulwarkInputError(f"cpus per task must be >= 1 (got {cpus})")
    extra = [f"#SBATCH --partition={partition}"] if partition else []
    extra += [f"#SBATCH --account={account}"] if account else []
    template = _SbatchTemplate(template_path(nodes).read_text())
    return template.substitute(
        stage=stage,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus,
        time=time,
        job_name=name,
        sbatch_extra="\n".join(extra),
        module=STAGE_MODULES[stage],
        config=shlex.quote(str(config_path)),
        overrides=" ".join(shlex.quote(o) for o in extra_overrides),
        resume_flag="--resume" if resume else "",
    )


def submit(script_path: str | Path) -> str:
    """Submit a rendered script with ``sbatch`` and return the job id.

    Creates ``logs/`` in the current folder first (SLURM writes ``logs/%x-%j-%N.out`` relative to the
    submit folder and does not create it).
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise BulwarkInputError(
            "sbatch not found on PATH: render without --submit and copy the script to a login node"
        )
    script = Path(script_path)
    if not script.is_file():
        raise BulwarkInputError(f"{script}: sbatch script not found")
    Path("logs").mkdir(exist_ok=True)
    proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        raise BulwarkInputError(f"sbatch failed: {reason[-1] if reason else f'exit code {proc.returncode}'}")
    # --parsable prints "jobid" or "jobid;cluster"
    return proc.stdout.strip().split(";")[0]
