"""Choosing a rank: a fixed rank, or the smallest one meeting a dynamic criterion.

:class:`RankCriteria` holds what the user asked for (shared by extract and resize);
:func:`choose_rank` applies it to a layer's singular values. Decisions are taken in float64 and a
criterion met up to round-off (|relative error| ≤ 1e-12) counts as met, so a boundary that holds
exactly in real numbers (σᵢ = σ₀/4 for sv_ratio 4) is not lost to the last bit of an SVD.
torch is imported only by :func:`choose_rank`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorahub.errors import LorahubError

DYNAMIC = ("energy", "sv_ratio", "sv_fro")
ROUND_OFF = 1e-12  # relative slack for a criterion met exactly in real numbers


def finite(value, what: str) -> float:
    """``value`` as a float; LorahubError when it is not a real number or is NaN / infinite."""
    if isinstance(value, bool):
        raise LorahubError(f"{what} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LorahubError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise LorahubError(f"{what} must be a finite number, got {value!r}")
    return v


def whole(value, what: str, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``; LorahubError for NaN, inf, fractions, booleans."""
    v = finite(value, what)
    if v != int(v):
        raise LorahubError(f"{what} must be a whole number, got {value!r}")
    if v < minimum:
        raise LorahubError(f"{what} must be at least {minimum}, got {value!r}")
    return int(v)


@dataclass
class RankCriteria:
    """A fixed ``rank``, or one dynamic criterion capped by ``rank`` (None: no cap).

    energy   : keep the smallest k with Σ_{i<k} σᵢ² / Σ σᵢ² ≥ energy (in (0, 1])
    sv_fro   : the same on the Frobenius norm: √(Σ_{i<k} σᵢ² / Σ σᵢ²) ≥ sv_fro (in (0, 1])
    sv_ratio : keep every σᵢ ≥ σ₀ / sv_ratio (at least 1)
    """

    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    sv_fro: float | None = None

    @property
    def dynamic(self) -> str | None:
        """The dynamic criterion in use (energy | sv_ratio | sv_fro), or None for a fixed rank."""
        return next((k for k in DYNAMIC if getattr(self, k) is not None), None)

    def validate(self) -> None:
        """One clear LorahubError for a bad request (NaN and infinities included)."""
        for k in DYNAMIC:
            if getattr(self, k) is not None:
                finite(getattr(self, k), k)
        dyn = [k for k in DYNAMIC if getattr(self, k) is not None]
        if len(dyn) > 1:
            raise LorahubError("give at most one of energy, sv_ratio, sv_fro")
        if not dyn and self.rank is None:
            raise LorahubError("give a rank, or a dynamic criterion (energy, sv_ratio or sv_fro)")
        if self.rank is not None:
            whole(self.rank, "rank")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise LorahubError("energy must be in (0, 1]")
        if self.sv_fro is not None and not 0 < self.sv_fro <= 1:
            raise LorahubError("sv_fro must be in (0, 1]")
        if self.sv_ratio is not None and self.sv_ratio < 1:
            raise LorahubError("sv_ratio must be at least 1")

    def criterion(self, cap: int | None = None) -> dict:
        """Keyword arguments of :func:`choose_rank`; ``cap`` replaces ``rank`` (e.g. a conv rank)."""
        cap = self.rank if cap is None else cap
        dyn = self.dynamic
        return {"rank": cap} if dyn is None else {dyn: getattr(self, dyn), "max_rank": cap}

    def describe(self) -> str:
        dyn = self.dynamic
        if dyn is None:
            return f"rank={self.rank}"
        return f"{dyn}={getattr(self, dyn)}" + (f" (cap {self.rank})" if self.rank else "")

    def tag(self) -> str:
        """Short form for default file names: ``r16``, ``energy``, ``sv-ratio``, ``sv-fro``."""
        return f"r{self.rank}" if self.dynamic is None else self.dynamic.replace("_", "-")


def choose_rank(S, *, rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None,
                sv_fro: float | None = None, max_rank: int | None = None) -> int:
    """Smallest k that meets the criterion, capped by len(S) and ``max_rank``; at least 1 (0 when S
    is empty). ``S``: singular values, descending. Exactly one of rank, energy, sv_ratio, sv_fro."""
    import torch

    n = int(S.numel())
    if n == 0:
        return 0
    cap = n if max_rank is None else max(1, min(n, max_rank))
    if sum(x is not None for x in (rank, energy, sv_ratio, sv_fro)) != 1:
        raise ValueError("exactly one of rank, energy, sv_ratio, sv_fro must be given")
    if any(x is not None and not math.isfinite(x) for x in (rank, energy, sv_ratio, sv_fro)):
        raise ValueError("the rank criterion must be a finite number")
    if rank is not None:
        if rank < 1:
            raise ValueError("rank must be at least 1")
        return min(rank, cap)
    s = S.to(torch.float64)
    total = float(torch.sum(s * s))
    if total == 0.0:
        return 1
    if sv_ratio is not None:
        if sv_ratio < 1.0:
            raise ValueError("sv_ratio must be at least 1")
        k = int(torch.sum(s * float(sv_ratio) >= s[0] * (1.0 - ROUND_OFF)).item())
        return max(1, min(k, cap))
    target = energy if energy is not None else sv_fro ** 2
    if not 0.0 < target <= 1.0:
        raise ValueError("energy/sv_fro must be in (0, 1]")
    cum = torch.cumsum(s * s, 0) / total
    # smallest k with cum[k-1] >= target, up to round-off
    k = int(torch.searchsorted(cum, torch.tensor(target * (1.0 - ROUND_OFF), dtype=cum.dtype)).item()) + 1
    return max(1, min(k, cap))
