"""The layer rules of docs/DESIGN.md, read off the source: what a defense or recover method may import and
touch. A rule that only lives in a document drifts; these fail on the line that breaks one."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

ZERO_ATTRIBUTES = {"ds_id", "ds_numel", "ds_tensor", "ds_shape", "ds_status"}
SHARED = {"base", "perturbation"}  # modules of bulwark/defenses that register nothing


def imported_modules(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_defense_imports_deepspeed_or_another_defense() -> None:
    offenders = []
    for path in sorted((REPO / "bulwark" / "defenses").glob("*.py")):
        for line, module in imported_modules(path):
            if module.split(".")[0] == "deepspeed" or module.startswith("bulwark.engine"):
                offenders.append(f"{path.name}:{line} imports {module}")
            if module.startswith("bulwark.defenses.") and module.rsplit(".", 1)[1] not in SHARED:
                offenders.append(f"{path.name}:{line} imports the defense {module}")
    assert not offenders, offenders


def test_no_defense_subclasses_another() -> None:
    from bulwark.defenses import REGISTRY

    registered = set(REGISTRY.values())
    offenders = [f"{cls.name} subclasses {base.__name__}" for cls in registered for base in cls.__mro__[1:]
                 if base in registered]
    assert not offenders, offenders


def test_no_zero_attribute_outside_the_engine() -> None:
    offenders = []
    for path in sorted((REPO / "bulwark").rglob("*.py")):
        if (REPO / "bulwark" / "engine") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else (
                node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None)
            if name in ZERO_ATTRIBUTES:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not offenders, offenders


def test_no_recover_method_imports_deepspeed_or_another_method() -> None:
    from bulwark.recover.base import methods

    names = set(methods())
    offenders = []
    for path in sorted((REPO / "bulwark" / "recover").glob("*.py")):
        if path.name == "__init__.py":
            continue
        for line, module in imported_modules(path):
            if module.split(".")[0] == "deepspeed":
                offenders.append(f"{path.name}:{line} imports deepspeed")
            if module.startswith("bulwark.recover.") and module.rsplit(".", 1)[1] in names - {path.stem}:
                offenders.append(f"{path.name}:{line} imports the method {module}")
    assert not offenders, offenders
