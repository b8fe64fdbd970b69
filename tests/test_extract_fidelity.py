"""Exact reported numbers and kohya's clamp (issue #19 items 4 and 5), NaN/inf refused (issue #13 item 11)."""

from __future__ import annotations

import math

import pytest
import torch

from lorahub.errors import LorahubError
from lorahub.linalg import lowrank
from lorahub.linalg.rank import RankCriteria, choose_rank
from lorahub.ops import checkpoints as C
from lorahub.ops.extract import ExtractOptions, extract, extract_layer


def _spectrum_matrix(m: int, n: int, seed: int = 0, decay: float = 6.0, floor: float = 0.02) -> torch.Tensor:
    """A float32 matrix with a decaying spectrum and a full-rank tail (like a fine-tune's ΔW)."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    s = torch.exp(-torch.arange(r, dtype=torch.float64) / decay) + floor
    return ((U * s) @ V.T * 1e-2).to(torch.float32)


def _kohya_reference(mat: torch.Tensor, rank: int, q: float) -> torch.Tensor:
    """kohya's extract_lora_from_models.py, step by step (float32 SVD, U·S, quantile of both, clamp):
    the product of the clamped factors."""
    U, S, Vh = torch.linalg.svd(mat)
    U = U[:, :rank] @ torch.diag(S[:rank])
    Vh = Vh[:rank, :]
    hi = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), q)
    return U.clamp(-hi, hi) @ Vh.clamp(-hi, hi)


@pytest.mark.parametrize("q", [0.99, 0.9, 0.7])
def test_clamp_is_kohyas_rule(q):
    mat = _spectrum_matrix(96, 160, seed=3)
    up, down, rep = extract_layer(mat, "linear", ExtractOptions(rank=8, dtype="fp32", method="exact",
                                                               clamp_quantile=q))
    got = up.double() @ down.double()
    ref = _kohya_reference(mat, 8, q).double()
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    # and it really clamps: the unclamped product differs
    up0, down0, rep0 = extract_layer(mat, "linear", ExtractOptions(rank=8, dtype="fp32", method="exact"))
    assert float((up0.double() @ down0.double() - ref).norm() / ref.norm()) > 1e-4
    assert rep.retained < rep0.retained <= rep0.optimum


def test_quantile_matches_torch_quantile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1001, generator=g)
    for q in (0.5, 0.9, 0.99, 0.999, 1.0):
        assert lowrank.quantile(x, q) == pytest.approx(float(torch.quantile(x.double(), q)), abs=1e-12)


@pytest.mark.parametrize("method,dtype", [("exact", "fp32"), ("randomized", "fp32"), ("randomized", "fp16"),
                                          ("auto", "bf16")])
def test_reported_numbers_are_float64_exact(method, dtype):
    for seed, (m, n) in enumerate([(320, 768), (640, 320), (300, 1200)]):
        mat = _spectrum_matrix(m, n, seed=seed)
        up, down, rep = extract_layer(mat, "linear", ExtractOptions(rank=16, dtype=dtype, method=method))
        A = mat.double()
        S = torch.linalg.svdvals(A)
        opt = math.sqrt(float((S[:16] ** 2).sum() / (S ** 2).sum()))
        assert rep.optimum == pytest.approx(opt, rel=1e-12, abs=1e-13)  # the exact optimum, not a float32 one
        res = A - up.double() @ down.double()
        ret = math.sqrt(max(0.0, 1 - float((res * res).sum()) / float((A * A).sum())))
        assert rep.retained == pytest.approx(ret, rel=1e-12, abs=1e-13)  # of the factors as saved
        assert rep.retained <= rep.optimum * (1 + 1e-12)
        assert rep.norm == pytest.approx(float(A.norm()), rel=1e-12)


def test_float64_retained_never_above_optimum_on_a_model(tiny_sd1, tmp_path):
    def transform(name, t):
        if t.dim() in (2, 4) and name.startswith("unet.") and name.endswith(".weight"):
            g = torch.Generator().manual_seed(abs(hash(name)) % (2 ** 31))
            return (t.float() + 1e-2 * torch.randn(t.shape, generator=g)).to(t.dtype)
        return t

    with C.open_checkpoint(tiny_sd1) as ck:
        C.write_like(ck, tmp_path / "tuned", transform=transform)
    for dtype in ("fp16", "fp32"):
        res = extract(tiny_sd1, tmp_path / "tuned", ExtractOptions(rank=4, conv_rank=4, dtype=dtype))
        assert len(res.layers) > 10
        bad = [(r.name, r.retained, r.optimum) for r in res.layers if r.retained > r.optimum * (1 + 1e-12)]
        assert bad == []


@pytest.mark.parametrize("field,value", [("sv_ratio", float("nan")), ("sv_ratio", float("inf")),
                                         ("energy", float("nan")), ("sv_fro", float("inf")),
                                         ("rank", float("nan")), ("rank", 2.5)])
def test_rank_criteria_refuse_nan_and_inf(field, value):
    with pytest.raises(LorahubError, match=field):
        RankCriteria(**{field: value}).validate()
    if field != "rank":
        with pytest.raises(ValueError):
            choose_rank(torch.tensor([3.0, 2.0, 1.0]), **{field: value})


@pytest.mark.parametrize("kw", [dict(clamp_quantile=float("nan")), dict(clamp_quantile=0.3),
                                dict(min_diff=float("nan")), dict(min_diff=-1.0), dict(conv_rank=float("inf"))])
def test_extract_options_refuse_bad_numbers(tiny_sd1, kw):
    with pytest.raises(LorahubError):
        extract(tiny_sd1, tiny_sd1, ExtractOptions(rank=4, **kw))


@pytest.mark.parametrize("flag", ["--sv-ratio", "--energy", "--sv-fro"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_cli_resize_refuses_nan(tmp_path, home, cli, flag, value):
    from lorahub.tiny_loras import kohya_file

    f = kohya_file(tmp_path / "a.safetensors", rank=4)
    r = cli("resize", str(f), flag, value, "--out", str(tmp_path / "o.safetensors"), home=home)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()
