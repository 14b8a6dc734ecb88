"""The one way tlexp derives a seed from a run's seed and a position (epoch, image, view, rank).

Every random stream of a run (shuffling, each image's augmentation, each cached view, the model's
dropout) is seeded from ``mix(stream, seed, ...)``, never from a global RNG's state: a run resumed
at epoch k draws what a run that never stopped drew, whatever the number of workers or processes.
"""

from __future__ import annotations

# Stream names keep two uses of the same numbers apart (image 3 of epoch 1 vs view 1 of image 3).
SHUFFLE, AUGMENT, VIEW, RESEED = 1, 2, 3, 4
_PRIME = 1_000_003


def mix(stream: int, *parts: int) -> int:
    """A non-negative 63-bit seed from ``stream`` and integer ``parts`` (a polynomial hash)."""
    value = stream
    for part in parts:
        value = (value * _PRIME + part) % 2**63
    return value
