"""Acceptance test of conversion: diffusers itself loads what we write.

A file we write in diffusers or kohya form loads into the tiny fixture pipeline with `load_lora_weights`
with no missing/unexpected/ignored keys (diffusers', peft's and transformers' log records and Python
warnings are captured and must not mention any), and the UNet and text-encoder outputs then match those
of the base pipeline whose weights we changed by our own ΔW (LoraLayer.delta()).

Tolerance: fp32 throughout; max |out_lora − out_ref| ≤ 1e-4 · max |out_ref| + 1e-6 (LoRA's
W·x + s·B(A·x) against (W + s·BA)·x only differs by float rounding), while the LoRA itself moves the
outputs by more than 100× that tolerance (so a wrong mapping or scale cannot pass).
"""

from __future__ import annotations

import io
import logging
import warnings

import pytest
import torch

from lorahub.formats import names
from lorahub.formats.io import load_lora, save_lora


@pytest.fixture(scope="module")
def tiny_files():
    from lorahub import tiny_loras

    return tiny_loras.ensure()


def _pipe(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)


def _probe(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["tinychar on a hill"], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    out = {}
    with torch.no_grad():
        out["text_encoder"] = pipe.text_encoder(ids).last_hidden_state
        kwargs = {}
        if getattr(pipe, "text_encoder_2", None) is not None:
            out["text_encoder_2"] = pipe.text_encoder_2(ids).last_hidden_state
            dim = pipe.unet.config.projection_class_embeddings_input_dim - 6 * pipe.unet.config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, dim, generator=g),
                                           "time_ids": torch.randn(1, 6, generator=g)}
        sample = torch.randn(1, 4, 8, 8, generator=g)
        enc = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
        out["unet"] = pipe.unet(sample, 10, encoder_hidden_states=enc, **kwargs).sample
    return out


def _apply_delta(pipe, model) -> None:
    with torch.no_grad():
        for name, layer in model.items():
            mod = names.get_live_module(pipe, name)
            mod.weight += layer.delta(torch.float32).reshape(mod.weight.shape).to(mod.weight.dtype)


def _load_capturing(pipe, path) -> str:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name="t")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    return buf.getvalue() + "\n".join(str(w.message) for w in caught)


def _complaints(log: str, parts=("unet", "text_encoder", "text_encoder_2")) -> list[str]:
    """Log lines that report LoRA keys missing, unexpected, unused or ignored.

    transformers 5 prints a load report listing the *base* parameters of the text encoder as MISSING when
    peft loads adapter weights (only LoRA tensors are in that state dict); those lines name no LoRA
    tensor and are not complaints about our file.
    """
    bad = []
    for line in log.splitlines():
        low = line.lower()
        if "no lora keys" in low and not any(f"prefix='{p}'" in low for p in parts):
            continue  # diffusers' note about a part this LoRA does not adapt
        if any(w in low for w in ("no lora keys", "unexpected", "not used", "were not", "ignored", "invalid lora")):
            bad.append(line)
        elif ("missing" in low or "mismatch" in low) and ("lora" in low or "alpha" in low):
            bad.append(line)
    return bad

CASES = [
    ("sd1", "sd1-kohya", "kohya"),
    ("sd1", "sd1-kohya", "diffusers"),
    ("sd1", "sd1-diffusers", "kohya"),
    ("sd1", "sd1-diffusers", "diffusers"),
    ("sd1", "sd1-peft", "diffusers"),
    ("sd1", "sd1-cloneofsimo", "diffusers"),
    ("sd1", "sd1-locon", "kohya"),
    ("sdxl", "sdxl-kohya", "kohya"),
    ("sdxl", "sdxl-kohya", "diffusers"),
    ("sdxl", "sdxl-diffusers", "kohya"),
]


CASES += [("sd1", "sd1-kohya+mixed", "diffusers"), ("sdxl", "sdxl-kohya+mixed", "diffusers"),
          ("sd1", "sd1-kohya+ranks", "kohya")]


def _mixed(model, alphas=True):
    """Vary rank (and alpha) per layer (rank_pattern / alpha_pattern in diffusers' metadata)."""
    for i, (name, layer) in enumerate(sorted(model.layers.items())):
        if i % 3 == 0:
            layer.weights["down"] = layer.down[:2].clone()
            layer.weights["up"] = layer.up[:, :2].clone()
        if alphas and i % 2 == 0:
            layer.alpha = 0.5 + i % 5
    return model


@pytest.mark.parametrize("kind,src,dialect", CASES, ids=[f"{s}->{d}" for _, s, d in CASES])
def test_diffusers_loads_what_we_write(kind, src, dialect, tiny_files, tmp_path, request):
    folder = request.getfixturevalue(f"tiny_{kind}")
    model = load_lora(tiny_files[src.split("+")[0]])
    if "+" in src:
        model = _mixed(model, alphas=src.endswith("+mixed"))
        assert len(set(model.ranks())) == 2
    assert model.arch == f"tiny-{kind}"
    model.embeddings = {}  # bundled tokens are not LoRA weights (checked elsewhere)
    out = save_lora(model, tmp_path / f"out-{dialect}.safetensors", dialect=dialect)

    base = _pipe(folder)
    ref_base = _probe(base)
    _apply_delta(base, load_lora(out))
    ref = _probe(base)

    pipe = _pipe(folder)
    log = _load_capturing(pipe, out)
    assert _complaints(log, model.parts()) == [], log
    got = _probe(pipe)

    assert set(got) == set(ref)
    for part in got:
        if not any(n.startswith(part + ".") for n in model.layers):
            continue
        tol = 1e-4 * ref[part].abs().max().item() + 1e-6
        err = (got[part] - ref[part]).abs().max().item()
        moved = (ref[part] - ref_base[part]).abs().max().item()
        assert err <= tol, f"{part}: max error {err:.3g} > {tol:.3g}"
        assert moved > 100 * tol, f"{part}: the LoRA barely changes the output ({moved:.3g})"


def test_unprefixed_file_is_a_silent_noop_in_diffusers(tiny_files, tiny_sd1):
    """The reason `convert --to diffusers` exists: our log capture sees diffusers' complaint."""
    pipe = _pipe(tiny_sd1)
    log = _load_capturing(pipe, tiny_files["sd1-peft"])
    assert _complaints(log) and "no lora keys" in log.lower()


def test_diffusers_ignores_per_layer_alphas_of_kohya_files(tiny_files, tiny_sd1, tmp_path):
    """diffusers 0.42 builds broken alpha_pattern keys from a kohya file whose alphas vary by layer and
    ignores them (a warning, wrong scales) — the same LoRA written --to diffusers loads correctly
    (test_diffusers_loads_what_we_write[sd1-kohya+mixed->diffusers])."""
    model = _mixed(load_lora(tiny_files["sd1-kohya"]))
    out = save_lora(model, tmp_path / "k.safetensors", dialect="kohya")
    log = _load_capturing(_pipe(tiny_sd1), out)
    assert "alpha_pattern keys did not match" in log
