"""Defenses, one module each, registered by name. Importing this package registers them all."""

from bulwark.defenses import (  # noqa: F401  (registration side effect)
    booster,
    lisa,
    mix,
    refusal_ul,
    repnoise,
    sft,
    smart,
    tvaccine,
    vaccine,
)
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

__all__ = ["REGISTRY", "Defense", "MemoryCost", "build_defense", "defense_config", "describe", "register",
           "resolve_defense_spec"]
