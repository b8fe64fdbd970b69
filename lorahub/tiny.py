"""Tiny, deterministic Stable Diffusion-style pipelines built on CPU in seconds, for tests and the demo.

``build(kind, dest)`` writes a diffusers folder (model_index.json, unet, vae, text_encoder(s),
tokenizer(s), scheduler) made from the configs in ``lorahub/data/configs/tiny`` with fixed seeds: the same
bytes on every run. ``ensure(kind)`` builds into a cache folder once and reuses it. Kinds:

* ``sd1`` — an SD1-style UNet (``tiny-sd1``), one CLIP text encoder;
* ``sdxl`` — an SDXL-style UNet with added time/text conditioning, two text encoders (``tiny-sdxl``);
* ``odd`` — an SD-style pipeline whose UNet has a shape no built-in table holds (three blocks of widths
  32/32/64, two layers per block, no mid block): "an architecture lorahub has never seen", for tests
  of everything that must work from a model's own config.

The tokenizer vocabulary is the 256 byte-level characters, their ``</w>`` forms and the two special
tokens, with no merges: every word is spelled out character by character. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from lorahub.resources import model_config, model_config_files

FIXTURE_VERSION = "1"


def _config(name: str) -> dict:
    cfg = model_config("tiny", name)
    cfg.pop("_class_name", None)
    return cfg


def _byte_vocab() -> dict[str, int]:
    # GPT-2 style byte -> unicode map (printable stand-ins for every byte)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab: dict[str, int] = {}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def make_tokenizer():
    from transformers import CLIPTokenizer

    vocab = _byte_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77,
                        bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    return tok


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)


def make_text_encoder(seed: int, with_projection: bool = False, hidden_size: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = _config("clip_text")
    if hidden_size is not None:
        cfg["hidden_size"] = hidden_size
    _seeded(seed)
    config = CLIPTextConfig(**cfg)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model.eval()


def make_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(**_config(f"{kind}_unet")).eval()


def make_vae(seed: int = 2):
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(**_config("vae")).eval()


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**_config("scheduler"))


KINDS = ("sd1", "sdxl", "odd")


def make_pipeline(kind: str = "sd1"):
    """Build the tiny pipeline in memory (StableDiffusionPipeline or StableDiffusionXLPipeline)."""
    if kind in ("sd1", "odd"):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            unet=make_unet(kind, 0), vae=make_vae(2), text_encoder=make_text_encoder(1),
            tokenizer=make_tokenizer(), scheduler=make_scheduler(), safety_checker=None,
            feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            unet=make_unet("sdxl", 0), vae=make_vae(2), text_encoder=make_text_encoder(1),
            text_encoder_2=make_text_encoder(3, with_projection=True), tokenizer=make_tokenizer(),
            tokenizer_2=make_tokenizer(), scheduler=make_scheduler(), force_zeros_for_empty_prompt=True)
    raise ValueError(f"unknown tiny pipeline kind {kind!r} (one of {', '.join(KINDS)})")


def build(kind: str, dest: os.PathLike | str, *, replace: bool = True) -> Path:
    """Write the tiny pipeline as a diffusers folder at ``dest`` (atomically: temp folder + rename).

    With ``replace=False`` a complete folder another process put at ``dest`` meanwhile is kept and
    used (parallel test workers build the cache at the same moment; none may delete what another
    is reading)."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe = make_pipeline(kind)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if replace and dest.exists():
        shutil.rmtree(dest)
    try:
        os.rename(tmp, dest)  # fails if another process already put a (non-empty) folder there
    except OSError:
        if replace or not (dest / "model_index.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def cache_root() -> Path:
    env = os.environ.get("LORAHUB_FIXTURES_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorahub-fixtures"


def _fingerprint() -> str:
    import diffusers
    import torch
    import transformers

    h = hashlib.sha256(FIXTURE_VERSION.encode())
    for name, data in model_config_files("tiny").items():
        h.update(name.encode() + data)
    h.update(f"{torch.__version__}/{diffusers.__version__}/{transformers.__version__}".encode())
    return h.hexdigest()[:12]


def ensure(kind: str = "sd1") -> Path:
    """Path of the cached tiny pipeline folder, built on first use."""
    folder = cache_root() / f"{kind}-{_fingerprint()}"
    if not (folder / "model_index.json").exists():
        build(kind, folder, replace=False)
    return folder
