"""Read raw rows from JSONL / JSON files or Hugging Face datasets.

A row is a plain dict from the file plus one bookkeeping key, "__line__" (an int): the 1-based line
number in a JSONL file, or the 1-based item number in a JSON list or a Hugging Face split. The format
converters use it to point error messages at FILE:LINE; it is never copied into an Example.

A source is one of:
  - a bare name found in the data folder: "sst2_train" or "sst2_train.jsonl"
  - a path to a .jsonl or .json file (a JSON list of objects, or {"data": [...]})
  - "hf:owner/name" or "hf:owner/name:split" (needs `datasets` and network; fails at once offline)
  - any of these with a row slice, Python style: "alpaca_eval[200:]", "sst2_train[:500]" (rows keep
    their line numbers), e.g. to train on rows an evaluation never reads
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from bulwark.errors import BulwarkInputError

DATA_DIR_ENV = "BULWARK_DATA_DIR"
LINE_KEY = "__line__"
_SUFFIXES = (".jsonl", ".json")
_ROW_SLICE = re.compile(r"(.+)\[(-?\d*):(-?\d*)\]")


def default_data_dir() -> Path:
    """Where `bulwark data fetch` puts the standard sets when neither data.dir nor $BULWARK_DATA_DIR is set:
    the user cache (XDG_CACHE_HOME honoured)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "bulwark" / "data"


def resolve_data_dir(configured: str | Path | None) -> Path | None:
    """The data folder: the configured one, else $BULWARK_DATA_DIR, else the user cache when `bulwark data
    fetch` made it, else None (find_file then says how to get the files)."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise BulwarkInputError(f"data folder {path} does not exist; fix data.dir or create the folder")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise BulwarkInputError(f"{DATA_DIR_ENV}={env} is not a folder; point it at the folder of JSONL files")
        return path
    cache = default_data_dir()
    return cache if cache.is_dir() else None


def read_rows(source: str, data_dir: str | Path | None = None) -> list[dict]:
    """Rows of a source as dicts, each with its line number under "__line__" (see module doc).

    data_dir=None falls back to $BULWARK_DATA_DIR for bare names.
    """
    source, rows_slice = split_row_slice(source)
    if source.startswith("hf:"):
        rows = _read_hf(source)
    else:
        path = find_file(source, data_dir)
        rows = _read_json(path) if path.suffix == ".json" else _read_jsonl(path)
    return rows[rows_slice]


def split_row_slice(source: str) -> tuple[str, slice]:
    """"name[a:b]" -> ("name", slice(a, b)); a source without a slice gets every row."""
    match = _ROW_SLICE.fullmatch(source)
    if match is None:
        if source.endswith("]") and "[" in source:
            raise BulwarkInputError(f"data source '{source}': a row slice is written [start:stop], e.g. [200:]")
        return source, slice(None)
    start, stop = (int(v) if v else None for v in match.group(2, 3))
    return match.group(1), slice(start, stop)


def find_file(source: str, data_dir: str | Path | None = None) -> Path:
    """The file a source names: an existing path as given, else a file of that name in the data folder."""
    given = Path(source).expanduser()
    if given.is_file():
        return given
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        # a bare name may omit the suffix: "sst2_train" -> sst2_train.jsonl
        names = [given.name] if given.suffix in _SUFFIXES else [given.name + s for s in _SUFFIXES]
        for name in names:
            candidate = folder / name
            if candidate.is_file():
                return candidate
        raise BulwarkInputError(
            f"data file '{source}' not found as a path or in data folder {folder}; "
            f"check the name, or put the JSONL file there (or set {DATA_DIR_ENV}){_fetch_hint(given, folder)}"
        )
    raise BulwarkInputError(
        f"data file '{source}' not found and no data folder is set (nor {default_data_dir()}); "
        f"run `bulwark data fetch` to download the standard sets there, give a path to a .jsonl/.json file, "
        f"or set {DATA_DIR_ENV} (or data.dir) to the folder holding it"
    )


def _fetch_hint(given: Path, folder: Path) -> str:
    """A standard set missing from the folder: the command that brings it."""
    from bulwark.data.catalog import CATALOG

    name = given.name.removesuffix(".jsonl")
    if name not in CATALOG:
        return ""
    return f"; `bulwark data fetch {name} --dir {folder}` downloads it"


def row_location(source: str, row: dict) -> str:
    """Where a row came from, for error messages: "FILE:LINE" for JSONL, "FILE item N" for a JSON list."""
    n = row.get(LINE_KEY, "?")
    if source.startswith("hf:") or source.endswith(".json"):
        return f"{source} item {n}"
    return f"{source}:{n}"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing newline) are harmless
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BulwarkInputError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or delete this line"
                ) from None
            if not isinstance(obj, dict):
                raise BulwarkInputError(
                    f"{path}:{lineno}: expected one JSON object per line, got {type(obj).__name__}; "
                    "write each row as {\"key\": value, ...}"
                )
            obj[LINE_KEY] = lineno
            rows.append(obj)
    if not rows:
        raise BulwarkInputError(f"{path}: no rows; the file is empty, give a file with at least one JSON object")
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise BulwarkInputError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise BulwarkInputError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}; convert it to JSONL")
    rows = []
    for i, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise BulwarkInputError(f"{path} item {i}: is {type(item).__name__}, expected a JSON object")
        rows.append({**item, LINE_KEY: i})
    if not rows:
        raise BulwarkInputError(f"{path}: no rows; give a file with at least one JSON object")
    return rows


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _read_hf(source: str) -> list[dict]:
    spec = source[len("hf:"):]
    name, _, split = spec.partition(":")
    split = split or "train"
    hint = (f"offline: save the rows as a JSONL file (one JSON object per line) in the data folder "
            f"and use its name, or set {DATA_DIR_ENV} to the folder holding it")
    if not name or name.count("/") != 1:
        raise BulwarkInputError(f"data source '{source}': expected hf:owner/name or hf:owner/name:split")
    # Decide before importing anything that could touch the network: with no `datasets` or an offline
    # switch set, a load could only hang on retries or fail late.
    if importlib.util.find_spec("datasets") is None:
        raise BulwarkInputError(f"data source '{source}' needs the `datasets` package, which is not installed; {hint}")
    if _offline():
        raise BulwarkInputError(f"data source '{source}' needs the network but HF offline mode is set; {hint}")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, unknown split: all become one user-facing line
        raise BulwarkInputError(f"data source '{source}' could not be loaded ({type(e).__name__}: {e}); {hint}") from None
    rows = [{**dict(r), LINE_KEY: i} for i, r in enumerate(ds, start=1)]
    if not rows:
        raise BulwarkInputError(f"{source}: no rows")
    return rows
