"""`lorahub train --method dreambooth` on the tiny Flux.1 / SD3 transformers (peft LoRA, flow-matching
loss), and the trainer's output naming rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lorahub.errors import LorahubError, OutputExists

pytestmark = pytest.mark.filterwarnings("ignore")


def _dataset(folder: Path, n: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.zeros((32, 32, 3), np.uint8)
        a[..., i % 3] = 220
        a[:, ::6] = 255
        Image.fromarray(a).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"sks toy, stripes, colour {i}")
    return folder


def _config(data: Path, out: Path, **kw):
    from lorahub.train.config import build_config

    base = dict(data_dir=str(data), base="tiny-flux", method="dreambooth", type="object", trigger="sks", steps=2,
                resolution=32, lr=2e-2, rank=4, output_dir=str(out), register=False, save_precision="fp32")
    base.update(kw)
    return build_config(None, **base)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_dreambooth_on_dit_transformer(kind, tmp_path):
    """Two CPU steps: finite flow-matching loss, only the transformer's LoRA changes, the file lands in the
    registry and reads back with the trained ΔW; diffusers' own pipeline loads it."""
    import diffusers

    from lorahub import tiny
    from lorahub.formats.io import load_lora
    from lorahub.registry import Registry
    from lorahub.train.trainer import DIT_TARGETS, Trainer

    data = _dataset(tmp_path / "data")
    home = tmp_path / "home"
    # diffusers dialect: diffusers' kohya-Flux converter only knows FLUX.1's own width
    cfg = _config(data, tmp_path / "out", base=f"tiny-{kind}", register=True, name=f"toy-{kind}", dialect="diffusers")
    t = Trainer(cfg, home=home)
    res = t.run()
    assert res.steps == 2 and len(res.losses) == 2 and all(np.isfinite(res.losses))
    params = {n: p.detach() for n, p in t.unet.named_parameters()}
    moved = {n.split(".lora_B.")[0]: float(p.abs().max()) > 0 for n, p in params.items() if ".lora_B." in n}
    # every zero-initialised B moved, but SD3's last (context_pre_only) block's context query, whose
    # output nothing reads
    still = {n for n, m in moved.items() if not m}
    assert moved and still == ({"transformer_blocks.1.attn.add_q_proj"} if kind == "sd3" else set())
    targets = {n.split(".lora_A.")[0] for n in params if ".lora_A." in n}
    assert all(any(p.endswith(s) for s in DIT_TARGETS[kind]) for p in targets)
    # the base transformer weights did not change
    base = diffusers.DiffusionPipeline.from_pretrained(tiny.ensure(kind), local_files_only=True).transformer
    for n, p in base.named_parameters():
        live = n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(params.get(n, params.get(live)), p, rtol=0, atol=0)
    # read back: every trained module, ΔW = B·A·alpha/r from the live peft factors
    model = load_lora(res.lora_path)
    assert model.base == kind and len(model.layers) == len(targets)
    for path in targets:
        a, b = params[f"{path}.lora_A.default.weight"], params[f"{path}.lora_B.default.weight"]
        got = model.layers[f"transformer.{path}"].delta(torch.float32)
        torch.testing.assert_close(got, b @ a, rtol=1e-4, atol=1e-6)
    # registry entry with its family and lineage; metadata names the base by name
    reg = Registry.open(home)
    [entry] = res.entries
    got = reg.get(entry["id"])
    assert got["base"] == kind and got["kind"] == "lora" and got["triggers"] == ["sks"]
    assert reg.lineage(entry["id"])[0]["relation"] == "trained-from"
    md = res.metadata
    assert md["ss_sd_model_name"] == f"tiny-{kind}" and md["ss_base_model_version"] == {"flux": "flux1",
                                                                                         "sd3": "sd3"}[kind]
    assert json.loads(md["ss_network_args"])["unet_targets"] == DIT_TARGETS[kind]
    # diffusers' own pipeline loads the written file into every trained module
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny.ensure(kind), local_files_only=True)
    pipe.load_lora_weights(str(res.lora_path))
    loaded = {n.split(".lora_A.")[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n}
    assert loaded == targets


def test_dit_training_refusals(tmp_path):
    from lorahub.train.trainer import Trainer

    data = _dataset(tmp_path / "data")
    for kw, msg in (({"method": "textual-inversion"}, "dreambooth method only"),
                    ({"train_text_encoder": True}, "transformer only")):
        with pytest.raises(LorahubError, match=msg):
            Trainer(_config(data, tmp_path / "out", **kw)).run()


def test_output_name_is_made_safe_and_never_overwritten(tmp_path, tiny_sd1):
    """``name`` becomes a file name (no path separators); a second run into the same folder is refused
    before any work unless forced; the metadata names the base model, not its path."""
    from lorahub.train.trainer import Trainer

    data = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    cfg = _config(data, out, base=str(tiny_sd1), name="../../evil/name", steps=1)
    res = Trainer(cfg).run()
    assert res.lora_path.parent == out and "/" not in res.lora_path.name and ".." not in res.lora_path.name
    assert res.metadata["ss_sd_model_name"] == tiny_sd1.name and str(tiny_sd1) not in json.dumps(res.metadata)
    before = res.lora_path.read_bytes()
    t = Trainer(cfg)
    with pytest.raises(OutputExists):
        t.run()
    assert not hasattr(t, "pipe")  # refused before the model was even loaded
    assert res.lora_path.read_bytes() == before
    res2 = Trainer(cfg, force=True).run()
    assert res2.lora_path == res.lora_path and res2.steps == 1


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_flow_matching_loss_preconditioning_is_sigma_squared_weighting(kind):
    """The SD3 script's output preconditioning (x0 = noisy − σ·pred against x0) is the velocity loss
    (pred against noise − x0) weighted by σ², with σ read from the scheduler at the sampled timestep;
    instance + class split adds the class part with its weight."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from lorahub import tiny
    from lorahub.ops.models import load_pipeline
    from lorahub.train.trainer import flow_matching_loss

    pipe = load_pipeline(f"tiny-{kind}")
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        if kind == "flux":
            pe, ppe, ids = pipe.encode_prompt(["a cat", "a dog"], None, max_sequence_length=tiny.T5_MAX_LENGTH)
            text = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe, "text_ids": ids}
        else:
            pe, _, ppe, _ = pipe.encode_prompt(["a cat", "a dog"], None, None, do_classifier_free_guidance=False,
                                               max_sequence_length=tiny.T5_MAX_LENGTH)
            text = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
        lat = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))

        def loss(n, **kw):
            g = torch.Generator().manual_seed(5)
            t = {k: v[:n] for k, v in text.items() if k != "text_ids"} | (
                {"text_ids": text["text_ids"]} if "text_ids" in text else {})
            return flow_matching_loss(pipe.transformer, sched, lat[:n], t, g, family=kind, vae_scale_factor=2, **kw)

        plain, _, _ = loss(1)
        pre, _, _ = loss(1, precondition=True)
        g = torch.Generator().manual_seed(5)
        torch.randn(lat[:1].shape, generator=g)  # the noise draw comes first
        u = compute_density_for_timestep_sampling("none", 1, device="cpu", generator=g)
        sigma = float(sched.sigmas[(u * 1000).long()])
        assert 0 < sigma < 1 and torch.isfinite(plain)
        assert float(pre) == pytest.approx(sigma ** 2 * float(plain), rel=1e-4)
        total, inst, prior = loss(2, reduction_split=1, prior_loss_weight=0.25)
        assert float(total) == pytest.approx(float(inst) + 0.25 * float(prior), rel=1e-6)
        assert float(inst) != pytest.approx(float(prior))
