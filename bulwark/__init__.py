"""Bulwark: alignment, fine-tuning and recovery defenses for fine-tuning-as-a-service on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
