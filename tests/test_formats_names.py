"""Module lists built on the meta device from the published configs, and the dialect name maps."""

from __future__ import annotations

import pytest

from lorahub.errors import FormatError
from lorahub.formats import names


def _kohya_targets(arch):
    """kohya's default targets: every Linear/Conv inside the UNet's transformer (attention) blocks and the
    text encoders' attention/MLP projections."""
    a = names.get_arch(arch)
    unet = [n for n in a.modules if n.startswith("unet.") and ".attentions." in n]
    te = [n for n in a.modules if n.startswith("text_encoder.") and (".self_attn." in n or ".mlp." in n)]
    te2 = [n for n in a.modules if n.startswith("text_encoder_2.") and (".self_attn." in n or ".mlp." in n)]
    return len(unet), len(te) + len(te2)


@pytest.mark.parametrize("arch,unet,te", [("sd1", 192, 72), ("sd2", 192, 138), ("sdxl", 722, 264)])
def test_module_counts_match_published_kohya_counts(arch, unet, te):
    assert _kohya_targets(arch) == (unet, te)


def test_shapes_follow_the_configs():
    sd1, sd2, xl = names.get_arch("sd1"), names.get_arch("sd2"), names.get_arch("sdxl")
    assert sd1.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (320, 768)
    assert sd1.modules["unet.down_blocks.0.attentions.0.proj_in"] == (320, 320, 1, 1)  # SD1: 1x1 conv
    assert sd2.modules["unet.down_blocks.0.attentions.0.proj_in"] == (320, 320)  # SD2: linear
    assert sd2.modules["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"] == (1280, 1024)
    assert xl.modules["unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"] == (1280, 2048)
    assert xl.modules["text_encoder_2.text_model.encoder.layers.31.mlp.fc1"] == (5120, 1280)
    assert sd2.modules["text_encoder.text_model.encoder.layers.22.self_attn.q_proj"] == (1024, 1024)


SDXL_KOHYA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2": "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q": "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_output_blocks_5_1_proj_out": "unet.up_blocks.1.attentions.2.proj_out",
    "lora_unet_input_blocks_1_0_in_layers_2": "unet.down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
    "lora_unet_output_blocks_2_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
    "lora_unet_output_blocks_5_2_conv": "unet.up_blocks.1.upsamplers.0.conv",
    "lora_unet_middle_block_0_emb_layers_1": "unet.mid_block.resnets.0.time_emb_proj",
    "lora_unet_middle_block_2_in_layers_2": "unet.mid_block.resnets.1.conv1",
    "lora_unet_output_blocks_0_0_skip_connection": "unet.up_blocks.0.resnets.0.conv_shortcut",
    "lora_te1_text_model_encoder_layers_11_mlp_fc2": "text_encoder.text_model.encoder.layers.11.mlp.fc2",
    "lora_te2_text_model_encoder_layers_31_self_attn_out_proj": "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj",
}


def test_sdxl_kohya_names_in_sgm_layout():
    a = names.get_arch("sdxl")
    for k, c in SDXL_KOHYA.items():
        assert names.from_kohya(k, a) == c
        assert names.to_kohya(c, a) == k
    table = a.kohya_to_canonical()
    assert len(table) == len(a.modules)  # the map is one-to-one


def test_sd1_kohya_names_and_underscored_paths():
    a = names.get_arch("sd1")
    k = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"
    assert names.from_kohya(k, a) == "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"
    # "transformer_blocks" and "ff_net" hold underscores that are not dots: resolved by the module list
    assert names.from_kohya("lora_te_text_model_encoder_layers_11_self_attn_q_proj", a) == \
        "text_encoder.text_model.encoder.layers.11.self_attn.q_proj"
    assert names.from_kohya("lora_unet_down_blocks_9_attentions_0_proj_in", a) is None


def test_transformers5_paths_normalise():
    assert names.normalize("text_encoder.encoder.layers.0.self_attn.q_proj") == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert names.normalize("text_encoder_2.text_model.encoder.layers.0.mlp.fc1") == \
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"
    assert names.normalize("unet.mid_block.attentions.0.proj_in") == "unet.mid_block.attentions.0.proj_in"


def test_infer_arch_uses_names_and_shapes():
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert names.infer_arch({q: (320, 768)}).name == "sd1"
    assert names.infer_arch({q: (320, 1024)}).name == "sd2"
    assert names.infer_arch({q: (32, 32)}).name == "tiny-sd1"
    assert names.infer_arch({"lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k": (64, 64)},
                            kohya=True).name == "tiny-sdxl"
    with pytest.raises(FormatError, match="match no known model"):
        names.infer_arch({q: (320, 999)})


def test_cloneofsimo_walk_lengths():
    a = names.get_arch("sd1")
    assert len(names.cloneofsimo_order(a, "unet")) == 144
    te = names.cloneofsimo_order(a, "text_encoder")
    assert len(te) == 48 and te[0].endswith("layers.0.self_attn.k_proj")  # CLIPAttention registers k, v, q, out
    legacy = names.cloneofsimo_order(a, "unet", legacy_block_order=True)
    assert legacy[4].endswith("transformer_blocks.0.ff.net.0.proj")
    assert sorted(legacy) == sorted(names.cloneofsimo_order(a, "unet"))
