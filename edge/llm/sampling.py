"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Temperatures outside this range are not a sampling choice but a mistake: below it the
# distribution is greedy anyway (and a denormal overflows the scaled logits to inf), above it
# sampling is uniform noise. 0 (or greedy=True) is the way to ask for greedy decoding.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 100.0


@dataclass(frozen=True)
class Sampler:
    """temperature 0 (or greedy) picks the argmax; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    greedy: bool = False

    def __post_init__(self) -> None:
        t = self.temperature
        if (
            isinstance(t, bool)
            or not isinstance(t, int | float)
            or not math.isfinite(t)
            or (t != 0 and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)
        ):
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, "
                f"{MAX_TEMPERATURE:g}], got {t!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")

    def kept(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids that survive the filters and their renormalised probabilities."""
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.greedy or self.temperature == 0:
            return np.array([int(np.argmax(z))]), np.ones(1)
        ids = np.arange(z.size)
        if 0 < self.top_k < z.size:
            ids = np.argpartition(z, -self.top_k)[-self.top_k :]  # the k largest, unordered
            z = z[ids]
        z = z / self.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if self.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, self.top_p)) + 1]  # smallest set reaching top_p
            ids, probs = ids[keep], probs[keep] / probs[keep].sum()
        return ids, probs

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The full distribution sampled from (zeros outside the kept set)."""
        ids, probs = self.kept(logits)
        full = np.zeros(np.asarray(logits).size)
        full[ids] = probs
        return full

    def __call__(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        """One token id."""
        if self.greedy or self.temperature == 0:
            return int(np.argmax(logits))
        ids, probs = self.kept(logits)
        cum = np.cumsum(probs)
        return int(
            ids[min(np.searchsorted(cum, rng.random() * cum[-1], side="right"), cum.size - 1)]
        )
