"""Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter").

Used for reconnects, registration and report retries.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays for retries: uniform in [0, min(cap, base · 2^n)], n = failures so far.

    Full jitter spreads the reconnects of many agents after a broker restart, so
    they do not all arrive in the same instant.
    """

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next try; counts one more failure."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.failures, 30)))
        self.failures += 1
        return self._rng.uniform(self.base_s / 2 if self.failures == 1 else 0.0, ceiling)

    def reset(self) -> None:
        """A success: the next failure starts from the base again."""
        self.failures = 0
