"""Model folders as tensor stores: read one tensor at a time, check two models match, write a repaired copy.

Recover never needs a whole second or third model in memory: the aligned model A and the fine-tuned
model B are read tensor by tensor from their safetensors files (memory-mapped), and the repaired model
is written shard by shard as a copy of B's folder with some tensors replaced.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from bulwark.errors import BulwarkInputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class TensorStore:
    """The tensors of an HF model folder by name, read lazily from its safetensors file(s)."""

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder = Path(folder)
        self.what = what
        self.files = _weight_files(self.folder, what)  # tensor name -> file
        self._open: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str) -> object:
        from safetensors import safe_open

        if name not in self.files:
            raise BulwarkInputError(f"{self.what} {self.folder}: has no tensor '{name}'")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]


def _weight_files(folder: Path, what: str) -> dict[str, Path]:
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        return {name: folder / file for name, file in index["weight_map"].items()}
    if (folder / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(folder / SINGLE_FILE), framework="pt") as handle:
            return {name: folder / SINGLE_FILE for name in handle.keys()}  # noqa: SIM118 - not a dict
    raise BulwarkInputError(
        f"{what} {folder}: no {SINGLE_FILE} or {INDEX_FILE}; recover reads safetensors folders "
        f"(re-save the model with save_pretrained)"
    )


def check_compatible(aligned: Path, finetuned: Path, names: tuple[str, str] = ("aligned", "fine-tuned"),
                     rule: str = "recover needs B fine-tuned from A") -> None:
    """Two models (A and B, or the base and A) must be the same architecture with the same tensor names and
    shapes; `names` are what the error line calls them."""
    first, second = (f"{n} model" for n in names)
    configs = {}
    for what, folder in ((first, aligned), (second, finetuned)):
        try:
            configs[what] = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise BulwarkInputError(f"{what} {folder}: cannot read config.json ({exc})") from None
    a, b = configs[first], configs[second]
    for key in ("model_type", "architectures", "num_hidden_layers", "hidden_size"):
        if a.get(key) != b.get(key):
            raise BulwarkInputError(
                f"{first} {aligned} and {second} {finetuned} differ in {key}: {a.get(key)!r} vs {b.get(key)!r}; {rule}"
            )
    store_a, store_b = TensorStore(aligned, first), TensorStore(finetuned, second)
    names_a, names_b = set(store_a.names()), set(store_b.names())
    if a.get("tie_word_embeddings") or b.get("tie_word_embeddings"):
        # a tied output head is the embedding matrix: one folder may store it under lm_head.weight too
        names_a.discard("lm_head.weight")
        names_b.discard("lm_head.weight")
    if names_a != names_b:
        only = sorted(names_a ^ names_b)[0]
        side = first if only in names_a else second
        raise BulwarkInputError(
            f"{first} {aligned} and {second} {finetuned} hold different tensors ('{only}' is only in the {side}); {rule}"
        )
    for name in sorted(names_a):
        if store_a.shape(name) != store_b.shape(name):
            raise BulwarkInputError(
                f"tensor '{name}' has shape {store_a.shape(name)} in the {first} but {store_b.shape(name)} in the "
                f"{second}; {rule}"
            )


def write_model(source: Path, target: Path, replace: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Copy HF folder `source` to `target` with every tensor passed through `replace(name, tensor)`.

    Shard by shard (one shard in memory at a time), into `target.tmp`, renamed into place at the end.
    """
    from safetensors.torch import load_file, save_file

    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = sorted(set(_weight_files(source, "model").values()))
    for item in source.iterdir():
        if item.is_file() and item not in shards and item.name != "bulwark_complete.json":
            shutil.copy2(item, tmp / item.name)
    for shard in shards:
        tensors = load_file(str(shard))
        save_file({name: replace(name, t).contiguous() for name, t in tensors.items()}, str(tmp / shard.name),
                  metadata={"format": "pt"})
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
