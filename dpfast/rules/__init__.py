"""Per-sample gradient rules, one per layer type, each with its pure-PyTorch reference maths.

``find_rule(module)`` returns the rule whose layer type (and exact forward) the module has, or None.
"""
from __future__ import annotations

from torch import nn

from .attention import MultiheadAttentionRule
from .base import Rule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .normalization import GroupNormRule, LayerNormRule

RULES: list[Rule] = [LinearRule(), ConvRule(), GroupNormRule(), LayerNormRule(), EmbeddingRule(),
                     MultiheadAttentionRule()]

SUPPORTED = ("Linear, Conv1d, Conv2d, ConvTranspose1d, ConvTranspose2d, GroupNorm, LayerNorm, Embedding, "
             "MultiheadAttention")


def find_rule(module: nn.Module) -> Rule | None:
    for rule in RULES:
        if rule.matches(module):
            return rule
    return None


__all__ = ["RULES", "SUPPORTED", "Rule", "find_rule"]
