"""Linear algebra on factored updates ΔW = U · D (U: out×r, D: r×in), never forming the out×in matrix.

The core fact: with thin QR factorisations U = Qu·Ru and Dᵀ = Qd·Rd,
    U·D = Qu · (Ru·Rdᵀ) · Qdᵀ,
so the singular values of ΔW are those of the r×r core Ru·Rdᵀ, and its singular vectors are the
core's rotated by Qu and Qd. Every function here costs O((out+in)·r² + r³), not O(out·in·r).

Conv factors are handled by the caller flattening down to (r, in·kh·kw) and up to (out, r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def as_matrices(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten conv factors to matrices: up (out, r[,1,1]) -> (out, r); down (r, in[,kh,kw]) -> (r, in·kh·kw)."""
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)


@dataclass
class Spectrum:
    """Thin SVD of a factored matrix: ΔW = U · diag(S) · Vh (S descending)."""

    U: torch.Tensor  # (out, k)
    S: torch.Tensor  # (k,)
    Vh: torch.Tensor  # (k, in)


def _qr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linalg.qr(x, mode="reduced")


def core(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0, dtype=torch.float64):
    """QR both factors; return (Qu, core, Qd) with U·D·scale = Qu · core · Qdᵀ."""
    u, d = as_matrices(up.to(dtype), down.to(dtype))
    qu, ru = _qr(u)
    qd, rd = _qr(d.T)
    return qu, (ru @ rd.T) * scale, qd


def singular_values(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0,
                    dtype=torch.float64) -> torch.Tensor:
    """Singular values of scale·up·down (descending), from the r×r core."""
    _, c, _ = core(up, down, scale, dtype)
    return torch.linalg.svdvals(c)


def frobenius_norm(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0,
                   dtype=torch.float64) -> float:
    """‖scale·up·down‖_F via the r×r Gram matrices: ‖UD‖² = tr((UᵀU)(DDᵀ))."""
    u, d = as_matrices(up.to(dtype), down.to(dtype))
    val = torch.sum((u.T @ u) * (d @ d.T))
    return float(torch.sqrt(torch.clamp(val, min=0.0)) * abs(scale))


def spectrum(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0,
             dtype=torch.float64) -> Spectrum:
    """Thin SVD of scale·up·down without forming it."""
    qu, c, qd = core(up, down, scale, dtype)
    uc, s, vch = torch.linalg.svd(c, full_matrices=False)
    return Spectrum(U=qu @ uc, S=s, Vh=vch @ qd.T)


def stack(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factored sum: Σ wᵢ·Uᵢ·Dᵢ = [w₁U₁ | w₂U₂ | …] · [D₁; D₂; …] (ranks add up).

    ``factors`` holds (up, down, weight) with up/down already flattened to matrices; the weight (which
    may be negative) multiplies the up factor.
    """
    ups = [u * w for u, _, w in factors]
    downs = [d for _, d, _ in factors]
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def choose_rank(S: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                sv_ratio: float | None = None, sv_fro: float | None = None,
                max_rank: int | None = None) -> int:
    """Smallest k that meets the criterion, capped by len(S) and max_rank; at least 1.

    rank     : fixed k
    energy   : Σ_{i<k} Sᵢ² / Σ Sᵢ² ≥ energy   (Frobenius energy kept)
    sv_fro   : √(Σ_{i<k} Sᵢ² / Σ Sᵢ²) ≥ sv_fro  (Frobenius norm kept, kohya's sv_fro)
    sv_ratio : keep Sᵢ with Sᵢ ≥ S₀ / sv_ratio (kohya's sv_ratio)
    """
    n = int(S.numel())
    if n == 0:
        return 0
    cap = n if max_rank is None else max(1, min(n, max_rank))
    given = [x is not None for x in (rank, energy, sv_ratio, sv_fro)]
    if sum(given) != 1:
        raise ValueError("exactly one of rank, energy, sv_ratio, sv_fro must be given")
    s = S.to(torch.float64)
    if rank is not None:
        if rank < 1:
            raise ValueError("rank must be at least 1")
        return min(rank, cap)
    total = float(torch.sum(s * s))
    if total == 0.0:
        return 1
    if energy is not None or sv_fro is not None:
        target = energy if energy is not None else sv_fro**2
        if not 0.0 < target <= 1.0:
            raise ValueError("energy/sv_fro must be in (0, 1]")
        cum = torch.cumsum(s * s, 0) / total
        # smallest k with cum[k-1] >= target (tolerate rounding at the top)
        k = int(torch.searchsorted(cum, torch.tensor(target - 1e-12, dtype=cum.dtype)).item()) + 1
        return max(1, min(k, cap))
    if sv_ratio is not None:
        if sv_ratio < 1.0:
            raise ValueError("sv_ratio must be at least 1")
        k = int(torch.sum(s >= s[0] / sv_ratio).item())
        return max(1, min(k, cap))
    raise AssertionError


def retained(S: torch.Tensor, k: int) -> float:
    """Fraction of the Frobenius norm kept by the top-k singular values: √(Σ_{i<k} Sᵢ² / Σ Sᵢ²)."""
    s2 = S.to(torch.float64) ** 2
    tot = float(s2.sum())
    return 1.0 if tot == 0.0 else float((s2[:k].sum() / tot).sqrt())


def split(sp: Spectrum, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k factors with √S in both: up = U·√S (out, k), down = √S·Vh (k, in)."""
    r = torch.sqrt(sp.S[:k])
    return sp.U[:, :k] * r, r[:, None] * sp.Vh[:k]


def effective_rank(S: torch.Tensor, energy: float) -> int:
    """Number of singular values covering ``energy`` of Σ S²."""
    return choose_rank(S, energy=energy)
