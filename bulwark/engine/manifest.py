"""Tamper evidence for checkpoints: a sha256 manifest per step_N folder, checked before anything in it is
unpickled, and Bulwark's own per-rank state restricted to what torch.load(weights_only=True) accepts.
docs/DESIGN.md ("Run folder, checkpoints, export") says what this does and does not protect against."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from bulwark.engine.dist import all_gather_objects, broadcast_object
from bulwark.errors import BulwarkInputError

MANIFEST = "MANIFEST.json"
_TAG = re.compile(r"step_\d+")
_CHUNK = 8 << 20


def latest_checkpoint(root: Path) -> Path:
    """The step_N folder `root/latest` names; a name that is not a step_N folder of `root` is refused, so
    that `latest` cannot point a resume outside the run's checkpoints."""
    latest = root / "latest"
    if not latest.is_file():
        raise BulwarkInputError(f"--resume: no finished checkpoint under {root} (no 'latest' file)")
    tag = latest.read_text().strip()
    if not _TAG.fullmatch(tag) or not (root / tag).is_dir():
        raise BulwarkInputError(
            f"{latest}: names {tag[:80]!r}, not a step_N folder of {root}; write the name of one of its "
            "step_N folders into it, or start over with --overwrite"
        )
    return root / tag


def _files(tag_dir: Path) -> tuple[list[str], str | None]:
    """Every regular file under `tag_dir` but the manifest, as sorted relative POSIX paths; and the
    first entry that is neither a folder nor a regular file (a link could point anywhere, a FIFO
    would block the reader), which no checkpoint holds."""
    names, odd = [], None
    for path in tag_dir.rglob("*"):
        rel = path.relative_to(tag_dir).as_posix()
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            odd = rel if odd is None else min(odd, rel)
        elif path.is_file() and rel != MANIFEST:
            names.append(rel)
    return sorted(names), odd


def _digest(path: Path) -> tuple[str, int]:
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def write_manifest(tag_dir: Path, rank: int = 0, world_size: int = 1) -> None:
    """Every rank, once every rank has finished writing `tag_dir`: digest a share of its files (a
    checkpoint holds the whole optimizer state; one reader would make every save wait on all of it);
    rank 0 writes `tag_dir/MANIFEST.json` atomically. Without a process group rank 0 of 1 does it all."""
    names = broadcast_object(_files(tag_dir)[0] if rank == 0 else None, 0)
    mine = {name: _digest(tag_dir / name) for name in names[rank::world_size]}
    digests: dict[str, tuple[str, int]] = {}
    for part in all_gather_objects(mine):
        digests.update(part)  # type: ignore[call-overload]
    if rank != 0:
        return
    files = [{"path": n, "sha256": digests[n][0], "bytes": digests[n][1]} for n in names]
    tmp = tag_dir / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())  # on disk before `latest` names this step: power loss must not leave it empty
    tmp.replace(tag_dir / MANIFEST)


def verify_manifest(tag_dir: Path, rank: int = 0, world_size: int = 1) -> None:
    """Every rank: a BulwarkInputError, the same one on every rank, unless the files under `tag_dir` are
    exactly those MANIFEST.json lists, each with its size and sha256. Each rank digests a share."""
    expected, problem = _expected_files(tag_dir)
    if problem is None:
        names = sorted(expected)
        problem = next(filter(None, (_file_problem(tag_dir, n, expected[n]) for n in names[rank::world_size])), None)
    # one collective that every rank reaches, problem or not: all ranks stop alike or go on alike
    problem = next(filter(None, all_gather_objects(problem)), None)
    if problem:
        raise BulwarkInputError(
            f"checkpoint {tag_dir}: {problem}: the checkpoint was changed after it was written; resume from an "
            f"earlier step_N by writing its name into {tag_dir.parent / 'latest'}, or start over with --overwrite"
        )


def _expected_files(tag_dir: Path) -> tuple[dict[str, tuple[str, int]], str | None]:
    """MANIFEST.json's entries, or what is wrong with it or with which files are present."""
    try:
        data = json.loads((tag_dir / MANIFEST).read_text())
        expected = {f["path"]: (f["sha256"], f["bytes"]) for f in data["files"]}
    except FileNotFoundError:
        return {}, f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {}, f"{MANIFEST} is not a Bulwark manifest ({type(exc).__name__})"
    if not all(isinstance(n, str) and isinstance(d, str) and isinstance(b, int) for n, (d, b) in expected.items()):
        return {}, f"{MANIFEST} is not a Bulwark manifest (an entry without sha256 and size)"
    present, odd = _files(tag_dir)
    if odd is not None:
        return {}, f"{odd} is not a regular file"
    missing = sorted(set(expected) - set(present))
    if missing:
        return {}, f"{missing[0]} is listed in {MANIFEST} but missing"
    extra = sorted(set(present) - set(expected))
    if extra:
        return {}, f"{extra[0]} is not listed in {MANIFEST}"
    return expected, None


def _file_problem(tag_dir: Path, name: str, expected: tuple[str, int]) -> str | None:
    try:
        sha, size = _digest(tag_dir / name)
    except OSError as exc:
        return f"{name} cannot be read ({type(exc).__name__})"
    if size != expected[1]:
        return f"{name} has {size} bytes, {MANIFEST} says {expected[1]}"
    return None if sha == expected[0] else f"{name} differs from its sha256 in {MANIFEST}"


def load_rank_state(path: Path) -> dict[str, Any]:
    """Bulwark's per-rank state (defense state, RNG): tensors and plain Python values only, so it loads
    with weights_only=True and a crafted file cannot run code even when its manifest was rewritten too."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001  (UnpicklingError, a truncated zip, ...: all the same to the user)
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise BulwarkInputError(
            f"{path}: not a Bulwark rank state ({type(exc).__name__}: {first}); resume from an earlier step_N "
            f"by writing its name into {path.parent.parent / 'latest'}, or start over with --overwrite"
        ) from None
    if not isinstance(state, dict) or "rng" not in state:
        raise BulwarkInputError(f"{path}: not a Bulwark rank state (no 'rng' entry)")
    return state


_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Refuse what torch.load(weights_only=True) would refuse at resume (a numpy value, an object).
    Types compare exactly: numpy's float64 is a float subclass that weights_only still refuses."""
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not (isinstance(value, torch.Tensor) or type(value) in _SCALARS):
        raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint's rank state holds tensors and plain "
                        "Python values only (it loads with weights_only=True)")
