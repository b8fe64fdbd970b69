"""Every base family catalogued: shapes and module names first, then metadata; SDXL derivatives as a
base model; other:<name> families; evidence and disagreements on the entry; the catalogue filters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lorahub.errors import LorahubError
from lorahub.formats import families, names
from lorahub.formats.families import Evidence, LayerShape, from_layers, from_text, settle


# ------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("text,base,base_model", [
    ("flux-1-dev/lora", "flux", "flux-1-dev"),
    ("Flux.1 D", "flux", "flux-1-dev"),
    ("Flux.1 S", "flux", "flux-1-schnell"),
    ("flux1", "flux", None),
    ("Flux.2 D", "other:flux2", None),
    ("stable-diffusion-v3-medium/lora", "sd3", "sd3-medium"),
    ("SD 3.5 Large", "sd3", "sd3.5-large"),
    ("stable-diffusion-xl-v1-base/lora", "sdxl", None),
    ("sdxl_base_v1-0", "sdxl", None),
    ("Pony", "sdxl", "pony"),
    ("ponyDiffusionV6XL_v6StartWithThisOne.safetensors", "sdxl", "pony"),
    ("Illustrious", "sdxl", "illustrious"),
    ("noobaiXLNAIXL_vPred10Version.safetensors", "sdxl", "noobai"),
    ("Playground v2", "sdxl", "playground"),
    ("sd_v1", "sd1", None),
    ("v1-5-pruned-emaonly.safetensors", "sd1", None),
    ("SD 2.1", "sd2", None),
    ("Hunyuan 1", "other:hunyuan-dit", None),
    ("Hunyuan Video", "other:hunyuan-video", None),
    ("Wan Video 14B t2v", "other:wan", None),
    ("Qwen", "other:qwen-image", None),
    ("PixArt a", "other:pixart", None),
    ("AuraFlow", "other:auraflow", None),
    ("Lumina", "other:lumina", None),
    ("HiDream", "other:hidream", None),
    ("Chroma", "other:chroma", None),
])
def test_free_text_names_the_family(text, base, base_model):
    ev = from_text(text, "civitai baseModel")
    assert (ev.base, ev.base_model) == (base, base_model)
    assert families.is_base(ev.base)


@pytest.mark.parametrize("text", ["", "Other", "model.safetensors", "swan-lake.safetensors", None])
def test_free_text_without_a_family(text):
    assert from_text(text, "x") is None


def test_base_values_accepted_and_refused():
    for ok in ("sd1", "sdxl", "sd3", "flux", "unknown", "other:qwen-image", "other:wan"):
        assert families.check_base(ok) == ok
    for bad in ("Flux", "other:", "other:Qwen Image", "sd4", "other:../x"):
        with pytest.raises(LorahubError, match="unknown base"):
            families.check_base(bad)
    assert families.check_base_model(" Pony ") == "pony"
    with pytest.raises(LorahubError):
        families.check_base_model("pony diffusion")


# ------------------------------------------------------------------------------------------ shapes
def _dit_layers(arch: str) -> list[LayerShape]:
    """Every transformer Linear of a built-in architecture as a diffusers LoRA would name it."""
    a = names.get_arch(arch)
    return [LayerShape("transformer", k, v[0], v[1]) for k, v in a.modules.items()
            if k.startswith("transformer.") and len(v) == 2]


def test_flux_and_sd3_from_their_module_lists():
    ev = from_layers(_dit_layers("flux"))
    assert ev.base == "flux" and "19 double + 38 single" in ev.detail and "3072" in ev.detail
    ev = from_layers(_dit_layers("sd3"))
    assert (ev.base, ev.base_model) == ("sd3", "sd3-medium") and "24 joint" in ev.detail and "1536" in ev.detail
    ev = from_layers(_dit_layers("sd3.5-large"))
    assert (ev.base, ev.base_model) == ("sd3", "sd3.5-large") and "2432" in ev.detail
    # a Flux LoRA on the double-stream attention only: still Flux (Qwen-Image / Chroma fit too)
    only = [x for x in _dit_layers("flux") if ".transformer_blocks." in x.name and ".attn.to_" in x.name]
    ev = from_layers(only)
    assert ev.base == "flux" and "other:qwen-image" in ev.also


def test_kohya_layouts_of_dit_families():
    from lorahub.tiny_loras import flux_kohya_modules

    flux = [LayerShape("unet", k, *v) for k, v in flux_kohya_modules().items()]
    ev = from_layers(flux)
    assert ev.base == "flux" and ev.detail.startswith("BFL-layout 19 double + 38 single blocks at width 3072")
    flux2 = [LayerShape("unet", f"lora_unet_double_blocks_{i}_img_attn_qkv", 18432, 6144) for i in range(8)]
    assert from_layers(flux2).base == "other:flux2"
    hv = [LayerShape("unet", f"lora_unet_double_blocks_{i}_img_attn_qkv", 9216, 3072) for i in range(20)]
    assert from_layers(hv).base == "other:hunyuan-video"  # 20 double blocks: not Flux.1
    sd3 = [LayerShape("unet", f"lora_unet_joint_blocks_{i}_x_block_attn_qkv", 4608, 1536) for i in range(24)]
    assert (from_layers(sd3).base, from_layers(sd3).base_model) == ("sd3", "sd3-medium")
    wan = [LayerShape("unet", f"lora_unet_blocks_{i}_self_attn_q", 5120, 5120) for i in range(40)]
    assert from_layers(wan).base == "other:wan"
    hidream = [LayerShape("unet", "lora_unet_double_stream_blocks_0_block_attn1_to_q", 2560, 2560)]
    assert from_layers(hidream).base == "other:hidream"


@pytest.mark.parametrize("cls,base", [
    ("QwenImageTransformer2DModel", "other:qwen-image"),
    ("PixArtTransformer2DModel", "other:pixart"),
    ("Lumina2Transformer2DModel", "other:lumina"),
    ("ZImageTransformer2DModel", "other:z-image"),
    ("AuraFlowTransformer2DModel", "other:auraflow"),
    ("ChromaTransformer2DModel", "other:chroma"),
    ("SanaTransformer2DModel", "other:sana"),
])
def test_other_families_from_module_lists_built_from_their_configs(cls, base):
    """The module list comes from the class's own (default) config on the meta device; a LoRA on its
    linear layers is named that family by its names and shapes, and the class says the same."""
    arch = names.derive_arch({"transformer": names.PartSpec("diffusers", cls, {})})
    assert arch.family == base == families.family_of_class(cls)
    layers = [LayerShape("transformer", k, v[0], v[1]) for k, v in arch.modules.items() if len(v) == 2]
    assert from_layers(layers).base == base


def test_sd_unets_from_shapes():
    def cross(width):
        return [LayerShape("unet", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 640, width)]
    assert from_layers(cross(768)).base == "sd1"
    assert from_layers(cross(1024)).base == "sd2"
    assert from_layers(cross(2048)).base == "sdxl"
    sgm = [LayerShape("unet", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048)]
    assert from_layers(sgm).base == "sdxl"
    assert from_layers(cross(32)) is None


# ------------------------------------------------------------------------------------------ settle
def test_shapes_win_and_the_disagreement_is_noted():
    st = settle([Evidence("shapes", "sd1", detail="cross-attention width 768"),
                 Evidence("ss_base_model_version", "flux", detail="flux1")])
    assert st.base == "sd1" and st.notes == ["shapes say sd1 but ss_base_model_version says flux; using the shapes"]
    assert st.evidence[0] == "shapes: cross-attention width 768 -> sd1"


def test_metadata_decides_among_families_the_shapes_fit():
    st = settle([Evidence("shapes", "flux", also=("other:chroma",)), Evidence("modelspec.architecture", "other:chroma")])
    assert st.base == "other:chroma" and st.notes == []
    st = settle([Evidence("shapes", "sdxl"), Evidence("civitai baseModel", "sdxl", "pony")])
    assert (st.base, st.base_model) == ("sdxl", "pony")
    assert settle([]).base == "unknown"


# ----------------------------------------------------------------------------------- catalogue
def _sdxl_kohya(path, meta=None, seed=0):
    from lorahub.tiny_loras import kohya_tensors, save_tensors

    k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    return save_tensors(path, kohya_tensors({k: (640, 2048)}, rank=2, seed=seed), meta)


def test_catalogue_records_family_base_model_and_why(tmp_path, home, run):
    from lorahub.tiny_loras import diffusers_tensors, kohya_file, save_tensors

    pony = _sdxl_kohya(tmp_path / "pony.safetensors",
                       {"ss_sd_model_name": "ponyDiffusionV6XL_v6StartWithThisOne.safetensors",
                        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, seed=1)
    illu = _sdxl_kohya(tmp_path / "illu.safetensors", seed=2)
    (tmp_path / "illu.civitai.info").write_text(json.dumps({"baseModel": "Illustrious", "trainedWords": ["x"]}))
    odd = kohya_file(tmp_path / "odd.safetensors", width=768, meta={"ss_base_model_version": "flux1"})
    qwen = save_tensors(tmp_path / "qwen.safetensors", diffusers_tensors(
        {f"transformer.transformer_blocks.{i}.img_mlp.net.2": (3072, 12288) for i in range(2)}, rank=1))
    rc, out, err = run("add", pony, illu, odd, qwen)
    assert rc == 0, err

    def entries(*args):
        rc, out, err = run(*args, "--json")
        assert rc == 0, err
        return {e["name"]: e for e in json.loads(out)}

    every = entries("list")
    assert {n: (e["base"], e["base_model"]) for n, e in every.items()} == {
        "pony": ("sdxl", "pony"), "illu": ("sdxl", "illustrious"), "odd": ("sd1", None),
        "qwen": ("other:qwen-image", None)}
    assert set(entries("list", "--base-model", "PONY")) == {"pony"}
    assert set(entries("search", "--base", "sdxl")) == {"pony", "illu"}
    assert set(entries("search", "--base", "other:qwen-image")) == {"qwen"}
    assert entries("list", "--base", "flux") == {}
    rc, out, err = run("show", "odd", "--json")
    extra = json.loads(out)["extra"]
    assert "shapes say sd1 but ss_base_model_version says flux" in extra["base_conflict"]
    assert extra["base_evidence"][0].startswith("shapes: cross-attention width 768")
    rc, out, err = run("show", "illu")
    assert rc == 0 and "base model" in out and "illustrious" in out and "civitai baseModel" in out
    # editing: any family, other:<name> too; nonsense refused
    assert run("edit", "qwen", "--base", "other:wan", "--base-model", "wan-2.1")[0] == 0
    assert entries("list", "--base", "other:wan")["qwen"]["base_model"] == "wan-2.1"
    rc, out, err = run("edit", "qwen", "--base", "Flux")
    assert rc == 2 and "unknown base" in err


def test_catalogue_read_path_stays_light_with_the_new_filters(home, tmp_path, run):
    assert run("add", _sdxl_kohya(tmp_path / "p.safetensors", {"ss_sd_model_name": "pony.safetensors"}))[0] == 0
    code = (
        "import sys\n"
        "from lorahub.cli.app import main\n"
        "for args in (['search', '--base', 'sdxl', '--base-model', 'pony', '--json'], ['list', '--base', 'flux'],"
        " ['show', 'p']):\n"
        "    try:\n        main(args)\n    except SystemExit as e:\n        assert not e.code, e.code\n"
        "bad = [m for m in ('torch', 'numpy', 'diffusers', 'transformers', 'safetensors') if m in sys.modules]\n"
        "sys.stderr.write('HEAVY:' + ','.join(bad) + '\\n')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, LORAHUB_HOME=str(home)))
    assert "HEAVY:\n" in r.stderr, r.stderr
    assert '"base_model": "pony"' in r.stdout


def test_full_flux_checkpoint_in_the_bfl_layout_is_detected_from_its_header(tmp_path):
    """A single-file Flux.1 transformer (BFL names, no LoRA keys), written header-first as a sparse
    file: detection reads the header only."""
    import struct

    from lorahub.formats.detect import detect

    shapes = {}
    for i in range(19):
        shapes[f"double_blocks.{i}.img_attn.qkv.weight"] = [9216, 3072]
        shapes[f"double_blocks.{i}.img_attn.qkv.bias"] = [9216]
    for i in range(38):
        shapes[f"single_blocks.{i}.linear1.weight"] = [21504, 3072]
    header, off = {}, 0
    for k, shp in shapes.items():
        n = 2 * (shp[0] * (shp[1] if len(shp) > 1 else 1))
        header[k] = {"dtype": "BF16", "shape": shp, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p = tmp_path / "flux1-dev.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)  # sparse: no data written
    d = detect(p)
    assert (d.format, d.kind, d.base, d.parts) == ("checkpoint", "checkpoint", "flux", ["transformer"])
    assert d.evidence[0].text() == "shapes: BFL-layout 19 double + 38 single blocks at width 3072 -> flux"
