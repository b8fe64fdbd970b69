"""Header-only format detection: every dialect, base from shapes vs metadata, pickles refused or read safely."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lorahub.errors import FormatError, UnsafeFile
from lorahub.formats.detect import detect
from lorahub.tiny_loras import kohya_tensors

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "real-loras"
rng = np.random.default_rng(0)


def _t(*shape, dtype=np.float16):
    return rng.standard_normal(shape).astype(dtype)


def _write(tmp_path, name, tensors, meta=None):
    p = tmp_path / name
    save_file(tensors, str(p), metadata=meta)
    return p


def _kohya_pair(prefix, out_f, in_f, r, alpha=None, conv=None):
    return kohya_tensors({prefix: (out_f, in_f, *(conv or ()))}, rank=r, alpha=alpha, seed=rng)


def test_kohya_sd1_base_rank_alpha(tmp_path):
    t = {}
    t |= _kohya_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768, 8, 4)
    t |= _kohya_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q", 320, 320, 4, 4)
    t |= _kohya_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 8, 4)
    p = _write(tmp_path, "k.safetensors", t, {"ss_base_model_version": "sd_v1", "ss_network_dim": "8"})
    d = detect(p)
    assert (d.format, d.kind, d.base) == ("kohya", "lora", "sd1")
    assert d.parts == ["unet", "text_encoder"]
    assert (d.rank, d.rank_min, d.rank_max) == (8, 4, 8)
    assert d.alpha == 4.0
    assert d.n_layers == 3
    assert d.notes == []


def test_base_disagreement_goes_to_notes(tmp_path):
    t = _kohya_pair("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v", 1280, 1024, 4)
    p = _write(tmp_path, "k.safetensors", t, {"ss_base_model_version": "sd_v1"})
    d = detect(p)
    assert d.base == "sd2"
    assert any("sd_v1" in n or "ss_base_model_version" in n for n in d.notes)


def test_kohya_sdxl_sgm_names_and_te2(tmp_path):
    t = {}
    t |= _kohya_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048, 16, 8.0)
    t |= _kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 16, 8.0)
    t |= _kohya_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280, 16, 8.0)
    d = detect(_write(tmp_path, "x.safetensors", t, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}))
    assert (d.format, d.base, d.rank, d.alpha) == ("kohya", "sdxl", 16, 8.0)
    assert d.parts == ["unet", "text_encoder", "text_encoder_2"]
    assert d.notes == []


def test_locon_conv_is_locon(tmp_path):
    t = _kohya_pair("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, 4, conv=(3, 3))
    t |= _kohya_pair("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 4, conv=(1, 1))
    assert detect(_write(tmp_path, "c.safetensors", t)).kind == "locon"
    t2 = _kohya_pair("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 4, conv=(1, 1))
    assert detect(_write(tmp_path, "c2.safetensors", t2)).kind == "lora"


def test_loha_lokr_dora(tmp_path):
    m = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    loha = {f"{m}.hada_w1_a": _t(320, 4), f"{m}.hada_w1_b": _t(4, 768), f"{m}.hada_w2_a": _t(320, 4),
            f"{m}.hada_w2_b": _t(4, 768), f"{m}.alpha": np.array(2.0, dtype=np.float32)}
    d = detect(_write(tmp_path, "h.safetensors", loha))
    assert (d.format, d.kind, d.rank, d.alpha, d.base) == ("lycoris", "loha", 4, 2.0, "sd1")
    lokr = {f"{m}.lokr_w1": _t(8, 16), f"{m}.lokr_w2_a": _t(40, 2), f"{m}.lokr_w2_b": _t(2, 48),
            f"{m}.alpha": np.array(2.0, dtype=np.float32)}
    d = detect(_write(tmp_path, "k.safetensors", lokr))
    assert (d.format, d.kind, d.rank) == ("lycoris", "lokr", 2)
    assert d.base == "sd1"  # 16 * 48 = 768
    dora = _kohya_pair(m, 320, 768, 4) | {f"{m}.dora_scale": _t(1, 768)}
    d = detect(_write(tmp_path, "d.safetensors", dora))
    assert (d.format, d.kind) == ("kohya", "dora")


def test_diffusers_peft_old_forms(tmp_path):
    m = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    t = {f"unet.{m}.lora_A.weight": _t(4, 768), f"unet.{m}.lora_B.weight": _t(320, 4),
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": _t(4, 768),
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": _t(768, 4)}
    d = detect(_write(tmp_path, "d.safetensors", t, {"format": "pt"}))
    assert (d.format, d.base, d.parts, d.rank, d.n_layers) == ("diffusers", "sd1", ["unet", "text_encoder"], 4, 2)
    p = {f"{m}.lora_A.weight": _t(4, 768), f"{m}.lora_B.weight": _t(320, 4)}
    d = detect(_write(tmp_path, "p.safetensors", p))
    assert (d.format, d.parts, d.base) == ("peft", ["unet"], "sd1")
    assert any("prefix" in n for n in d.notes)
    old = {f"unet.{m}.lora.down.weight": _t(4, 1024), f"unet.{m}.lora.up.weight": _t(320, 4)}
    d = detect(_write(tmp_path, "o.safetensors", old))
    assert (d.format, d.base) == ("diffusers", "sd2")
    proc = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight": _t(4, 768),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight": _t(320, 4)}
    d = detect(_write(tmp_path, "a.safetensors", proc))
    assert d.format == "peft" and d.rank == 4 and d.n_layers == 1 and d.base == "sd1"


def test_embeddings(tmp_path):
    d = detect(_write(tmp_path, "e.safetensors", {"emb_params": _t(2, 768)}))
    assert (d.format, d.kind, d.base) == ("embedding", "textual-inversion", "sd1")
    d = detect(_write(tmp_path, "x.safetensors", {"clip_l": _t(1, 768), "clip_g": _t(1, 1280)}))
    assert (d.kind, d.base) == ("textual-inversion", "sdxl")
    d = detect(_write(tmp_path, "l.safetensors", {"<cat-toy>": _t(768, dtype=np.float32)}))
    assert (d.kind, d.tokens, d.base) == ("textual-inversion", ["<cat-toy>"], "sd1")
    d = detect(_write(tmp_path, "l2.safetensors", {"<tok>": _t(3, 1024, dtype=np.float32)}))
    assert d.base == "sd2"


def test_checkpoint(tmp_path):
    t = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _t(320, 768),
         "first_stage_model.decoder.conv_in.weight": _t(4, 4, 3, 3)}
    d = detect(_write(tmp_path, "m.safetensors", t))
    assert (d.format, d.kind, d.base) == ("checkpoint", "checkpoint", "sd1")
    t = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": _t(640, 2048),
         "conditioner.embedders.1.model.ln_final.weight": _t(1280)}
    assert detect(_write(tmp_path, "x.safetensors", t)).base == "sdxl"


@pytest.mark.skipif(not REAL.exists(), reason="no shared real LoRAs")
def test_real_cloneofsimo_files():
    d = detect(REAL / "analog_svd_rank4.safetensors")
    assert (d.format, d.kind, d.base, d.rank, d.n_layers) == ("cloneofsimo", "lora", "sd1", 4, 192)
    assert d.parts == ["unet", "text_encoder"]
    d = detect(REAL / "lora_disney.safetensors")
    assert d.tokens == ["<s1>", "<s2>"] and d.rank == 1 and d.base == "sd1"


def test_bad_input(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        detect(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(FormatError):
        detect(junk)
    weird = _write(tmp_path, "w.safetensors", {"some.module.weight": _t(3, 3, 3, 3), "x.bias": _t(3)})
    with pytest.raises(FormatError, match="unknown format"):
        detect(weird)


def test_pickles_are_never_executed(tmp_path):
    torch = pytest.importorskip("torch")
    ok = tmp_path / "emb.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}, "name": "mytok",
                "string_to_token": {"*": torch.tensor(265)}}, ok)
    d = detect(ok)
    assert (d.kind, d.tokens, d.base) == ("textual-inversion", ["mytok"], "sd1")

    class Evil:
        def __reduce__(self):
            return (Path("/nonexistent-should-not-run").touch, ())

    bad = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(UnsafeFile):
        detect(bad)
    assert zipfile.is_zipfile(bad)
    legacy = tmp_path / "legacy.ckpt"
    legacy.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(UnsafeFile):
        detect(legacy)


def test_detect_does_not_import_torch(tmp_path):
    p = _write(tmp_path, "k.safetensors", _kohya_pair("lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768, 4))
    code = ("import sys; from lorahub.formats.detect import detect; "
            f"d = detect({str(p)!r}); print(d.format, d.base, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["kohya", "sd1", "False"]
