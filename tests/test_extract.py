"""lorahub extract: planted low-rank fine-tunes of the tiny fixtures are recovered."""

from __future__ import annotations

import json

import pytest
import torch

from lorahub.errors import LorahubError
from lorahub.linalg import lowrank
from lorahub.ops import checkpoints as C
from lorahub.ops.extract import ExtractOptions, extract, layer_kind

PLANT_RANK = 3
NOISE = 1e-5


def _planted(name: str, shape: tuple) -> torch.Tensor | None:
    """Deterministic rank-3 ΔW for each adapted UNet layer (+ tiny noise); None for other tensors."""
    kind = layer_kind(name, shape, conv=True)
    if kind is None or not name.startswith("unet."):
        return None
    g = torch.Generator().manual_seed(abs(hash(name)) % (2**31))
    out, inn = shape[0], int(torch.tensor(shape[1:]).prod())
    u = torch.randn(out, PLANT_RANK, generator=g)
    v = torch.randn(PLANT_RANK, inn, generator=g)
    s = torch.tensor([1.0, 0.5, 0.25])[:PLANT_RANK, None]
    d = (u @ (s * v)) * (0.05 / (out * inn) ** 0.25)
    d = d + NOISE * torch.randn(out, inn, generator=g)
    return d.reshape(shape)


@pytest.fixture(scope="module")
def planted(tiny_sd1, tmp_path_factory):
    """(base folder, tuned folder, tuned single file, {name: ΔW as stored (float32)})."""
    root = tmp_path_factory.mktemp("planted")
    deltas = {}

    def transform(name, t):
        d = _planted(name, tuple(t.shape))
        if d is None:
            return t
        new = (t.float() + d).to(t.dtype)
        deltas[name] = new.float() - t.float()
        return new

    with C.open_checkpoint(tiny_sd1) as ck:
        C.write_like(ck, root / "tuned", transform=transform)
    with C.open_checkpoint(root / "tuned") as ck:
        C.save_single_file(ck, root / "tuned.safetensors")
    with C.open_checkpoint(tiny_sd1) as ck:
        C.save_single_file(ck, root / "base.safetensors")
    return tiny_sd1, root / "tuned", root / "tuned.safetensors", root / "base.safetensors", deltas


def _check_recovered(res, deltas, conv: bool):
    names = {r.name for r in res.layers}
    expected = {n[:-len(".weight")] for n, d in deltas.items()
                if conv or layer_kind(n, tuple(d.shape), conv=False)}
    assert names == expected
    for name, layer in res.model.layers.items():
        d = deltas[name + ".weight"]
        got = (layer.up.float().reshape(layer.up.shape[0], -1) @ layer.down.float().reshape(layer.rank, -1))
        ref = d.reshape(d.shape[0], -1)
        err = float((got - ref).norm())
        # what a rank-3 fit cannot capture is the planted noise (‖noise‖ ≈ NOISE·√numel)
        assert err < 1.2 * NOISE * ref.numel() ** 0.5 + 1e-4 * float(ref.norm()), (name, err)
        assert layer.alpha == layer.rank == PLANT_RANK
        assert layer.up.dtype == torch.float32


def test_extract_recovers_planted_delta_folder_and_single_file(planted):
    base, tuned_dir, tuned_file, base_file, deltas = planted
    opts = ExtractOptions(rank=PLANT_RANK, conv_rank=PLANT_RANK, dtype="fp32")
    r1 = extract(base, tuned_dir, opts)
    _check_recovered(r1, deltas, conv=True)
    assert r1.retained > 0.999
    assert any(r.kind == "conv" for r in r1.layers)
    # conv layers are stored LoCon-style: down (r, in, kh, kw), up (out, r, 1, 1)
    conv_layer = next(r for r in r1.layers if r.kind == "conv")
    lay = r1.model.layers[conv_layer.name]
    assert lay.down.dim() == 4 and lay.down.shape[2:] == (3, 3) and lay.up.shape[2:] == (1, 1)
    # the same from single-file LDM checkpoints (base folder vs tuned file, and file vs file)
    r2 = extract(base_file, tuned_file, opts)
    _check_recovered(r2, deltas, conv=True)
    for name, layer in r1.model.layers.items():
        a = layer.up.float().flatten(1) @ layer.down.float().flatten(1)
        b = r2.model.layers[name].up.float().flatten(1) @ r2.model.layers[name].down.float().flatten(1)
        assert torch.allclose(a, b, atol=1e-6)
    # text encoder unchanged: skipped, and the report says so
    assert any("text_encoder: skipped" in n for n in r1.notes)
    meta = json.loads(r1.model.metadata["lorahub_extract"])
    assert meta["frobenius_retained"] == pytest.approx(r1.retained, abs=1e-6)
    import blake3

    assert len(meta["base"]["blake3"]) == 64 and meta["base"]["blake3"] != meta["tuned"]["blake3"]
    meta2 = json.loads(r2.model.metadata["lorahub_extract"])   # single files: the files' own BLAKE3
    assert meta2["tuned"]["blake3"] == blake3.blake3(tuned_file.read_bytes()).hexdigest()
    assert meta2["base"]["blake3"] == blake3.blake3(base_file.read_bytes()).hexdigest()
    per_layer = json.loads(r1.model.metadata["lorahub_extract_layers"])
    assert set(per_layer) == set(r1.model.layers)


def test_linear_only_without_conv_rank(planted):
    base, tuned_dir, _, _, deltas = planted
    res = extract(base, tuned_dir, ExtractOptions(rank=PLANT_RANK, dtype="fp32"))
    assert all(r.kind == "linear" for r in res.layers)
    assert not any(".resnets." in n for n in res.model.layers)
    _check_recovered(res, deltas, conv=False)


@pytest.mark.parametrize("crit", [{"energy": 0.999}, {"sv_fro": 0.9995}, {"sv_ratio": 20.0}])
def test_dynamic_rank_picks_planted_rank(planted, crit):
    base, tuned_dir, _, _, deltas = planted
    opts = ExtractOptions(rank=16, conv_rank=16, dtype="fp32", **crit)
    res = extract(base, tuned_dir, opts)
    ranks = {r.name: r.rank for r in res.layers}
    assert set(ranks.values()) == {PLANT_RANK}, ranks


def test_dynamic_rank_is_capped(planted):
    base, tuned_dir, _, _, _ = planted
    res = extract(base, tuned_dir, ExtractOptions(rank=2, energy=0.999999, dtype="fp32"))
    assert {r.rank for r in res.layers} == {2}
    assert all(r.retained < 0.999 for r in res.layers)
    # the retained fraction reported is the Eckart–Young optimum for that rank
    for r in res.layers:
        assert r.retained == pytest.approx(r.optimum, abs=2e-4)


def test_fp16_output_retained_measured_after_cast(planted):
    base, tuned_dir, _, _, _ = planted
    res = extract(base, tuned_dir, ExtractOptions(rank=PLANT_RANK, dtype="fp16"))
    for name, layer in res.model.layers.items():
        assert layer.up.dtype == torch.float16 and layer.down.dtype == torch.float16
    assert 0.99 < res.retained <= 1.0


def test_clamp_quantile_limits_factor_range(planted):
    base, tuned_dir, _, _, _ = planted
    plain = extract(base, tuned_dir, ExtractOptions(rank=PLANT_RANK, dtype="fp32", method="exact"))
    clamped = extract(base, tuned_dir, ExtractOptions(rank=PLANT_RANK, dtype="fp32", method="exact",
                                                      clamp_quantile=0.75))
    for name, layer in clamped.model.layers.items():
        # kohya's layout: up = U·S, down = Vh (unit rows), both clipped to ±hi
        vals = torch.cat([layer.up.flatten(), layer.down.flatten()]).abs()
        p = plain.model.layers[name]
        s = p.up.float().reshape(p.up.shape[0], -1).norm(dim=0) ** 2  # |U·√S| columns: √S each
        assert float(vals.max()) <= float(s.max()) + 1e-6
    assert clamped.retained < plain.retained


def test_text_encoder_extracted_when_changed(tiny_sd1, tmp_path):
    deltas = {}

    def transform(name, t):
        if name.startswith("text_encoder.") and name.endswith("self_attn.q_proj.weight"):
            g = torch.Generator().manual_seed(1)
            d = torch.randn(t.shape[0], 2, generator=g) @ torch.randn(2, t.shape[1], generator=g) * 0.01
            new = (t.float() + d).to(t.dtype)
            deltas[name] = new.float() - t.float()
            return new
        return t

    with C.open_checkpoint(tiny_sd1) as ck:
        C.write_like(ck, tmp_path / "te", transform=transform)
    res = extract(tiny_sd1, tmp_path / "te", ExtractOptions(rank=2, dtype="fp32"))
    assert set(res.model.layers) == {n[:-len(".weight")] for n in deltas}
    assert any("text_encoder: extracted" in n for n in res.notes)
    assert res.retained > 0.9999
    # --no-text-encoder / a large --min-diff skip it
    with pytest.raises(LorahubError, match="nothing to extract"):
        extract(tiny_sd1, tmp_path / "te", ExtractOptions(rank=2, text_encoder=False))
    with pytest.raises(LorahubError, match="nothing to extract"):
        extract(tiny_sd1, tmp_path / "te", ExtractOptions(rank=2, min_diff=1.0))


def test_identical_models_and_bad_options(tiny_sd1, tiny_sdxl):
    with pytest.raises(LorahubError, match="identical"):
        extract(tiny_sd1, tiny_sd1, ExtractOptions(rank=4))
    with pytest.raises(LorahubError, match="at most one"):
        extract(tiny_sd1, tiny_sd1, ExtractOptions(rank=4, energy=0.9, sv_fro=0.9))
    with pytest.raises(LorahubError):
        extract(tiny_sd1, tiny_sdxl, ExtractOptions(rank=4))


# ----- the low-rank engine -----------------------------------------------------------------------
def _decaying(m, n, decay=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    s = torch.exp(-torch.arange(r, dtype=torch.float32) / decay) + 0.01
    return (U * s) @ V.T, s


def test_randomized_matches_eckart_young_optimum():
    A, s = _decaying(400, 700)
    ap = lowrank.low_rank_approx(A, rank=24, method="randomized")
    assert ap.method == "randomized"
    exact = torch.linalg.svdvals(A.double())
    assert torch.allclose(ap.S_all[:24], exact[:24], rtol=1e-4)
    opt = lowrank.retained(exact, 24)
    assert ap.optimum == pytest.approx(opt, rel=1e-5)
    assert opt - ap.retained <= 1e-3 * opt
    # the factors really retain that much
    sp = ap.spectrum
    approx = (sp.U * sp.S) @ sp.Vh
    kept = (1 - float((A - approx).norm() ** 2 / A.norm() ** 2)) ** 0.5
    assert kept == pytest.approx(ap.retained, abs=1e-4)


def test_randomized_falls_back_to_exact_when_it_misses():
    # flat spectrum, no power iterations: the randomized range misses badly -> exact fallback
    g = torch.Generator().manual_seed(3)
    A = torch.randn(300, 300, generator=g)
    ap = lowrank.low_rank_approx(A, rank=20, method="randomized", power_iters=0, tol=1e-6)
    assert ap.method == "exact-fallback"
    assert ap.retained == pytest.approx(lowrank.retained(torch.linalg.svdvals(A.double()), 20), rel=1e-6)


def test_float64_retry_on_non_convergence(monkeypatch):
    A, _ = _decaying(50, 60)
    real = torch.linalg.svd
    calls = []

    def flaky(X, *a, **k):
        calls.append(X.dtype)
        if X.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(X, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    ap = lowrank.low_rank_approx(A, rank=5, method="exact")
    assert ap.float64_retry and calls == [torch.float32, torch.float64]
    assert ap.retained == pytest.approx(lowrank.retained(torch.linalg.svdvals(A.double()), 5), rel=1e-6)


# ----- diffusers cross-check: the saved LoRA reproduces the tuned UNet ---------------------------
@pytest.mark.parametrize("dialect", ["kohya", "diffusers"])
def test_extracted_lora_loaded_by_diffusers_reproduces_tuned_unet(planted, tmp_path, dialect):
    import warnings

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from lorahub.formats.io import save_lora

    base, tuned_dir, tuned_file, _, _ = planted
    res = extract(base, tuned_file, ExtractOptions(rank=PLANT_RANK, conv_rank=PLANT_RANK, dtype="fp16"))
    out = save_lora(res.model, tmp_path / f"x-{dialect}.safetensors", dialect=dialect)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10, 500])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = UNet2DConditionModel.from_pretrained(str(tuned_dir), subfolder="unet").eval()
        pipe = StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True)
        with torch.no_grad():
            y_tuned = tuned(x, t, enc).sample
            y_base = pipe.unet(x, t, enc).sample
        pipe.load_lora_weights(str(out))
        with torch.no_grad():
            y_lora = pipe.unet(x, t, enc).sample
    gap = float((y_base - y_tuned).norm())
    assert gap > 0.05 * float(y_tuned.norm())          # the fine-tune matters
    assert float((y_lora - y_tuned).norm()) < 0.01 * gap  # and the LoRA reproduces it


# ----- CLI -------------------------------------------------------------------------------------
def test_cli_extract_register_and_report(planted, tmp_path, home, cli):
    from lorahub.formats.io import load_lora
    from lorahub.registry import Registry

    base, _, tuned_file, _, deltas = planted
    out = tmp_path / "ex.safetensors"
    r = cli("extract", "tiny-sd1", str(tuned_file), "--rank", str(PLANT_RANK), "--conv-rank", str(PLANT_RANK),
            "--dtype", "fp32", "--out", str(out), "--register", "--type", "style", "--trigger", "zq",
            "--json", home=home)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["frobenius_retained"] > 0.999 and rep["layers"] == len(deltas)
    assert {b["block"] for b in rep["blocks"]} >= {"unet.down_blocks.0", "unet.mid_block", "unet.up_blocks.1"}
    model = load_lora(out)
    assert set(model.layers) == {n[:-len(".weight")] for n in deltas}
    reg = Registry.open(home)
    entry = reg.get(rep["registered"]["id"])
    assert entry["type"] == "style" and entry["triggers"] == ["zq"] and entry["rank"] == PLANT_RANK
    lin = reg.lineage(entry["id"])
    assert sorted(x["relation"] for x in lin) == ["extracted-from", "extracted-from"]
    meta = json.loads(model.metadata["lorahub_extract"])
    assert {x["parent"] for x in lin} == {meta["base"]["blake3"], meta["tuned"]["blake3"]}
    assert {x["detail"]["role"] for x in lin} == {"base", "tuned"}
    # the human report: a table of blocks and the total
    r = cli("extract", "tiny-sd1", str(tuned_file), "--rank", "2", "--out", str(tmp_path / "h.safetensors"),
            home=home)
    assert r.returncode == 0, r.stderr
    assert "retained" in r.stdout and "unet.mid_block" in r.stdout and "total" in r.stdout
    assert "text_encoder: skipped" in r.stdout


def test_cli_extract_bad_input(tmp_path, home, cli):
    r = cli("extract", "tiny-sd1", str(tmp_path / "nope.safetensors"), home=home)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error:")
    r = cli("extract", "tiny-sd1", "tiny-sd1", "--energy", "0.9", "--sv-fro", "0.9", home=home)
    assert r.returncode == 2 and "at most one" in r.stderr


def test_sdxl_unet_and_second_text_encoder(tiny_sdxl, tmp_path):
    from lorahub.formats.io import load_lora, save_lora

    deltas = {}

    def transform(name, t):
        if name.endswith((".attn1.to_q.weight", "self_attn.v_proj.weight")) and not name.startswith("text_encoder."):
            g = torch.Generator().manual_seed(len(name))
            d = torch.randn(t.shape[0], 2, generator=g) @ torch.randn(2, t.shape[1], generator=g) * 0.01
            new = (t.float() + d).to(t.dtype)
            deltas[name[:-len(".weight")]] = new.float() - t.float()
            return new
        return t

    with C.open_checkpoint(tiny_sdxl) as ck:
        C.write_like(ck, tmp_path / "tuned", transform=transform)
    res = extract(tiny_sdxl, tmp_path / "tuned", ExtractOptions(rank=2, dtype="fp32"))
    assert res.family == "sdxl"
    assert set(res.model.layers) == set(deltas)
    assert any(n.startswith("text_encoder_2.") for n in deltas)
    assert any("text_encoder_2: extracted" in n for n in res.notes)
    assert any("text_encoder: skipped" in n for n in res.notes)
    out = save_lora(res.model, tmp_path / "x.safetensors", dialect="kohya")
    back = load_lora(out)
    for name, d in deltas.items():
        lay = back.layers[name]
        assert torch.allclose(lay.up.float() @ lay.down.float() * lay.scale, d, atol=1e-5)


def test_nan_difference_is_an_error_naming_the_layer():
    from lorahub.ops.extract import extract_layer

    d = torch.zeros(8, 6)
    d[2, 3] = float("nan")
    with pytest.raises(LorahubError, match="unet.x.to_q.*NaN"):
        extract_layer(d, "linear", ExtractOptions(rank=2), "unet.x.to_q")


def test_registry_checkpoints_as_base_and_tuned(planted, home, capsys):
    """BASE/TUNED given as registry references of single-file checkpoints; lineage names the entries."""
    from lorahub.cli.app import main
    from lorahub.registry import Registry

    _, _, tuned_file, base_file, deltas = planted
    reg = Registry.open(home)
    b, _ = reg.add_file(base_file, name="tiny-base-ckpt")
    t, _ = reg.add_file(tuned_file, name="tiny-tuned-ckpt")
    assert b["kind"] == t["kind"] == "checkpoint"
    out = home.parent / "reg-ex.safetensors"
    with pytest.raises(SystemExit) as ex:
        main(["extract", "tiny-base-ckpt", t["id"][:8], "--rank", str(PLANT_RANK), "--out", str(out),
              "--register", "--json", "--home", str(home)])
    assert ex.value.code in (0, None)
    rep = json.loads(capsys.readouterr().out)
    assert rep["layers"] == sum(1 for n, d in deltas.items() if layer_kind(n, tuple(d.shape), conv=False))
    reg = Registry.open(home)
    lin = reg.lineage(rep["registered"]["id"])
    assert {x["parent_id"] for x in lin} == {b["id"], t["id"]}
    assert {x["relation"] for x in lin} == {"extracted-from"}


def test_exact_method_gives_the_same_update(planted):
    base, tuned_dir, _, _, _ = planted
    # tiny layers take the exact path under "auto"; force the randomized one to compare it
    a = extract(base, tuned_dir, ExtractOptions(rank=PLANT_RANK + 2, dtype="fp32", method="randomized"))
    b = extract(base, tuned_dir, ExtractOptions(rank=PLANT_RANK + 2, dtype="fp32", method="exact"))
    assert {r.method for r in b.layers} == {"exact"}
    assert {r.method for r in a.layers} <= {"randomized", "exact-fallback"}
    assert sum(r.method == "randomized" for r in a.layers) > len(a.layers) // 2
    for r in a.layers:
        assert r.optimum - r.retained <= 1e-3 * r.optimum + 1e-6
    for name, la in a.model.layers.items():
        lb = b.model.layers[name]
        da = la.up.flatten(1) @ la.down.flatten(1)
        db = lb.up.flatten(1) @ lb.down.flatten(1)
        # directions 4 and 5 are noise (nearly degenerate): they may differ, by at most the noise
        assert float((da - db).norm()) < 2 * NOISE * db.numel() ** 0.5, name
    assert a.retained == pytest.approx(b.retained, abs=1e-5)
