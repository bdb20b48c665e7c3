"""Schedules of the bimodal global estimators."""

from __future__ import annotations

import math


def cosine_gamma(epoch: int, gamma_min: float = 0.2, decay_epochs: int = 18) -> float:
    """FastCLIP's weight of the new estimate in ``u``: 1 at epoch 0, cosine-decayed to ``gamma_min``.

    ``gamma_e = gamma_min + (1 - gamma_min) * (1 + cos(pi * e / decay_epochs)) / 2`` for
    ``1 <= e < decay_epochs``, ``gamma_min`` afterwards.

    Examples:
        >>> [round(cosine_gamma(epoch), 3) for epoch in (0, 1, 9, 18, 30)]
        [1.0, 0.994, 0.6, 0.2, 0.2]
    """
    if epoch <= 0:
        return 1.0
    if epoch >= decay_epochs:
        return gamma_min
    return gamma_min + (1.0 - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))
