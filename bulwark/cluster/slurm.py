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
from bulwark.launch import STAGES

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "slurm"
Stage = Literal["align", "finetune", "recover", "eval", "bench"]

# Each stage's rank entry (the launcher's table, bulwark/launch.py): torchrun runs
# `python -m MODULE CONFIG k=v ... --resume-if-present` on every node. "bench" is the driver of a bench
# matrix: it runs once on the job's node and starts each cell's ranks through the launcher itself.
STAGE_MODULES: dict[str, str] = dict(STAGES)
BENCH = "bench"
CPUS_PER_GPU = 8
_TIME_RE = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # SLURM: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_SLURM_WORD_RE = re.compile(r"^[A-Za-z0-9._,-]+$")  # partition / account: no spaces, newlines or shell syntax


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
) -> str:
    """An sbatch script running ``bulwark.recipes.<stage>`` on ``nodes`` x ``gpus_per_node`` GPUs (or, for
    ``stage="bench"``, ``bulwark bench`` on one node).

    ``config_path`` is written as given (relative paths resolve against the submit folder).
    ``extra_overrides`` are ``key=value`` overrides appended to the command. Every start, first or
    requeued, passes ``--resume-if-present``.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise BulwarkInputError(f"nodes and gpus per node must be >= 1 (got nodes={nodes}, gpus_per_node={gpus_per_node})")
    if stage not in (*STAGE_MODULES, BENCH):
        raise BulwarkInputError(f"stage {stage!r}: use one of {', '.join((*STAGE_MODULES, BENCH))}")
    if stage == BENCH and nodes != 1:
        raise BulwarkInputError(f"stage bench runs on one node (got --nodes {nodes}); its cells start their own ranks")
    for what, value in (("partition", partition), ("account", account)):
        if value is not None and not _SLURM_WORD_RE.match(value):
            raise BulwarkInputError(f"{what} {value!r}: use letters, digits, '.', '_', ',' and '-' only")
    if any(c in str(config_path) for c in "\n\r\0"):
        raise BulwarkInputError(f"config path {str(config_path)!r}: holds a newline; rename the file")
    if not _TIME_RE.match(time):
        raise BulwarkInputError(f"time {time!r}: use a SLURM time limit such as 24:00:00 or 2-00:00:00")
    # the default name is made of the config's stem with anything SLURM or the shell would trip on replaced
    name = job_name or re.sub(r"[^A-Za-z0-9._-]", "-", f"bulwark-{stage}-{Path(config_path).stem}")
    if not _NAME_RE.match(name):
        raise BulwarkInputError(f"job name {name!r}: use letters, digits, '.', '_' and '-' only")
    for item in extra_overrides:
        if "=" not in item or item.startswith("=") or any(c in item for c in "\n\r\0"):
            raise BulwarkInputError(f"override {item!r}: expected key=value on one line")
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
        config=shlex.quote(str(config_path)),
        launch=launch_command(stage, nodes, gpus_per_node, [str(config_path), *extra_overrides]),
    )


def launch_command(stage: str, nodes: int, gpus_per_node: int, args: list[str]) -> str:
    """The job's command: srun starts one torchrun per node, torchrun the stage's ranks; a bench runs its
    driver on the job's node, which starts every cell's ranks through bulwark/launch.py."""
    quoted = " ".join(shlex.quote(a) for a in args)
    if stage == BENCH:
        return f"bulwark bench {quoted}"
    nnodes = "1" if nodes == 1 else '"$SLURM_NNODES"'
    return (
        'srun --output="logs/%x-%j-%N.rank.out" --kill-on-bad-exit=1 \\\n'
        "    torchrun \\\n"
        f"    --nnodes {nnodes} \\\n"
        f"    --nproc_per_node {gpus_per_node} \\\n"
        "    --rdzv_backend c10d \\\n"
        '    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \\\n'
        '    --rdzv_id "$SLURM_JOB_ID" \\\n'
        f"    -m {STAGE_MODULES[stage]} {quoted} --resume-if-present"
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
