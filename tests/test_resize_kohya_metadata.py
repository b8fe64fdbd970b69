"""resize / merge / extract write what kohya's own tools write (issue #18 item 3) and no local path
(issue #13 item 12). Every check re-reads the written file's header."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from lorahub.formats.io import load_lora
from lorahub.ops import checkpoints as C
from lorahub.ops.extract import extract_lora
from lorahub.ops.recipe import inline_recipe, merge_recipe
from lorahub.ops.resize import resize_lora
from lorahub.registry import Registry
from lorahub.tiny_loras import kohya_tensors, save_tensors

FF = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"          # (1280, 5120)
MORE_FF = [f"lora_unet_{b}_attentions_{i}_transformer_blocks_0_ff_net_2"
           for b, i in (("up_blocks_1", 1), ("up_blocks_1", 2), ("down_blocks_2", 0), ("down_blocks_2", 1))]
MID_Q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"       # (1280, 1280)
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"                                 # (320, 320, 3, 3)
STALE = "0" * 64


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def check_hashes(path: Path, big: bool = False) -> None:
    """The hash fields agree with independent computations from the file as written: the webui's
    addnet hash (SHA-256 of the bytes after the header), kohya's legacy hash (its serialisation with
    the ss_* metadata only) and ModelSpec's hash (the tensors' bytes in saved order)."""
    meta = header(path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    data = hashlib.sha256(raw[8 + n:]).hexdigest()
    assert meta["sshs_model_hash"] == data
    assert meta["modelspec.hash_sha256"] == "0x" + data
    kohya_blob = save(load_file(str(path)), {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(kohya_blob[0x100000:0x110000]).hexdigest()[:8]
    if big:
        assert len(kohya_blob) > 0x110000  # the legacy hash covers real bytes


def trained_lora(path: Path, *, conv: bool = True, seed: int = 0, big: bool = False) -> Path:
    """A kohya-trained-looking LoRA (rank 8, alpha 4; LoCon conv rank 4) with kohya's training metadata,
    stale hashes and a local model path, > 1.1 MB so that the legacy hash covers data."""
    t = kohya_tensors({FF: (1280, 5120), MID_Q: (1280, 1280)}, rank=8, alpha=4.0, seed=seed, dtype="float32")
    if big:
        t |= kohya_tensors({m: (1280, 5120) for m in MORE_FF}, rank=8, alpha=4.0, seed=seed + 2, dtype="float32")
    if conv:
        t |= kohya_tensors({CONV: (320, 320, 3, 3)}, rank=4, alpha=2.0, seed=seed + 1, dtype="float32")
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2.0", "module_dropout": "0.1"}),
        "ss_base_model_version": "sd_v1", "ss_v2": "False",
        "ss_sd_model_name": str(path.parent / "models" / "v1-5-pruned.safetensors"),
        "ss_tag_frequency": json.dumps({"10_zkz": {"zkz": 12, "1girl": 5}}),
        "ss_training_comment": "trained by me", "ss_learning_rate": "0.0001", "ss_output_name": "zkz",
        "ss_clip_skip": "2",
        "sshs_model_hash": STALE, "sshs_legacy_hash": "deadbeef", "modelspec.hash_sha256": "0x" + STALE,
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.title": "zkz style", "modelspec.trigger_phrase": "zkz",
    }
    return save_tensors(path, t, meta)


def test_resize_writes_kohya_metadata(tmp_path):
    src = trained_lora(tmp_path / "zkz.safetensors")
    out = tmp_path / "zkz-r2.safetensors"
    res = resize_lora(src, rank=2, out=out, registry=tmp_path / "home")
    meta = header(out)
    model = load_lora(out)
    ranks = {n: layer.rank for n, layer in model.layers.items()}
    assert set(ranks.values()) == {2}
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "2"
    # alpha = old scale × new rank = 4/8 · 2 for every layer (linear and conv)
    assert {layer.alpha for layer in model.layers.values()} == {1.0}
    assert meta["ss_network_alpha"] == "1.0"
    args = json.loads(meta["ss_network_args"])
    assert args == {"conv_dim": "2", "conv_alpha": "1.0", "module_dropout": "0.1"}
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 2; trained by me"
    # training metadata carried over; the model path reduced to its name (as kohya records it)
    for k in ("ss_tag_frequency", "ss_learning_rate", "ss_output_name", "ss_clip_skip", "ss_base_model_version",
              "modelspec.trigger_phrase"):
        assert meta[k] == header(src)[k], k
    assert meta["ss_sd_model_name"] == "v1-5-pruned.safetensors"
    assert meta["modelspec.title"] == "zkz-r2" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    check_hashes(out)
    assert STALE not in json.dumps(meta)
    rec = json.loads(meta["lorahub_resize"])
    assert rec["criterion"] == "rank=2" and rec["rank_max"] == 2 and rec["frobenius_retained"] == round(res.retained, 6)
    assert str(tmp_path) not in json.dumps(meta)


def test_hashes_of_a_large_output(tmp_path):
    src = trained_lora(tmp_path / "big.safetensors", big=True)
    out = tmp_path / "big-r8.safetensors"
    resize_lora(src, rank=8, out=out, registry=tmp_path / "home")
    check_hashes(out, big=True)
    assert header(out)["sshs_legacy_hash"] != "deadbeef"


def test_dynamic_resize_writes_dynamic(tmp_path):
    t = kohya_tensors({FF: (1280, 5120)}, rank=8, alpha=4.0, seed=1, dtype="float32")
    t |= kohya_tensors({MID_Q: (1280, 1280)}, rank=3, alpha=4.0, seed=2, dtype="float32")
    src = save_tensors(tmp_path / "zkz.safetensors", t, {"ss_network_dim": "8", "ss_training_comment": "hi"})
    out = tmp_path / "dyn.safetensors"
    resize_lora(src, sv_fro=0.999, rank=8, out=out, registry=tmp_path / "home")
    meta = header(out)
    model = load_lora(out)
    lin = {layer.rank for n, layer in model.layers.items() if "resnets" not in n}
    assert len(lin) > 1  # the two linear layers got different ranks: kohya writes "Dynamic"
    assert meta["ss_network_dim"] == "Dynamic"
    # alpha = old scale × new rank: 4/8·8 and 4/3·3, one value, so it is written as such
    assert {layer.alpha for layer in model.layers.values()} == {4.0} and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_training_comment"] == "Dynamic resize with sv_fro: 0.999 from 8; hi"
    check_hashes(out)


def test_resize_to_diffusers_carries_no_stale_hash(tmp_path):
    src = trained_lora(tmp_path / "zkz.safetensors", conv=False)
    out = tmp_path / "d.safetensors"
    resize_lora(src, rank=2, out=out, dialect="diffusers", registry=tmp_path / "home")
    meta = header(out)
    assert not {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"} & set(meta)
    assert meta["ss_network_dim"] == "2"


def test_lycoris_input_resized_to_plain_lora_says_so(tmp_path):
    t = kohya_tensors({MID_Q: (1280, 1280)}, rank=4, seed=3, algo="loha", dtype="float32")
    src = save_tensors(tmp_path / "loha.safetensors", t, {
        "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "4"}),
        "ss_network_dim": "4", "ss_network_alpha": "4"})
    out = tmp_path / "plain.safetensors"
    resize_lora(src, rank=2, out=out, registry=tmp_path / "home")
    meta = header(out)
    assert meta["ss_network_module"] == "networks.lora"  # LoHa layers were re-factored as plain LoRA
    assert "ss_network_args" not in meta  # LyCORIS's args describe the input's network, not this one


def two_inputs(tmp_path: Path) -> tuple[Path, Path]:
    a = trained_lora(tmp_path / "a.safetensors", conv=False, seed=0)
    t = kohya_tensors({FF: (1280, 5120), MID_Q: (1280, 1280)}, rank=4, alpha=4.0, seed=7, dtype="float32")
    b = save_tensors(tmp_path / "b.safetensors", t, {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
        "ss_base_model_version": "sd_v1", "ss_clip_skip": "2", "ss_tag_frequency": "{}",
        "ss_sd_model_name": "v1-5-pruned.safetensors", "sshs_model_hash": STALE})
    return a, b


@pytest.mark.parametrize("method,rank", [("svd", 6), ("concat", None)])
def test_merge_writes_kohya_metadata(tmp_path, method, rank):
    a, b = two_inputs(tmp_path)
    out = tmp_path / "m.safetensors"
    recipe = inline_recipe([f"{a}:0.8", f"{b}:0.5"], method=method, rank=rank)
    merge_recipe(recipe, out=out, registry=tmp_path / "home")
    meta = header(out)
    model = load_lora(out)
    ranks = {layer.rank for layer in model.layers.values()}
    alphas = {layer.alpha for layer in model.layers.values()}
    assert meta["ss_network_module"] == "networks.lora"
    if method == "svd":
        assert ranks == {6} and meta["ss_network_dim"] == "6"
    else:
        assert ranks == {12} and meta["ss_network_dim"] == "12"  # concat: 8 + 4
    assert meta["ss_network_alpha"] == str(float(alphas.pop()))
    # what both inputs agree on is kept; what differs (tag frequencies, comments, titles) is not
    assert meta["ss_clip_skip"] == "2" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_sd_model_name"] == "v1-5-pruned.safetensors"
    assert "ss_tag_frequency" not in meta and "ss_training_comment" not in meta
    assert meta["modelspec.merged_from"] == "zkz style, b"  # kohya: each input's title, else its name
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    check_hashes(out)
    assert str(tmp_path) not in json.dumps(meta)
    assert json.loads(meta["lorahub.merge"])["inputs"][0]["ref"] == "a.safetensors"


@pytest.fixture(scope="module")
def tuned_folder(tiny_sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")

    def transform(name, t):
        if t.dim() in (2, 4) and name.startswith("unet.") and ".attentions." in name and name.endswith(".weight"):
            g = torch.Generator().manual_seed(abs(hash(name)) % (2 ** 31))
            return (t.float() + 1e-2 * torch.randn(t.shape, generator=g)).to(t.dtype)
        return t

    with C.open_checkpoint(tiny_sd1) as ck:
        C.write_like(ck, root / "my-finetune", transform=transform)
    return root / "my-finetune"


def test_extract_writes_kohya_metadata_and_no_path(tiny_sd1, tuned_folder, tmp_path):
    out = tmp_path / "x.safetensors"
    extract_lora(tiny_sd1, tuned_folder.resolve(), out=out, rank=4, dtype="fp32", registry=tmp_path / "home")
    meta = header(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.title"] == "x" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    info = json.loads(meta["lorahub_extract"])
    assert info["tuned"]["name"] == "my-finetune" and len(info["tuned"]["blake3"]) == 64
    assert info["base"]["name"] == Path(tiny_sd1).name  # the folder's name, not its path
    text = json.dumps(meta)
    assert str(tuned_folder.parent) not in text and str(tmp_path) not in text
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()

    dyn = tmp_path / "dyn.safetensors"
    extract_lora(tiny_sd1, tuned_folder, out=dyn, sv_fro=0.6, rank=8, dtype="fp32", registry=tmp_path / "home")
    meta = header(dyn)
    ranks = {layer.rank for layer in load_lora(dyn).layers.values()}
    assert len(ranks) > 1 and meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"


def test_no_local_path_in_registered_outputs_and_lineage(tiny_sd1, tuned_folder, tmp_path):
    """extract, resize and merge with --register: neither the files' headers nor the lineage details
    (which model cards carry) hold an absolute path of the test's folders."""
    home = tmp_path / "home"
    outs = tmp_path / "outs"
    outs.mkdir()
    ex = extract_lora(tiny_sd1, tuned_folder.resolve(), out=outs / "ex.safetensors", rank=2, register=True,
                      registry=home)
    src = trained_lora(tmp_path / "zkz.safetensors", conv=False)
    rs = resize_lora(src.resolve(), rank=2, out=outs / "rs.safetensors", register=True, registry=home)
    (tmp_path / "in").mkdir()
    a, b = two_inputs(tmp_path / "in")
    mg = merge_recipe(inline_recipe([f"{a.resolve()}:0.7", f"{b.resolve()}:0.3"], rank=4, name="mix"),
                      out=outs / "mg.safetensors", register=True, registry=home)
    secrets = (str(tmp_path), str(tuned_folder.parent))
    for f in outs.iterdir():
        text = json.dumps(header(f))
        assert not any(s in text for s in secrets), f.name
    with Registry.open(home) as reg:
        for res in (ex, rs, mg):
            lin = json.dumps(reg.lineage(res.entry["id"]), default=str)
            assert not any(s in lin for s in secrets), res.entry["name"]
            desc = reg.get(res.entry["id"]).get("description") or ""
            assert not any(s in desc for s in secrets)


@pytest.mark.parametrize("given,family,expected", [
    ("stable-diffusion-v2-768-v/lora", "sd2", "stable-diffusion-v2-768-v/lora"),
    ("stable-diffusion-v1", "sd1", "stable-diffusion-v1/lora"),
    ("stable-diffusion-xl-v1-base/lora", "sd1", "stable-diffusion-v1/lora"),  # wrong family: replaced
    (None, "sdxl", "stable-diffusion-xl-v1-base/lora"),
])
def test_modelspec_architecture_keeps_the_inputs_when_it_fits(given, family, expected):
    from lorahub.formats import kohya
    from lorahub.tiny_loras import random_lora

    model = random_lora({"unet.down_blocks.0.attentions.0.proj_in": (8, 8)}, rank=2, base=family)
    meta = kohya.derived_metadata(model, title="t", inherited={"modelspec.architecture": given} if given else {})
    assert meta["modelspec.architecture"] == expected
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}[family]
