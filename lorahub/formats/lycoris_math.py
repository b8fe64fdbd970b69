"""ΔW of every layer kind, materialised. Used for tests, baking, and kinds without a factor shortcut.

Formulas (facts from LyCORIS and kohya's docs):
  lora : ΔW = up · down · scale (conv: flatten to (out, r) @ (r, in·kh·kw)); Tucker: up ×₁ mid ×₂ down
  loha : ΔW = (w1a · w1b) ⊙ (w2a · w2b) · scale
  lokr : ΔW = kron(w1, w2) · scale, w1 = w1a · w1b when factored (same for w2)
  full : ΔW = diff
"""

from __future__ import annotations

import torch


def _f(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)


def lora_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, scale: float,
               shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    up2 = _f(up, dtype).reshape(up.shape[0], -1)
    if mid is None:
        d = up2 @ _f(down, dtype).reshape(down.shape[0], -1)
        return (d * scale).reshape(shape)
    # Tucker: ΔW[o, i, h, w] = Σ_ab up[o, a] · mid[a, b, h, w] · down[b, i]
    down2 = _f(down, dtype).reshape(down.shape[0], -1)
    d = torch.einsum("oa,abhw,bi->oihw", up2, _f(mid, dtype), down2)
    return (d * scale).reshape(shape)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    # LyCORIS Tucker rebuild: W[p, r, h, w] = Σ_ij t[i, j, h, w] · wa[i, p] · wb[j, r].
    # In Tucker mode LyCORIS stores both 2-D factors rank-first: hada_w?_a / lokr_w2_a as (r, out)
    # ("1-mode") and hada_w?_b / lokr_w2_b as (r, in) ("2-mode"), so they are used as stored.
    return torch.einsum("ijhw,jr,ip->prhw", t, wb, wa)


def delta(layer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    w = {k: v.to(dtype) for k, v in layer.weights.items()}
    shape = layer.shape
    s = layer.scale
    if layer.kind == "lora":
        return lora_delta(w["up"], w["down"], w.get("mid"), s, shape, dtype)
    if layer.kind == "full":
        return w["diff"].reshape(shape)
    if layer.kind == "loha":
        if "t1" in w:
            m1 = _tucker(w["t1"], w["w1a"], w["w1b"])
            m2 = _tucker(w["t2"], w["w2a"], w["w2b"])
        else:
            m1 = w["w1a"] @ w["w1b"]
            m2 = w["w2a"] @ w["w2b"]
        return (m1 * m2 * s).reshape(shape)
    if layer.kind == "lokr":
        w1 = w["w1"] if "w1" in w else w["w1a"] @ w["w1b"]
        if "w2" in w:
            w2 = w["w2"]
        elif "t2" in w:
            w2 = _tucker(w["t2"], w["w2a"], w["w2b"])
        else:
            w2 = w["w2a"] @ w["w2b"]
        if len(shape) == 4 and w2.dim() == 2:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.shape[1] != shape[1] // w1.shape[1] else w2
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # torch.kron views its inputs: the einsum result of the Tucker rebuild must be made contiguous
        return (torch.kron(w1.contiguous(), w2.contiguous()) * s).reshape(shape)
    raise ValueError(f"unknown layer kind {layer.kind!r}")


def dora_weight(layer, w0: torch.Tensor, multiplier: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The adapted weight of a DoRA layer: ``dora_scale · (W0 + m·ΔW) / ‖W0 + m·ΔW‖``.

    LyCORIS / kohya store the magnitude ``dora_scale`` either per input column, shape (1, in[, 1, 1])
    (the norm is then taken over every axis but the input one), or per output row, shape (out, 1[, 1, 1])
    ("wd_on_out": norm over every axis but the output one). ``multiplier`` scales ΔW (the LoRA strength);
    the result replaces W0 (it is not an additive ΔW)."""
    if layer.dora_scale is None:
        raise ValueError("layer has no dora_scale")
    w = w0.to(dtype) + multiplier * delta(layer, dtype).reshape(w0.shape)
    m = layer.dora_scale.to(dtype)
    if m.shape[0] == w.shape[0] and (m.dim() < 2 or m.shape[1] == 1) and w.shape[0] != 1:
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
    else:
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, -1, *([1] * (w.dim() - 2)))
    return w * (m.reshape(norm.shape) / norm)
