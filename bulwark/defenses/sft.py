"""SFT: plain supervised fine-tuning, min_w E_(x,y)~D [-log p_w(y | x)].

At the align stage D is the refusal data (the usual safety alignment); at the finetune stage D is
the user's upload, which makes plain SFT the harmful fine-tuning attack every defense is measured
against.
"""

from __future__ import annotations

from bulwark.defenses.base import Defense, MemoryCost, register


@register
class SFT(Defense):
    name = "sft"
    summary = "plain supervised fine-tuning (the baseline, and the attack at the finetune stage)"
    memory = MemoryCost(what="nothing extra")  # the base Defense: engine.forward_loss, one graph, no buffers
