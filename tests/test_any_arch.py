"""Factor operations need no architecture: a Flux.1 kohya file (BFL names), a Flux.1 diffusers file and
an SD3 diffusers file at their real shapes are catalogued under their families, inspected, resized,
merged and converted, with numbers checked against ΔW materialised from the raw file tensors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from lorahub.tiny_loras import diffusers_tensors, dit_modules, flux_kohya_modules, kohya_tensors, save_tensors

FLUX_KINDS = ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj", "linear1")
FLUX_META = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}


def _qkv(path: str) -> bool:
    return bool(re.search(r"transformer_blocks\.\d+\.attn\.to_[qkv]$", path))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two fp32 rank-4 LoRAs (seeds 1, 2) per family: Flux.1 kohya (BFL names, 19 + 38 blocks), Flux.1
    diffusers (q/k/v of every block), SD3-medium diffusers (every attention projection)."""
    d = tmp_path_factory.mktemp("dit")
    out = {}
    for seed in (1, 2):
        out[f"fk{seed}"] = save_tensors(d / f"flux-kohya-{seed}.safetensors", kohya_tensors(
            flux_kohya_modules(kinds=FLUX_KINDS), rank=4, alpha=2.0, seed=seed, dtype="float32", scale=0.05),
            FLUX_META if seed == 1 else None)
        out[f"fd{seed}"] = save_tensors(d / f"flux-diffusers-{seed}.safetensors", diffusers_tensors(
            dit_modules("flux", _qkv), rank=4, seed=seed, dtype="float32", scale=0.05), {"format": "pt"})
        out[f"sd{seed}"] = save_tensors(d / f"sd3-{seed}.safetensors", diffusers_tensors(
            dit_modules("sd3"), rank=4, seed=seed, dtype="float32", scale=0.05), {"format": "pt"})
    return out


# kohya's BFL names of Flux.1 -> the diffusers modules each stands for, with their rows of the up-matrix
# (FORMATS.md: q, k, v fused in qkv; q, k, v and the MLP input fused in single blocks' linear1)
_BFL_PARTS = {
    "img_attn_qkv": [("attn.to_q", 3072), ("attn.to_k", 3072), ("attn.to_v", 3072)],
    "txt_attn_qkv": [("attn.add_q_proj", 3072), ("attn.add_k_proj", 3072), ("attn.add_v_proj", 3072)],
    "img_attn_proj": [("attn.to_out.0", 3072)], "txt_attn_proj": [("attn.to_add_out", 3072)],
    "linear1": [("attn.to_q", 3072), ("attn.to_k", 3072), ("attn.to_v", 3072), ("proj_mlp", 12288)],
}


def _bfl_parts(module: str, up: torch.Tensor):
    """(canonical key, its rows of ``up``) for a kohya Flux module name."""
    m = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(\w+)", module)
    block = f"transformer.{'transformer_blocks' if m[1] == 'double' else 'single_transformer_blocks'}.{m[2]}"
    start = 0
    for path, rows in _BFL_PARTS[m[3]]:
        yield f"{block}.{path}", up[start:start + rows]
        start += rows


def factors(path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(up, down, scale) per module straight from the file's tensors, float64: kohya up·down·alpha/r
    (a fused Flux.1 module split into the diffusers modules it stands for, keyed canonically),
    diffusers B·A."""
    out = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for m in sorted({k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}):
            if f"{m}.lora_down.weight" in keys:
                down, up = f.get_tensor(f"{m}.lora_down.weight"), f.get_tensor(f"{m}.lora_up.weight")
                scale = float(f.get_tensor(f"{m}.alpha")) / down.shape[0]
            else:
                down, up, scale = f.get_tensor(f"{m}.lora_A.weight"), f.get_tensor(f"{m}.lora_B.weight"), 1.0
            if m.startswith("lora_unet_"):
                for key, rows in _bfl_parts(m, up):
                    out[key] = (rows.double(), down.double(), scale)
            else:
                out[m] = (up.double(), down.double(), scale)
    return out


def sigma(up, down, scale) -> torch.Tensor:
    """Singular values of scale·up·down, descending: the square roots of the eigenvalues of the r×r
    product (upᵀup)(down·downᵀ) (the non-zero eigenvalues of ΔWᵀΔW)."""
    ev = torch.linalg.eigvals((up.T @ up) @ (down @ down.T)).real.clamp(min=0)
    return torch.sort(ev.sqrt() * abs(scale), descending=True).values


def sample(path, n: int = 4) -> dict[str, torch.Tensor]:
    """ΔW materialised (float64) for n modules spread over the file, among those of at most 3072×3072."""
    fs = {m: f for m, f in factors(path).items() if f[0].shape[0] * f[1].shape[1] <= 3072 * 3072}
    mods = sorted(fs)
    pick = [mods[int(i * (len(mods) - 1) / (n - 1))] for i in range(n)]
    return {m: fs[m][0] @ fs[m][1] * fs[m][2] for m in pick}


# resize and svd merge work on the family's original fused modules (kohya's qkv / linear1), as kohya's
# tools do: the canonical keys of one fused module, by the pattern of its parts
_FUSED = (re.compile(r"^(transformer\.transformer_blocks\.\d+\.attn2?\.)to_[qkv]$"),
          re.compile(r"^(transformer\.transformer_blocks\.\d+\.attn\.)add_[qkv]_proj$"),
          re.compile(r"^(transformer\.single_transformer_blocks\.\d+\.)(?:attn\.to_[qkv]|proj_mlp)$"))


def fused_parts(fs: dict, module: str) -> list[str]:
    """The modules of ``fs`` fused with ``module`` in the original layout (itself alone if none)."""
    for pat in _FUSED:
        m = pat.match(module)
        if m:
            return sorted(k for k in fs if (hit := pat.match(k)) and hit[1] == m[1])
    return [module]


def fused_sigma(terms: list[list[tuple]]) -> torch.Tensor:
    """Singular values of Σ_terms of one fused module's ΔW: ``terms`` holds per term its parts'
    (up, down, coef), the parts' rows stacked (a block-diagonal up over the stacked downs)."""
    ups = [torch.block_diag(*(u * c for u, _, c in parts)) for parts in terms]
    downs = [torch.cat([d for _, d, _ in parts]) for parts in terms]
    return sigma(torch.cat(ups, 1), torch.cat(downs, 0), 1.0)


def diff_norm(out, parts_in: list[tuple]) -> float:
    """‖ΔW_out − Σ coef·up·down‖_F of one module, factored (never materialised)."""
    ups = [out.up.double() * out.scale] + [-u * c for u, _, c in parts_in]
    downs = [out.down.double()] + [d for _, d, _ in parts_in]
    return float(sigma(torch.cat(ups, 1), torch.cat(downs, 0), 1.0).norm())


def key_of(module: str) -> str:
    """The canonical key lorahub reports for a module of :func:`factors`."""
    return module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
def test_add_catalogues_flux_and_sd3(files, home, run):
    rc, out, err = run("add", files["fk1"], files["fd1"], files["sd1"])
    assert rc == 0, err
    rc, out, err = run("list", "--json")
    got = {e["file_name"]: (e["base"], e["base_model"], e["format"]) for e in json.loads(out)}
    assert got == {"flux-kohya-1.safetensors": ("flux", "flux-1-dev", "kohya"),
                   "flux-diffusers-1.safetensors": ("flux", None, "diffusers"),
                   "sd3-1.safetensors": ("sd3", "sd3-medium", "diffusers")}
    rc, out, err = run("search", "--base", "flux", "--json")
    assert sorted(e["file_name"] for e in json.loads(out)) == ["flux-diffusers-1.safetensors",
                                                                "flux-kohya-1.safetensors"]
    rc, out, err = run("show", "flux-kohya-1", "--json")
    ev = json.loads(out)["extra"]["base_evidence"]
    assert ev[0] == "shapes: BFL-layout 19 double + 38 single blocks at width 3072 -> flux"
    assert "modelspec.architecture: flux-1-dev/lora -> flux (flux-1-dev)" in ev


@pytest.mark.parametrize("name,blocks", [("fk1", 57), ("fd1", 57), ("sd1", 24)])
def test_inspect_norms_equal_the_materialised_delta(files, run, name, blocks):
    rc, out, err = run("inspect", files[name], "--json")
    assert rc == 0, err
    rep = json.loads(out)
    per = {s["key"]: s for s in rep["per_layer"]}
    fs = factors(files[name])
    assert len(per) == len(fs) == rep["layers"]  # a Flux kohya file: its fused modules split
    for m, d in sample(files[name]).items():  # against ΔW materialised from the raw tensors
        s = per[key_of(m)]
        assert s["fro"] == pytest.approx(float(d.norm()), rel=1e-5)
        assert s["materialised"] is False and s["shape"] == list(d.shape)
    for m, f in fs.items():  # every layer, big ones too, against its singular values
        S = sigma(*f)
        assert per[key_of(m)]["fro"] == pytest.approx(float(S.norm()), rel=1e-5)
        assert per[key_of(m)]["spectral"] == pytest.approx(float(S[0]), rel=1e-5)
    assert rep["totals"]["fro"] == pytest.approx(sum(float(sigma(*f).norm()) ** 2 for f in fs.values()) ** 0.5,
                                                 rel=1e-5)
    assert len({b["block"] for b in rep["blocks"]}) == blocks
    assert rep["unmapped_layers"] == 0
    assert rep["base"] == {"fk1": "flux", "fd1": "flux", "sd1": "sd3"}[name]


@pytest.mark.parametrize("name", ["fk1", "fd1", "sd1"])
def test_resize_to_rank_two_and_losslessly_to_full_rank(files, tmp_path, run, name):
    from lorahub.formats.io import load_lora

    src = files[name]
    raw = sample(src)
    rc, out, err = run("resize", src, "--rank", "2", "--out", tmp_path / "r2.safetensors", "--json")
    assert rc == 0, err
    small = load_lora(tmp_path / "r2.safetensors")
    assert {layer.rank for layer in small.layers.values()} == {2}
    with safe_open(str(src), "pt") as a, safe_open(str(tmp_path / "r2.safetensors"), "pt") as b:
        assert {k.rsplit(".lora_", 1)[0] for k in a.keys()} == {k.rsplit(".lora_", 1)[0] for k in b.keys()}
    fs = factors(src)
    for m in raw:  # rank 2 keeps exactly the top two singular directions of the fused module (Eckart–Young)
        parts = fused_parts(fs, m)
        got = sum(diff_norm(small.layers[key_of(p)], [fs[p]]) ** 2 for p in parts) ** 0.5
        assert got == pytest.approx(float(fused_sigma([[fs[p] for p in parts]])[2:].norm()), rel=1e-4)
    # full rank: q/k/v with their own lora_A fuse into rank 12
    rc, out, err = run("resize", src, "--rank", "12", "--out", tmp_path / "r4.safetensors")
    assert rc == 0, err
    full = load_lora(tmp_path / "r4.safetensors")
    for m, d in raw.items():
        assert rel(full.layers[key_of(m)].delta(torch.float64), d) < 1e-5


@pytest.mark.parametrize("pair", [("fk1", "fk2"), ("fd1", "fd2"), ("sd1", "sd2")])
def test_concat_merge_is_exact_and_svd_merge_works(files, tmp_path, run, pair):
    from lorahub.formats.detect import detect
    from lorahub.formats.io import load_lora

    a, b = (files[x] for x in pair)
    ra, rb = sample(a), sample(b)
    rc, out, err = run("merge", f"{a}:0.7", f"{b}:0.3", "--method", "concat", "--out", tmp_path / "m.safetensors")
    assert rc == 0, err
    merged = load_lora(tmp_path / "m.safetensors")
    assert detect(tmp_path / "m.safetensors").format == "kohya"  # Flux.1 and SD3 have kohya writers
    assert merged.base == ("sd3" if pair[0] == "sd1" else "flux")
    for m in ra:
        got = merged.layers[key_of(m)]
        assert got.rank == 8
        assert rel(got.delta(torch.float64), 0.7 * ra[m] + 0.3 * rb[m]) < 1e-5
    rc, out, err = run("merge", f"{a}:0.7", f"{b}:0.3", "--method", "svd", "--rank", "2",
                       "--out", tmp_path / "s.safetensors")
    assert rc == 0, err
    svd = load_lora(tmp_path / "s.safetensors")
    fa, fb = factors(a), factors(b)
    for m in ra:  # the best rank-2 approximation of the weighted sum, per fused module
        parts = fused_parts(fa, m)
        S = fused_sigma([[(u, d, 0.7 * c) for u, d, c in (fa[p] for p in parts)],
                         [(u, d, 0.3 * c) for u, d, c in (fb[p] for p in parts)]])
        err2 = sum(diff_norm(svd.layers[key_of(p)], [(u, d, 0.7 * c) for u, d, c in [fa[p]]]
                             + [(u, d, 0.3 * c) for u, d, c in [fb[p]]]) ** 2 for p in parts) ** 0.5
        assert err2 == pytest.approx(float(S[2:].norm()), rel=1e-3)


def test_conversions_that_keep_names_and_the_ones_that_need_a_map(files, tmp_path, run):
    from safetensors.torch import load_file

    # kohya -> kohya: the BFL names and factors come back bit for bit
    rc, out, err = run("convert", files["fk1"], "--to", "kohya", "--out", tmp_path / "k.safetensors", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["unmapped"] == 0 and res["layers"] == len(factors(files["fk1"])) == 304
    a, b = load_file(str(files["fk1"])), load_file(str(tmp_path / "k.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # diffusers -> peft -> diffusers, no table
    assert run("convert", files["sd1"], "--to", "peft", "--out", tmp_path / "p.safetensors")[0] == 0
    assert run("convert", tmp_path / "p.safetensors", "--to", "diffusers", "--out", tmp_path / "d.safetensors")[0] == 0
    a, b = load_file(str(files["sd1"])), load_file(str(tmp_path / "d.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the families' maps: kohya BFL names -> module paths and back (tests/test_dit_formats.py checks them)
    rc, out, err = run("convert", files["fk1"], "--to", "diffusers", "--out", tmp_path / "x.safetensors")
    assert rc == 0, err
    rc, out, err = run("convert", tmp_path / "x.safetensors", "--to", "kohya", "--out", tmp_path / "y.safetensors")
    assert rc == 0, err
    a, b = load_file(str(files["fk1"])), load_file(str(tmp_path / "y.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diff_of_two_flux_kohya_files_compares_every_layer(files, run):
    rc, out, err = run("diff", files["fk1"], files["fk2"], "--json")
    assert rc == 0, err
    rep = json.loads(out)
    n = len(factors(files["fk1"]))
    assert rep["summary"]["common"] == rep["summary"]["compared"] == n and rep["only_a"] == rep["only_b"] == []
    per = {d["key"]: d for d in rep["per_layer"]}
    ra, rb = sample(files["fk1"]), sample(files["fk2"])
    for m in ra:
        a, b = ra[m], rb[m]
        d = per[key_of(m)]
        assert d["cosine"] == pytest.approx(float((a * b).sum() / (a.norm() * b.norm())), abs=1e-6)
        assert d["norm_ratio"] == pytest.approx(float(b.norm() / a.norm()), rel=1e-5)


def test_a_family_plugs_its_own_kohya_reader_and_writer_in(files, tmp_path):
    """The hook a family with its own kohya layout uses (Flux.1's BFL names): files detected as that
    family are read, and its LoRAs written, through it; removing it restores the generic rule."""
    from lorahub.formats import kohya, names
    from lorahub.formats.io import load_lora, save_lora

    seen = []

    def read(tensors, metadata, name):
        seen.append(("read", name))
        m = kohya.read(tensors, metadata, name=name)  # the generic reader, then the family's own renaming
        m.layers = {"transformer.renamed." + k.split(".", 1)[1]: v for k, v in m.layers.items()}
        return m

    def write(model, dtype):
        seen.append(("write", len(model.layers)))
        return {"only": torch.zeros(1)}, {}

    builtin = names.family_dialect("flux")  # lorahub's own (the BFL map)
    names.register_family_dialect("flux", names.FamilyDialect(read_kohya=read, write_kohya=write))
    try:
        m = load_lora(files["fk1"])
        assert m.base == "flux" and all(k.startswith("transformer.renamed.lora_unet_") for k in m.layers)
        assert names.default_dialect(m) == "kohya"
        save_lora(m, tmp_path / "w.safetensors", dialect="kohya")
        assert seen == [("read", "flux-kohya-1.safetensors"), ("write", len(m.layers))]
        names.register_family_dialect("flux", None)  # none: the generic rule keeps the kohya names
        assert all(k.startswith("unet.lora_unet_") for k in load_lora(files["fk1"]).layers)
    finally:
        names.register_family_dialect("flux", builtin)
    assert all(k.startswith("transformer.transformer_blocks.") or k.startswith("transformer.single_")
               for k in load_lora(files["fk1"]).layers)
