"""Tiny, deterministic Stable Diffusion-style pipelines built on CPU in seconds, for tests and the demo.

``build(kind, dest)`` writes a diffusers folder (model_index.json, unet, vae, text_encoder(s),
tokenizer(s), scheduler) made from the configs in ``lorahub/data/configs/tiny`` with fixed seeds: the same
bytes on every run. ``ensure(kind)`` builds into a cache folder once and reuses it. Kinds:

* ``sd1`` — an SD1-style UNet (``tiny-sd1``), one CLIP text encoder;
* ``sdxl`` — an SDXL-style UNet with added time/text conditioning, two text encoders (``tiny-sdxl``);
* ``odd`` — an SD-style pipeline whose UNet has a shape no built-in table holds (three blocks of widths
  32/32/64, two layers per block, no mid block): "an architecture lorahub has never seen", for tests
  of everything that must work from a model's own config;
* ``flux`` — a Flux.1-style ``FluxPipeline`` (``tiny-flux``): a ``FluxTransformer2DModel`` with one
  double-stream and one single-stream block (width 32, guidance embedding), a CLIP text encoder and a
  T5 encoder, a 1-latent-channel VAE and Flux's dynamically shifted ``FlowMatchEulerDiscreteScheduler``;
* ``sd3`` — an SD3-style ``StableDiffusion3Pipeline`` (``tiny-sd3``): an ``SD3Transformer2DModel`` with
  two joint blocks (the last one ``context_pre_only``), two CLIP encoders with projection, a T5
  encoder, the same VAE and ``FlowMatchEulerDiscreteScheduler(shift=3)``.

The CLIP tokenizer vocabulary is the 256 byte-level characters, their ``</w>`` forms and the two special
tokens, with no merges: every word is spelled out character by character. The T5 tokenizer is a
``tokenizers`` Unigram model over the printable ASCII characters (each alone and with the ``▁``
word-start mark) behind a Metaspace pre-tokenizer, wrapped as ``T5TokenizerFast``. Both render 32×32
images in 2 steps in a fraction of a second on CPU. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from lorahub.resources import model_config, model_config_files

FIXTURE_VERSION = "2"


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


T5_MAX_LENGTH = 32  # the tiny T5 tokenizer's model_max_length (pipelines' max_sequence_length)


def _t5_vocab() -> list[tuple[str, float]]:
    """Unigram vocabulary: the three special tokens, the word-start mark, every printable ASCII
    character alone and after the mark (scores favour the fewest pieces)."""
    chars = [chr(c) for c in range(32, 127)]
    return ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
            + [(c, -3.0) for c in chars] + [("\u2581" + c, -3.5) for c in chars])


def make_t5_tokenizer():
    """A ``T5TokenizerFast`` built offline from a ``tokenizers`` Unigram model (Metaspace
    pre-tokenizer); it saves and reloads through ``from_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    tk = Tokenizer(models.Unigram(_t5_vocab(), unk_id=2, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=T5_MAX_LENGTH)


def make_t5_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    cfg = _config("t5_encoder")  # its vocab_size is len(_t5_vocab())
    _seeded(seed)
    return T5EncoderModel(T5Config(**cfg)).eval()


def make_transformer(kind: str, seed: int = 0):
    """The tiny Flux (``flux``) or SD3 (``sd3``) transformer."""
    import diffusers

    cfg = model_config("tiny", f"{kind}_transformer")
    cls = getattr(diffusers, cfg.pop("_class_name"))
    _seeded(seed)
    return cls(**cfg).eval()


def make_flow_vae(seed: int = 2):
    """A 1-latent-channel VAE (scaling 1, shift 0) for the flow-matching fixtures."""
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(**_config("flow_vae")).eval()


def make_flow_scheduler(kind: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**_config(f"{kind}_scheduler"))


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


KINDS = ("sd1", "sdxl", "odd", "flux", "sd3")


def make_pipeline(kind: str = "sd1"):
    """Build the tiny pipeline in memory (StableDiffusionPipeline, StableDiffusionXLPipeline,
    FluxPipeline or StableDiffusion3Pipeline)."""
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
    if kind == "flux":
        from diffusers import FluxPipeline

        return FluxPipeline(
            transformer=make_transformer("flux", 0), vae=make_flow_vae(2), text_encoder=make_text_encoder(1),
            tokenizer=make_tokenizer(), text_encoder_2=make_t5_encoder(3), tokenizer_2=make_t5_tokenizer(),
            scheduler=make_flow_scheduler("flux"))
    if kind == "sd3":
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=make_transformer("sd3", 0), vae=make_flow_vae(2),
            text_encoder=make_text_encoder(1, with_projection=True), tokenizer=make_tokenizer(),
            text_encoder_2=make_text_encoder(3, with_projection=True), tokenizer_2=make_tokenizer(),
            text_encoder_3=make_t5_encoder(4), tokenizer_3=make_t5_tokenizer(),
            scheduler=make_flow_scheduler("sd3"))
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


# BFL names of the Flux.1 transformer's RMSNorm scales (the only weights outside the LoRA-able modules
# whose names differ); every other weight follows lorahub.formats.dit.flux.FLUX's module map.
_BFL_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
              "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
              "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
              "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
_BFL_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def flux_to_bfl(state_dict: dict) -> dict:
    """A diffusers ``FluxTransformer2DModel`` state dict in the original BFL layout
    (``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``, …), fused where BFL
    fuses: the single-file form diffusers' ``from_single_file`` reads back (tests of single-file Flux
    extract and bake)."""
    import torch

    from lorahub.formats.dit.flux import FLUX
    from lorahub.formats.dit.fused import swap_halves

    out = {}
    n_double = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks.")), default=-1)
    n_single = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("single_transformer_blocks.")),
                       default=-1)
    modules = dict(FLUX.top)
    for b, n in zip(FLUX.blocks, (n_double, n_single)):
        for i in range(n):
            for suffix, f in b.modules.items():
                modules[f"{b.orig}.{i}.{suffix}"] = type(f)(tuple(f"{b.canon}.{i}.{p}" for p in f.parts), f.dims,
                                                            f.swap)
    for orig, f in modules.items():
        for kind in ("weight", "bias"):
            parts = [state_dict.get(f"{p}.{kind}") for p in f.parts]
            if any(t is None for t in parts):
                continue
            t = torch.cat(parts, 0)
            out[f"{orig}.{kind}"] = swap_halves(t) if f.swap else t
    for i in range(n_double):
        for bfl, d in _BFL_NORMS.items():
            out[f"double_blocks.{i}.{bfl}"] = state_dict[f"transformer_blocks.{i}.{d}"]
    for i in range(n_single):
        for bfl, d in _BFL_SINGLE_NORMS.items():
            out[f"single_blocks.{i}.{bfl}"] = state_dict[f"single_transformer_blocks.{i}.{d}"]
    return {k: v.contiguous() for k, v in out.items()}
