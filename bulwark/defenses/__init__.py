"""Defenses, one module each, registered by name. Importing this package registers them all."""

from bulwark.defenses import booster, lisa, mix, repnoise, sft, smart, tvaccine, vaccine  # noqa: F401  (registration side effect)
from bulwark.defenses.base import REGISTRY, Defense, build_defense, describe, register

__all__ = ["REGISTRY", "Defense", "build_defense", "describe", "register"]
