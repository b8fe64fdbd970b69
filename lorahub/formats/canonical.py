"""The one in-memory form every lorahub command works on.

A :class:`LoraModel` holds named layers keyed by the *diffusers module path* of the module they adapt,
with a part prefix::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q
    transformer.transformer_blocks.0.attn.to_q
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj
    text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj

A layer whose module path is not known (a kohya name no module list holds) keeps its dialect's own
name under its part, ``unet.lora_unet_double_blocks_0_img_attn_qkv``: an *unmapped* key
(:func:`lorahub.formats.names.is_unmapped`). Factor operations treat every key alike; only a mapping to
another dialect's names needs the module path (``notes`` says which layers stayed unmapped and why).

Each :class:`LoraLayer` keeps its factors exactly as stored in the file (dtype included), so that
reading and writing another dialect is lossless. The effective update of a plain LoRA layer is
``ΔW = up · down · (alpha / rank)``; LyCORIS kinds define their own product (see :meth:`LoraLayer.delta`).

Tensors are torch tensors: this module imports torch and is only used by ML commands, never by the
catalogue commands (``lorahub search`` must start fast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from lorahub.vocab import PARTS

# Factor names per kind (the keys of LoraLayer.weights)
#   lora : "down" (r, in[, kh, kw]), "up" (out, r[, 1, 1]), optional "mid" (r, r, kh, kw) for Tucker LoCon
#   loha : "w1a" (out, r), "w1b" (r, in*k*k), "w2a", "w2b", optional "t1", "t2" (r, r, kh, kw)
#   lokr : "w1" or ("w1a", "w1b"); "w2" or ("w2a", "w2b"); optional "t2"
#   full : "diff" (the whole ΔW, as LyCORIS stores it when the rank is too high), optional "diff_b"
KINDS = ("lora", "loha", "lokr", "full")


@dataclass
class LoraLayer:
    """One adapted module: its factors, alpha and (optionally) DoRA magnitude."""

    kind: str
    weights: dict[str, torch.Tensor]
    alpha: float | None = None  # None: alpha = rank (scale 1)
    dora_scale: torch.Tensor | None = None
    # Extra per-layer facts a dialect needs to write the layer back bit for bit (e.g. alpha's dtype).
    extra: dict = field(default_factory=dict)

    # ----- plain LoRA accessors -------------------------------------------------------------
    @property
    def down(self) -> torch.Tensor:
        return self.weights["down"]

    @property
    def up(self) -> torch.Tensor:
        return self.weights["up"]

    @property
    def mid(self) -> torch.Tensor | None:
        return self.weights.get("mid")

    @property
    def is_conv(self) -> bool:
        return any(t.dim() == 4 for t in self.weights.values())

    @property
    def rank(self) -> int:
        w = self.weights
        if self.kind == "lora":
            return int(w["down"].shape[0])
        if self.kind == "loha":
            return int(w["w1b"].shape[0])
        if self.kind == "lokr":
            if "t2" in w:  # Tucker: lokr_w2_a is stored rank-first (r, out)
                return int(w["t2"].shape[0])
            if "w2a" in w:
                return int(w["w2a"].shape[1])
            if "w1a" in w:
                return int(w["w1a"].shape[1])
            return 0  # both Kronecker factors full: no rank, scale 1
        if self.kind == "full":
            return int(min(w["diff"].shape[0], w["diff"][0].numel()))
        raise ValueError(f"unknown layer kind {self.kind!r}")

    @property
    def scale(self) -> float:
        """The multiplier applied to the factor product (alpha / rank)."""
        if self.kind == "full":
            return 1.0
        if self.kind == "lokr" and "w1a" not in self.weights and "w2a" not in self.weights:
            return 1.0
        r = self.rank
        if self.alpha is None or r == 0:
            return 1.0
        return float(self.alpha) / r

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the adapted weight, (out, in) or (out, in, kh, kw)."""
        if "shape" in self.extra:
            return tuple(self.extra["shape"])
        w = self.weights
        if self.kind == "lora":
            down, up = w["down"], w["up"]
            if down.dim() == 4:
                if "mid" in w:
                    kh, kw = w["mid"].shape[2:]
                else:
                    kh, kw = down.shape[2:]
                return (int(up.shape[0]), int(down.shape[1]), int(kh), int(kw))
            return (int(up.shape[0]), int(down.shape[1]))
        if self.kind == "full":
            return tuple(int(s) for s in w["diff"].shape)
        raise ValueError(f"layer of kind {self.kind!r} needs extra['shape']")

    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.weights.values())

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Materialise ΔW (with the scale applied). For tests and for kinds without a cheaper path."""
        from lorahub.formats import lycoris_math

        return lycoris_math.delta(self, dtype=dtype)


@dataclass
class LoraModel:
    """A LoRA (or LyCORIS network, or embedding bundle) in canonical form."""

    layers: dict[str, LoraLayer] = field(default_factory=dict)
    # token -> {"clip_l": (n, 768)} or {"clip_l": ..., "clip_g": (n, 1280)} (SDXL)
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    base: str = "unknown"  # a base family: sd1 | sd2 | sdxl | sd3 | flux | other:<name> | unknown
    source_format: str = "unknown"  # dialect it was read from
    # architecture the layer names were matched against: a built-in one (sd1, tiny-sd1, flux, …), one
    # derived from a model's config (cfg-<fingerprint>), or unknown (see lorahub.formats.names)
    arch: str = "unknown"
    # dialect details needed to write the file back bit for bit (e.g. how embeddings were keyed)
    extra: dict = field(default_factory=dict)
    # what reading had to say: layers kept under their dialect's names, and why
    notes: list[str] = field(default_factory=list)

    def parts(self) -> list[str]:
        found = {name.split(".", 1)[0] for name in self.layers}
        return [p for p in PARTS if p in found]

    def items(self) -> Iterator[tuple[str, LoraLayer]]:
        return iter(self.layers.items())

    @property
    def kind(self) -> str:
        """Network kind as the registry names it: lora|locon|loha|lokr|dora|textual-inversion."""
        if not self.layers:
            return "textual-inversion" if self.embeddings else "lora"
        kinds = {layer.kind for layer in self.layers.values()}
        if any(layer.dora_scale is not None for layer in self.layers.values()):
            return "dora"
        if "loha" in kinds:
            return "loha"
        if "lokr" in kinds:
            return "lokr"
        if any(layer.is_conv and len(layer.shape) == 4 and layer.shape[2] * layer.shape[3] > 1
               for layer in self.layers.values() if layer.kind == "lora"):
            return "locon"
        return "lora"

    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers.values()]
