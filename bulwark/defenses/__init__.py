"""Defenses, one module each, registered by name. Importing this package imports every module in it, so
a new defense is one new file here (its `@register` does the rest): no list to edit."""

import importlib
import pkgutil

from bulwark.defenses.base import (
    REGISTRY,
    Defense,
    MemoryCost,
    build_defense,
    defense_config,
    describe,
    register,
    resolve_defense_spec,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_") and _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["REGISTRY", "Defense", "MemoryCost", "build_defense", "defense_config", "describe", "register",
           "resolve_defense_spec"]
