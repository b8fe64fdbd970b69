"""Linear algebra on factored updates ΔW = U · D (U: out×r, D: r×in), never forming the out×in matrix.

The core fact: with thin QR factorisations U = Qu·Ru and Dᵀ = Qd·Rd,
    U·D = Qu · (Ru·Rdᵀ) · Qdᵀ,
so the singular values of ΔW are those of the r×r core Ru·Rdᵀ, and its singular vectors are the
core's rotated by Qu and Qd. Every function here costs O((out+in)·r² + r³), not O(out·in·r).

Conv factors are handled by the caller flattening down to (r, in·kh·kw) and up to (out, r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorahub.linalg.rank import choose_rank


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


# ----- Gram-core routines (added for inspect/diff) -------------------------------------------------
# With Gu = UᵀU and Gd = D·Dᵀ (both r×r), ΔW = U·D has ‖ΔW‖²_F = tr(Gu·Gd) and its non-zero singular
# values are those of Luᵀ·Ld where Gu = Lu·Luᵀ and Gd = Ld·Ldᵀ (Cholesky): (U·Lu⁻ᵀ) and (Dᵀ·Ld⁻ᵀ) have
# orthonormal columns; their squares are the eigenvalues of Luᵀ·Gd·Lu. Forming the Grams is one BLAS-3 product per factor — cheaper than a QR — and
# the rest is r×r work. Grams square the condition number, so singular values far below
# √eps·σ_max come out as noise near zero; norms, spectral norms and energy-based effective ranks
# (what inspect reports) are unaffected. Rank-deficient Grams fall back to a symmetric square root.


def grams(up: torch.Tensor, down: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(UᵀU, D·Dᵀ) in float64, the products taken in ``dtype`` (conv factors flattened)."""
    u, d = as_matrices(up.to(dtype), down.to(dtype))
    return (u.T @ u).to(torch.float64), (d @ d.T).to(torch.float64)


def _psd_sqrt_factor(g: torch.Tensor) -> torch.Tensor:
    """L with L·Lᵀ = g for a symmetric positive semi-definite g (Cholesky, else eigen square root)."""
    g = (g + g.T) * 0.5
    lower, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return lower
    ev, vec = torch.linalg.eigh(g)
    return vec * torch.sqrt(torch.clamp(ev, min=0.0))


def singular_values_from_grams(gu: torch.Tensor, gd: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values (descending, float64) of scale·U·D given its Grams UᵀU and D·Dᵀ."""
    # σ² are the eigenvalues of Luᵀ·Gd·Lu (Gu = Lu·Luᵀ): one Cholesky and one symmetric eigensolve.
    lu = _psd_sqrt_factor(gu.to(torch.float64))
    m = lu.T @ gd.to(torch.float64) @ lu
    ev = torch.linalg.eigvalsh((m + m.T) * 0.5)
    return torch.sqrt(torch.clamp(ev, min=0.0)).flip(0) * abs(float(scale))


def gram_singular_values(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0,
                         dtype=torch.float32) -> torch.Tensor:
    """Singular values of scale·up·down via r×r Gram matrices (fast path; see the note above)."""
    gu, gd = grams(up, down, dtype)
    return singular_values_from_grams(gu, gd, scale)


def inner_product(up1: torch.Tensor, down1: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor,
                  scale1: float = 1.0, scale2: float = 1.0, dtype=torch.float64) -> float:
    """Frobenius inner product ⟨s1·U1·D1, s2·U2·D2⟩ = s1·s2·tr((U1ᵀU2)(D2·D1ᵀ)), from r1×r2 products."""
    u1, d1 = as_matrices(up1.to(dtype), down1.to(dtype))
    u2, d2 = as_matrices(up2.to(dtype), down2.to(dtype))
    if u1.shape[0] != u2.shape[0] or d1.shape[1] != d2.shape[1]:
        raise ValueError(f"shapes differ: {tuple(u1.shape[:1]) + tuple(d1.shape[1:])} vs "
                         f"{tuple(u2.shape[:1]) + tuple(d2.shape[1:])}")
    val = torch.sum((u1.T @ u2) * (d1 @ d2.T))
    return float(val) * float(scale1) * float(scale2)


def cosine_similarity(up1: torch.Tensor, down1: torch.Tensor, up2: torch.Tensor, down2: torch.Tensor,
                      scale1: float = 1.0, scale2: float = 1.0, dtype=torch.float64) -> float | None:
    """⟨ΔW1, ΔW2⟩ / (‖ΔW1‖_F·‖ΔW2‖_F) from the factors; None when either update is zero."""
    n1 = frobenius_norm(up1, down1, scale1, dtype)
    n2 = frobenius_norm(up2, down2, scale2, dtype)
    if n1 == 0.0 or n2 == 0.0:
        return None
    c = inner_product(up1, down1, up2, down2, scale1, scale2, dtype) / (n1 * n2)
    return max(-1.0, min(1.0, c))


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Overlap of the spans of two orthonormal column sets a (n×ka), b (n×kb): ‖aᵀb‖²_F / min(ka, kb).

    1 when the smaller span lies inside the larger, 0 when they are orthogonal; two random spans in
    n dimensions give about max(ka, kb)/n.
    """
    k = min(a.shape[1], b.shape[1])
    if k == 0:
        return None
    m = a.to(torch.float64).T @ b.to(torch.float64)
    return float(torch.sum(m * m)) / k


# ------------------------------------------------------------------------------------------------
# Low-rank approximation of a dense matrix (extract): exact spectrum from the Gram matrix, fast
# randomized factors, checked against the Eckart–Young optimum, exact SVD as the fallback.
# ------------------------------------------------------------------------------------------------
def _linalg_errors():
    return (torch.linalg.LinAlgError, RuntimeError)


def _with_f64_retry(fn, A: torch.Tensor, what: str = "SVD"):
    """Run fn(A) in A's dtype; on non-convergence retry in float64. Returns (result, retried)."""
    try:
        out = fn(A)
        if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
            raise torch.linalg.LinAlgError(f"{what} produced non-finite values")
        return out, False
    except _linalg_errors():
        if A.dtype == torch.float64:
            raise
        return fn(A.to(torch.float64)), True


def _gram_spectrum(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(G = X·Xᵀ, all singular values of X descending in float64, retried_f64) for a wide X."""

    def go(Y):
        G = Y @ Y.T
        return G, torch.linalg.eigvalsh(G)

    try:
        G, ev = go(X)
        if not torch.isfinite(ev).all():
            raise torch.linalg.LinAlgError("eigvalsh produced non-finite values")
        retried = False
    except _linalg_errors():
        if X.dtype == torch.float64:
            raise
        G, ev = go(X.to(torch.float64))
        retried = True
    ev = torch.clamp(ev.to(torch.float64), min=0.0).flip(0)
    return G, torch.sqrt(ev), retried


def exact_singular_values(A: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """All singular values of A (descending, float64) from the eigenvalues of the smaller Gram
    matrix (A·Aᵀ or Aᵀ·A): O(m·n·min(m,n)) without any singular vectors. Returns (S, retried_f64)."""
    X = A if A.shape[0] <= A.shape[1] else A.T
    _, S, retried = _gram_spectrum(X)
    return S, retried


def randomized_svd_gram(X: torch.Tensor, G: torch.Tensor, k: int, *, oversample: int | None = None,
                        power_iters: int = 2, seed: int = 0) -> tuple[Spectrum, bool]:
    """Top-k SVD of a wide X (m ≤ n) given its Gram G = X·Xᵀ: the range finder and the power
    iterations run on G (m×m, cost O(m²·l) each), then one pass B = Qᵀ·X (O(m·n·l)) and an SVD of
    the small l×n matrix. Range of G^(q+1)·Ω = range of (X·Xᵀ)^q·X·(Xᵀ·Ω): q+1 power iterations."""
    m, n = X.shape
    p = oversample if oversample is not None else max(8, k // 2)
    l = min(k + p, m)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega_cpu = torch.randn(m, l, generator=gen, dtype=torch.float32)

    def go(Y):
        Gd = G.to(Y.dtype)
        Q, _ = torch.linalg.qr(Gd @ omega_cpu.to(device=Y.device, dtype=Y.dtype))
        for _ in range(power_iters):
            Q, _ = torch.linalg.qr(Gd @ Q)
        Ub, S, Vh = torch.linalg.svd(Q.T @ Y, full_matrices=False)
        return Q @ Ub, S, Vh

    (U, S, Vh), retried = _with_f64_retry(go, X, "randomized SVD")
    return Spectrum(U=U[:, :k], S=S[:k], Vh=Vh[:k]), retried


def exact_svd(A: torch.Tensor, k: int | None = None) -> tuple[Spectrum, bool]:
    """Thin SVD (torch.linalg.svd, full_matrices=False), top k kept; float64 retry on failure."""
    (U, S, Vh), retried = _with_f64_retry(lambda X: torch.linalg.svd(X, full_matrices=False), A)
    if k is not None:
        U, S, Vh = U[:, :k], S[:k], Vh[:k]
    return Spectrum(U=U, S=S, Vh=Vh), retried


def randomized_svd(A: torch.Tensor, k: int, *, oversample: int | None = None, power_iters: int = 2,
                   seed: int = 0) -> tuple[Spectrum, bool]:
    """Top-k SVD by a randomized range finder with subspace (power) iterations (Halko, Martinsson &
    Tropp 2011). Cost O(m·n·(k+p)·(2q+2)). Deterministic for a given seed. float64 retry on failure."""
    m, n = A.shape
    transpose = m > n  # work on the wide orientation: smaller QRs
    X0 = A.T if transpose else A
    rows, cols = X0.shape
    p = oversample if oversample is not None else max(8, k // 2)
    l = min(k + p, rows, cols)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega_cpu = torch.randn(cols, l, generator=gen, dtype=torch.float32)

    def go(X):
        om = omega_cpu.to(device=X.device, dtype=X.dtype)
        Q, _ = torch.linalg.qr(X @ om)
        for _ in range(power_iters):
            Z, _ = torch.linalg.qr(X.T @ Q)
            Q, _ = torch.linalg.qr(X @ Z)
        B = Q.T @ X
        Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
        return Q @ Ub, S, Vh

    (U, S, Vh), retried = _with_f64_retry(go, X0, "randomized SVD")
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    if transpose:
        U, Vh = Vh.T, U.T
    return Spectrum(U=U, S=S, Vh=Vh), retried


@dataclass
class Approximation:
    """Result of :func:`low_rank_approx`: the top-k spectrum and how it was obtained."""

    spectrum: Spectrum       # top-k: ΔW ≈ U·diag(S)·Vh
    k: int
    S_all: torch.Tensor      # every singular value of A (descending, float64 from a float64 Gram matrix)
    retained: float          # Frobenius fraction kept by the returned factors (before any cast)
    optimum: float           # Eckart–Young optimum for this k, in float64: √(Σ_{i<k} σᵢ² / ‖A‖²_F)
    method: str              # "exact" | "randomized" | "exact-fallback"
    float64_retry: bool
    norm2: float = 0.0       # ‖A‖²_F in float64 (the trace of the Gram matrix)


def low_rank_approx(A: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                    sv_ratio: float | None = None, sv_fro: float | None = None,
                    max_rank: int | None = None, method: str = "auto", tol: float = 1e-3,
                    small: int = 256, seed: int = 0, power_iters: int = 2) -> Approximation:
    """Best rank-k approximation of a dense matrix A (out, in), k chosen by :func:`choose_rank`.

    Every singular value comes from the eigenvalues of the smaller Gram matrix formed in float64
    (A's entries are exact in float64, so the optimum √(Σ_{i<k} σᵢ²/‖A‖²) and the rank decision are
    float64-accurate; ‖A‖² is the Gram's trace). method "exact": thin SVD of A for the factors.
    "randomized"/"auto": the factors from :func:`randomized_svd_gram` (in A's dtype, on the Gram); their
    Frobenius retained is compared with the optimum and, when it falls short by more than ``tol``
    (relative), the exact SVD is used instead ("exact-fallback"). "auto" also goes exact for small
    matrices (min side ≤ ``small``) or when k is over a third of it.
    """
    if A.dim() != 2:
        raise ValueError("low_rank_approx needs a matrix")
    if not torch.isfinite(A).all():
        raise ValueError("matrix has NaN or infinite entries")
    m, n = A.shape
    crit = dict(rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank)
    transpose = m > n
    X = A.T if transpose else A
    G, S_all, _ = _gram_spectrum(X.to(torch.float64))
    total = float(torch.trace(G))
    k = choose_rank(S_all, **crit)
    opt = _retained_of(S_all, k, total)
    go_exact = method == "exact" or (method == "auto" and (min(m, n) <= small or 3 * k > min(m, n)))
    if go_exact:
        del G
        sp, r64 = exact_svd(A, k)
        got = _retained_of(sp.S, k, total)
        return Approximation(sp, k, S_all, got, opt, "exact", r64, total)
    sp, r2 = randomized_svd_gram(X, G, k, seed=seed, power_iters=power_iters)
    del G
    if transpose:
        sp = Spectrum(U=sp.Vh.T, S=sp.S, Vh=sp.U.T)
    got = _retained_of(sp.S, k, total)
    if opt - got > tol * opt:
        ex, r3 = exact_svd(A, k)
        return Approximation(ex, k, S_all, _retained_of(ex.S, k, total), opt, "exact-fallback", r2 or r3, total)
    return Approximation(sp, k, S_all, got, opt, "randomized", r2, total)


def _retained_of(S: torch.Tensor, k: int, total: float) -> float:
    """√(Σ_{i<k} Sᵢ² / total) in float64, at most 1 (1 for a zero matrix)."""
    if total <= 0:
        return 1.0
    return math.sqrt(min(1.0, float((S[:k].to(torch.float64) ** 2).sum()) / total))


def residual_retained(A: torch.Tensor, up: torch.Tensor, down: torch.Tensor, norm2: float | None = None) -> float:
    """Frobenius fraction of A kept by up·down, √(1 − ‖A − up·down‖²/‖A‖²), computed in float64
    (A and the factors as given, e.g. after a cast to the saved dtype): never above the optimum
    beyond float64 round-off."""
    A64 = A.to(torch.float64)
    tot = float(torch.sum(A64 * A64)) if norm2 is None else norm2
    if tot <= 0:
        return 1.0
    res = A64 - up.to(device=A.device, dtype=torch.float64) @ down.to(device=A.device, dtype=torch.float64)
    err = float(torch.sum(res * res))
    return math.sqrt(max(0.0, 1.0 - err / tot))


def quantile(x: torch.Tensor, q: float) -> float:
    """The q-quantile of the values of x with linear interpolation (what ``torch.quantile`` returns),
    by two k-th value selections: no size limit."""
    v = x.reshape(-1).to(torch.float64)
    n = v.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    a = float(torch.kthvalue(v, lo + 1).values)
    b = float(torch.kthvalue(v, hi + 1).values) if hi != lo else a
    return a + (pos - lo) * (b - a)


def kohya_clamp(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """kohya's clamp (sd-scripts networks/extract_lora_from_models.py): with up = U·diag(S) and down = Vh,
    hi = the q-quantile of the values of both factors together (signed, linear interpolation), and both
    factors are clipped to [−hi, hi]. Returns (up, down, hi)."""
    hi = quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi), hi
