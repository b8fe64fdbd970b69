"""Random plain-LoRA models on given module shapes, for tests (deterministic per seed)."""

from __future__ import annotations

import torch

from lorahub.formats.canonical import LoraLayer, LoraModel


def random_lora(layers: dict[str, tuple[int, ...]], seed: int, rank: int, alpha: float | None = None,
                scale: float = 0.1, base: str = "sd1") -> LoraModel:
    """A LoRA with N(0, scale²) factors on every ``name: weight shape`` of ``layers`` (conv: 4-D)."""
    gen = torch.Generator().manual_seed(seed)
    m = LoraModel(base=base)
    for key, shape in layers.items():
        if len(shape) == 4:
            w = {"down": torch.randn(rank, *shape[1:], generator=gen) * scale,
                 "up": torch.randn(shape[0], rank, 1, 1, generator=gen) * scale}
        else:
            w = {"down": torch.randn(rank, shape[1], generator=gen) * scale,
                 "up": torch.randn(shape[0], rank, generator=gen) * scale}
        m.layers[key] = LoraLayer("lora", w, alpha=alpha)
    return m
