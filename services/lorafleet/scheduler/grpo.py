"""GRPO advantages: rewards normalised within each prompt's group of samples."""

from __future__ import annotations

import math
from collections.abc import Sequence

# A group whose rewards are all equal carries no learning signal; its samples
# get advantage 0 instead of a division by ~0 blowing them up.
STD_EPSILON = 1e-6


def group_advantages(rewards_G: Sequence[float], *, normalise_std: bool = True) -> list[float]:
    """(r - mean) / std within one group (std=1 when not normalising)."""
    n = len(rewards_G)
    if n == 0:
        return []
    mean = sum(rewards_G) / n
    centred = [r - mean for r in rewards_G]
    if not normalise_std:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / n)
    if std < STD_EPSILON:
        return [0.0] * n
    return [c / std for c in centred]


def batch_advantages(rewards_P_G: Sequence[Sequence[float]]) -> list[list[float]]:
    """Advantages for every prompt's group."""
    return [group_advantages(group) for group in rewards_P_G]
