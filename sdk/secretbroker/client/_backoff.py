"""The one backoff: exponential caps with full jitter (each wait drawn uniformly below its cap),
so many clients that failed together do not retry together."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.1
    """Seconds: the cap of the first wait."""
    maximum: float = 5.0
    """Seconds: no cap grows past this."""
    multiplier: float = 2.0
    draw: Callable[[float, float], float] = field(default=random.uniform, repr=False, compare=False)
    """How a wait is drawn between 0 and its cap (tests pass their own)."""

    def cap(self, attempt: int) -> float:
        """The longest wait after ``attempt`` failures in a row (0 for the first retry)."""
        return min(self.maximum, self.initial * self.multiplier**attempt)

    def delay(self, attempt: int) -> float:
        return self.draw(0.0, self.cap(attempt))
