"""Flux.1 and SD3 end to end on the tiny offline fixtures: the pipelines themselves, and sweep / render
checked against diffusers' own pipeline with ``load_lora_weights`` + ``set_adapters``."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import transformers

from lorahub import tiny, tiny_loras
from lorahub.errors import LorahubError

KINDS = ("flux", "sd3")
PROMPT = "a red cat"
MAX_LEN = tiny.T5_MAX_LENGTH


@pytest.fixture(scope="module")
def pipelines():
    return {k: tiny.ensure(k) for k in KINDS}


def _pipeline_class(kind):
    import diffusers

    return {"flux": diffusers.FluxPipeline, "sd3": diffusers.StableDiffusion3Pipeline}[kind]


def _files(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_dit_pipeline_is_deterministic_and_reloads(kind, pipelines, tmp_path):
    from lorahub.formats import names

    a = tiny.build(kind, tmp_path / "a")
    b = tiny.build(kind, tmp_path / "b")
    assert _files(a) == _files(b) == _files(pipelines[kind])  # same bytes on every build
    # diffusers' own pipeline class loads it offline, tokenizers included
    pipe = _pipeline_class(kind).from_pretrained(a, local_files_only=True)
    t5 = pipe.tokenizer_2 if kind == "flux" else pipe.tokenizer_3
    assert isinstance(t5, transformers.T5TokenizerFast) and t5.model_max_length == MAX_LEN
    ids = t5(PROMPT).input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids and t5.decode(ids[:-1]) == PROMPT
    img = pipe(PROMPT, num_inference_steps=2, height=32, width=32, max_sequence_length=MAX_LEN,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all() and img.std() > 0.01
    # the built-in architecture table is the derivation from the fixture's own configs
    arch = names.get_arch(f"tiny-{kind}")
    assert arch.family == kind == names.family_of_folder(a)
    assert arch.modules == names.arch_of_folder(a).modules
    assert "transformer.transformer_blocks.0.attn.to_q" in arch.modules


def _lora(kind, seed=1):
    """A random LoRA on every linear of the transformer blocks and the first CLIP's attention, with the
    raw diffusers tensors of the same factors (built by the test helper, not lorahub's writer)."""
    from lorahub.ops.models import load_pipeline

    pipe = load_pipeline(f"tiny-{kind}")
    keep = {"transformer": lambda p: "transformer_blocks." in p, "text_encoder": lambda p: "self_attn" in p}
    return tiny_loras.pipeline_lora(pipe, seed=seed, rank=4, scale=0.3, keep=keep)


def _diffusers_image(kind, folder, raw, alpha, seed=3, guidance=3.5):
    pipe = _pipeline_class(kind).from_pretrained(folder, local_files_only=True)
    if raw is not None:
        pipe.load_lora_weights({k: v.clone() for k, v in raw.items()}, adapter_name="x")
        pipe.set_adapters(["x"], [alpha])
    pipe.set_progress_bar_config(disable=True)
    im = pipe(PROMPT, num_inference_steps=2, height=32, width=32, guidance_scale=guidance, max_sequence_length=MAX_LEN,
              generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(im).astype(int)


@pytest.mark.parametrize("kind", KINDS)
def test_render_equals_diffusers_set_adapters(kind, pipelines, tmp_path):
    from lorahub.formats.io import save_lora
    from lorahub.ops.sweep import render

    model, raw = _lora(kind)
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in model.layers) == (kind == "flux")
    path = save_lora(model, tmp_path / "x.safetensors", dialect="diffusers")
    base = _diffusers_image(kind, pipelines[kind], None, 0)
    for alpha in (0.0, 0.6, 1.0):
        r = render([(str(path), alpha)], f"tiny-{kind}", [PROMPT], seeds=[3], steps=2, size=32, guidance=3.5,
                   out=tmp_path / f"r{alpha}.png", registry=tmp_path / "home", add_triggers=False)
        assert r.files[0]["file"] == str(tmp_path / f"r{alpha}.png")
        ours = np.asarray(r.images[0]).astype(int)
        ref = _diffusers_image(kind, pipelines[kind], raw, alpha)
        assert np.abs(ours - ref).max() <= 2, alpha
        if alpha == 0.0:
            assert np.abs(ours - base).max() <= 2  # α = 0 is the base model
        else:
            assert np.abs(ours - base).max() > 4  # the LoRA changes the picture (so the test can fail)


def test_sweep_batches_every_alpha_in_one_call(pipelines, tmp_path):
    """A Flux sweep (distilled guidance: no CFG halves) renders the strengths as one batch; each cell
    equals the single render at its α, and the grid is written with its parameters."""
    from PIL import Image

    from lorahub.formats.io import save_lora
    from lorahub.ops.sweep import render, sweep

    model, _raw = _lora("flux", seed=2)
    path = save_lora(model, tmp_path / "x.safetensors", dialect="diffusers")
    alphas = [0.0, 0.5, 1.0]
    res = sweep([str(path)], "tiny-flux", [PROMPT], alphas=alphas, seeds=[3], steps=2, size=32, guidance=3.5,
                out=tmp_path / "grid.png", registry=tmp_path / "home", add_triggers=False)
    assert (res.rows, res.columns) == (1, 3) and res.layers_skipped == [0]
    assert res.layers_applied == [len(model.layers)]
    assert res.params["dtype"] == "float32"
    for a, im in zip(alphas, res.images):
        one = render([(str(path), a)], "tiny-flux", [PROMPT], seeds=[3], steps=2, size=32, guidance=3.5,
                     out=tmp_path / f"one{a}.png", registry=tmp_path / "home", add_triggers=False)
        assert np.abs(np.asarray(im).astype(int) - np.asarray(one.images[0]).astype(int)).max() <= 2
    assert np.abs(np.asarray(res.images[0]).astype(int) - np.asarray(res.images[2]).astype(int)).max() > 4
    with Image.open(tmp_path / "grid.png") as g:
        assert '"base": "tiny-flux"' in g.text["lorahub"]


def test_dit_refusals(pipelines, tmp_path):
    from lorahub.formats.io import save_lora
    from lorahub.ops.sweep import render

    model, _raw = _lora("flux")
    model.layers = {k: v for k, v in model.layers.items() if k.startswith("transformer.")}
    path = save_lora(model, tmp_path / "x.safetensors", dialect="diffusers")
    kw = dict(seeds=[1], steps=1, size=32, registry=tmp_path / "home", add_triggers=False)
    with pytest.raises(LorahubError, match="negative prompt"):
        render([str(path)], "tiny-flux", [PROMPT], negative="blurry", out=tmp_path / "a.png", **kw)
    with pytest.raises(LorahubError, match="does not fit this model"):
        render([str(path)], "tiny-flux", [PROMPT], scheduler="ddim", out=tmp_path / "b.png", **kw)
    # a Flux LoRA on an SD1 model: wrong base model, one clear line
    with pytest.raises(LorahubError, match="another base model"):
        render([str(path)], "tiny-sd1", [PROMPT], out=tmp_path / "c.png", **kw)
    # ... and on the tiny SD3 model, whose module names and widths happen to match: the family tells
    model.base = "flux"
    kohya = save_lora(model, tmp_path / "flux-kohya.safetensors", dialect="kohya")
    with pytest.raises(LorahubError, match="a flux LoRA, and this pipeline is sd3"):
        render([str(kohya)], "tiny-sd3", [PROMPT], out=tmp_path / "d.png", **kw)
    assert not list(tmp_path.glob("*.png"))


def test_previews_export_keeps_existing_files_and_creates_no_registry(run, home, tmp_path, png_bytes):
    from lorahub.registry import Registry

    # `previews` on a home without a registry: one error line, and no registry is created
    code, _, err = run("previews", "anything")
    assert code == 2 and "no lorahub registry" in err and not (home / "registry.db").exists()
    assert not home.exists() or not any(home.iterdir())
    lora = tiny_loras.save_tensors(tmp_path / "x.safetensors", tiny_loras.kohya_tensors(tiny_loras.TINY_SD1_KOHYA))
    img = tmp_path / "p.png"
    img.write_bytes(png_bytes())
    reg = Registry.open(home)
    entry, _ = reg.add_file(lora, name="x")
    reg.add_preview(entry["id"], img, kind="grid")
    out = tmp_path / "out"
    code, text, err = run("previews", entry["id"], "--export", out, "--json")
    assert code == 0, err
    (dest,) = [p for p in out.iterdir()]
    assert dest.read_bytes() == img.read_bytes() and dest.name.startswith("x-")
    dest.write_bytes(b"mine")
    code, _, err = run("previews", entry["id"], "--export", out)
    assert code == 2 and "exists" in err and dest.read_bytes() == b"mine"  # not overwritten without --force
    code, _, err = run("previews", entry["id"], "--export", out, "--force")
    assert code == 0, err
    assert dest.read_bytes() == img.read_bytes()
