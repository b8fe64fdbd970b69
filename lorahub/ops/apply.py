"""Apply canonical LoRAs to a live diffusers pipeline as side branches with a per-sample scale.

Every adapted ``nn.Linear`` / ``nn.Conv2d`` — of the UNet, of a DiT's transformer (Flux.1, SD3: the
module paths of the canonical ``transformer.…`` keys), of the CLIP / T5 text encoders — is replaced by a
:class:`LoraBranch` wrapper that keeps the original module untouched and adds, for sample *i* of the
batch (the first dimension of every input, ``(B, …)`` for transformer tokens too)::

    y_i = W0·x_i (+ b)  +  Σ_k  α_{k,i} · ΔW_k·x_i

where ``ΔW_k·x`` is computed from the factors (``up(down(x)) · alpha/rank``) for plain LoRA / LoCon
layers, and from the materialised ΔW (:meth:`LoraLayer.delta`) for LoHa, LoKr, full-diff, Tucker and
DoRA layers. α is a per-sample tensor held by a shared :class:`ScaleState`, so one batched UNet call
evaluates every strength of a sweep at once. When the module sees a batch that is a whole multiple of
the scale vector (classifier-free guidance concatenates ``[uncond, cond]``), the vector is tiled.

DoRA layers are applied as the linear interpolation between the base weight and the fully decomposed
weight: ``W(α) = W0 + α·(m·(W0+ΔW)/‖W0+ΔW‖ − W0)`` (α = 0 is the base model, α = 1 the full DoRA).

Textual-inversion embeddings of a model are loaded into the tokenizer(s) and text encoder(s) with
diffusers' ``load_textual_inversion`` (one tensor per encoder for SDXL) and unloaded on ``remove()``.

``apply_loras(pipe, models)`` returns an :class:`AppliedLoras` handle; ``handle.remove()`` (or leaving its
``with`` block) puts every original module back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lorahub.errors import LorahubError
from lorahub.vocab import PARTS

PART_ATTRS = {p: p for p in PARTS}


class ScaleState:
    """Per-adapter, per-part strengths shared by all branches: a float or a per-sample 1-D tensor."""

    def __init__(self) -> None:
        self._values: dict[tuple[int, str], float | torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor | None] = {}

    def set(self, slot: int, value, parts=None) -> None:
        if isinstance(value, (list, tuple)):
            value = torch.tensor([float(v) for v in value], dtype=torch.float32)
        elif isinstance(value, torch.Tensor):
            value = value.detach().float().reshape(-1).cpu()
        else:
            value = float(value)
        for part in parts or PART_ATTRS:
            self._values[(slot, part)] = value
        self._cache.clear()

    def get(self, slot: int, part: str):
        return self._values.get((slot, part), 1.0)

    def for_batch(self, slot: int, part: str, n: int, ndim: int, dtype, device):
        """Scale for an output of batch ``n``: None (skip: all zero), a float, or an (n, 1, …) tensor."""
        key = (slot, part, n, ndim, dtype, device)
        if key in self._cache:
            return self._cache[key]
        v = self.get(slot, part)
        if isinstance(v, float):
            out = None if v == 0.0 else v
        else:
            if not bool(torch.any(v != 0)):
                out = None
            elif v.numel() == n:
                out = v
            elif n % v.numel() == 0:
                out = v.repeat(n // v.numel())  # [uncond..., cond...] concatenation of the same samples
            else:
                raise LorahubError(f"per-sample LoRA scale of length {v.numel()} does not fit a batch of {n}")
            if out is not None:
                out = out.to(device=device, dtype=dtype).reshape(n, *([1] * (ndim - 1)))
        self._cache[key] = out
        return out


@dataclass
class _Adapter:
    slot: int
    mode: str  # "factors" | "delta"
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    scale: float = 1.0
    delta: torch.Tensor | None = None
    delta_b: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class LoraBranch(nn.Module):
    """Wraps an ``nn.Linear`` / ``nn.Conv2d``; adds per-sample-scaled LoRA branches to its output."""

    def __init__(self, base: nn.Module, state: ScaleState, part: str):
        super().__init__()
        self.base = base
        self.part = part
        self._state = state
        self._adapters: list[_Adapter] = []

    # Code that reads attributes of the wrapped layer (weight, bias, in_features, …) still works.
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = super().__getattr__("base")
            return getattr(base, name)

    def add(self, adapter: _Adapter) -> None:
        """Keep the adapter's tensors as (non-persistent) buffers: they follow ``.to(device/dtype)``."""
        i = len(self._adapters)
        for f in ("down", "up", "delta", "delta_b"):
            t = getattr(adapter, f)
            if t is not None:
                self.register_buffer(f"lora{i}_{f}", t, persistent=False)
                setattr(adapter, f, None)
        adapter.extra["index"] = i
        self._adapters.append(adapter)

    def _branch(self, ad: _Adapter, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        buf = self._buffers
        i = ad.extra["index"]
        if ad.mode == "factors":
            down, up = buf[f"lora{i}_down"], buf[f"lora{i}_up"]
        else:
            delta, delta_b = buf[f"lora{i}_delta"], buf.get(f"lora{i}_delta_b")
        if isinstance(base, nn.Linear):
            if ad.mode == "factors":
                return F.linear(F.linear(x, down), up) * ad.scale
            return F.linear(x, delta, delta_b)
        # Conv2d
        if ad.mode == "factors":
            h = F.conv2d(x, down, None, base.stride, base.padding, base.dilation, base.groups)
            return F.conv2d(h, up) * ad.scale
        return F.conv2d(x, delta, delta_b, base.stride, base.padding, base.dilation, base.groups)

    def forward(self, x, *args, **kwargs):
        y = self.base(x, *args, **kwargs)
        for ad in self._adapters:
            s = self._state.for_batch(ad.slot, self.part, y.shape[0], y.dim(), y.dtype, y.device)
            if s is None:
                continue
            y = y + self._branch(ad, x) * s
        return y


def _part_module(pipe, part: str):
    mod = getattr(pipe, PART_ATTRS.get(part, part), None)
    return mod


def _live_module(root: nn.Module, key: str) -> tuple[nn.Module, str] | tuple[None, None]:
    """(module, live path) of canonical layer ``key`` (lorahub.formats.names spelling) inside ``root``."""
    from lorahub.formats.names import live_path

    path = live_path(key, root)
    try:
        return root.get_submodule(path), path
    except AttributeError:
        return None, None


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def _dora_delta(layer, w0: torch.Tensor) -> torch.Tensor:
    """ΔW_eff = m·(W0+ΔW)/‖W0+ΔW‖ − W0 (norm along the axis dora_scale keeps; LyCORIS convention)."""
    w0 = w0.float()
    d = layer.delta(torch.float32).reshape(w0.shape)
    w = w0 + d
    m = layer.dora_scale.float()
    out = w.shape[0]
    if m.numel() == out and m.shape[0] == out:  # magnitude per output row
        norm = w.reshape(out, -1).norm(dim=1).reshape(out, *([1] * (w.dim() - 1)))
        m = m.reshape(out, *([1] * (w.dim() - 1)))
    else:  # magnitude per input column (LyCORIS default: dora_scale shape (1, in, …))
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, w.shape[1], *([1] * (w.dim() - 2)))
        m = m.reshape(norm.shape)
    return w * (m / (norm + torch.finfo(torch.float32).eps)) - w0


def _make_adapter(slot: int, layer, module: nn.Module) -> _Adapter:
    w = module.weight
    dtype, device = w.dtype, w.device
    shape = tuple(w.shape)
    is_conv = isinstance(module, nn.Conv2d)
    if is_conv and module.groups != 1:
        raise LorahubError("grouped convolutions cannot take a LoRA branch")
    if layer.kind == "lora" and layer.dora_scale is None and layer.mid is None:
        down, up = layer.down, layer.up
        r = down.shape[0]
        misfit = LorahubError(f"LoRA layer of shape {tuple(layer.shape)} does not fit module of shape {shape}")
        if up.shape[0] != shape[0] or up[0].numel() != r or down[0].numel() != w[0].numel():
            raise misfit
        if is_conv:
            down = down.reshape(r, *shape[1:])
            up = up.reshape(shape[0], r, 1, 1)
        else:
            down = down.reshape(r, shape[1])
            up = up.reshape(shape[0], r)
        return _Adapter(slot, "factors", down=down.to(device=device, dtype=dtype),
                        up=up.to(device=device, dtype=dtype), scale=float(layer.scale))
    # everything else: materialised ΔW (LyCORIS factors may leave the full shape to the module)
    if "shape" not in layer.extra and layer.kind in ("loha", "lokr"):
        layer = dataclasses.replace(layer, extra={**layer.extra, "shape": shape})
    if layer.dora_scale is not None:
        d = _dora_delta(layer, w.detach())
    else:
        d = layer.delta(torch.float32)
    if d.numel() != w.numel():
        raise LorahubError(f"LoRA layer of shape {tuple(d.shape)} does not fit module of shape {shape}")
    d = d.reshape(shape)
    b = layer.weights.get("diff_b")
    return _Adapter(slot, "delta", delta=d.to(device=device, dtype=dtype),
                    delta_b=None if b is None else b.reshape(-1).to(device=device, dtype=dtype))


class AppliedLoras:
    """Handle on LoRAs installed into a pipeline: strengths, text-inversion tokens, removal."""

    def __init__(self, pipe, state: ScaleState):
        self.pipe = pipe
        self.state = state
        self.names: list[str] = []
        self.wrapped: list[tuple[nn.Module, str, nn.Module]] = []  # (root, path, original)
        self.applied: list[int] = []  # layers applied per slot
        self.unmatched: list[list[str]] = []
        self.tokens: list[list[str]] = []  # textual-inversion tokens per slot
        self._ti_loaded: list[tuple[list[str], object, object]] = []  # (tokens, tokenizer, text_encoder)
        self.removed = False

    def set_scale(self, slot: int, value, parts=None) -> None:
        """Strength of adapter ``slot``: a number or one value per sample of the coming batch."""
        self.state.set(slot, value, parts)

    def set_scales(self, values) -> None:
        for slot, v in enumerate(values):
            self.state.set(slot, v)

    def remove(self) -> None:
        if self.removed:
            return
        for root, path, original in reversed(self.wrapped):
            _set_submodule(root, path, original)
        self.wrapped.clear()
        for added, tokenizer, text_encoder in reversed(self._ti_loaded):
            try:
                self.pipe.unload_textual_inversion(tokens=added, tokenizer=tokenizer, text_encoder=text_encoder)
            except Exception:  # noqa: BLE001 - best effort; the pipeline is usually discarded anyway
                pass
        self._ti_loaded.clear()
        self.removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _load_embeddings(handle: AppliedLoras, model) -> list[str]:
    pipe = handle.pipe
    tokens = []
    pairs = [("clip_l", "tokenizer", "text_encoder"), ("clip_g", "tokenizer_2", "text_encoder_2")]
    for token, per_encoder in model.embeddings.items():
        loaded = False
        for key, tok_attr, te_attr in pairs:
            emb = per_encoder.get(key)
            tokenizer = getattr(pipe, tok_attr, None)
            te = getattr(pipe, te_attr, None)
            if emb is None or tokenizer is None or te is None:
                continue
            emb = emb.reshape(-1, emb.shape[-1])
            dim = te.get_input_embeddings().weight.shape[1]
            if emb.shape[1] != dim:
                raise LorahubError(f"embedding {token!r} has width {emb.shape[1]}, the text encoder expects {dim}")
            if token in tokenizer.get_vocab():
                raise LorahubError(f"token {token!r} is already in the tokenizer")
            pipe.load_textual_inversion(emb.to(te.dtype), token=token, tokenizer=tokenizer, text_encoder=te)
            added = [token] + [f"{token}_{i}" for i in range(1, emb.shape[0])]
            handle._ti_loaded.append((added, tokenizer, te))
            loaded = True
        if not loaded:
            raise LorahubError(f"embedding {token!r} has no tensor for this pipeline's text encoder(s)")
        tokens.append(token)
    return tokens


def _target_key(key: str, pipe, arch: list) -> str:
    """The canonical module a layer key adapts in ``pipe``: the key itself, or for an unmapped kohya key
    the module the pipeline's own module list names (derived from its components' configs)."""
    from lorahub.formats import names

    if not names.is_unmapped(key):
        return key
    kname = names.dialect_name(key)
    if not names.kohya_part(kname):
        return key
    if not arch:
        arch.append(names.arch_of_pipeline(pipe))
    return names.from_kohya(kname, arch[0]) or key


_DIT_FAMILIES = ("flux", "sd3")


def apply_loras(pipe, models, names=None, *, strict: bool = False) -> AppliedLoras:
    """Install every model of ``models`` (canonical LoraModel) into ``pipe``; strengths start at 1.

    Layers whose module the pipeline lacks are listed in ``handle.unmatched[slot]``; a model with no
    matching layer at all (and no embeddings) raises LorahubError (wrong base model).
    """
    from lorahub.ops.models import family_of_pipeline

    state = ScaleState()
    handle = AppliedLoras(pipe, state)
    arch = []  # the pipeline's own module list, derived once when a LoRA has unmapped kohya names
    try:
        for slot, model in enumerate(models):
            name = names[slot] if names else f"lora{slot}"
            if model.base in _DIT_FAMILIES and family_of_pipeline(pipe) != model.base:
                # DiT families share module names (transformer_blocks.N.attn.to_q): names alone cannot tell
                raise LorahubError(f"{name}: a {model.base} LoRA, and this pipeline is "
                                   f"{family_of_pipeline(pipe)}; is it for another base model?")
            handle.names.append(name)
            applied, unmatched = 0, []
            for key, layer in model.items():
                target = _target_key(key, pipe, arch)
                part = target.partition(".")[0]
                root = _part_module(pipe, part)
                mod, live = _live_module(root, target) if root is not None else (None, None)
                if mod is None:
                    unmatched.append(key)
                    continue
                if isinstance(mod, LoraBranch):
                    wrapper = mod
                    target = mod.base
                elif isinstance(mod, (nn.Linear, nn.Conv2d)):
                    target = mod
                    wrapper = LoraBranch(mod, state, part)
                    _set_submodule(root, live, wrapper)
                    handle.wrapped.append((root, live, mod))
                else:
                    unmatched.append(key)
                    continue
                try:
                    adapter = _make_adapter(slot, layer, target)
                except LorahubError as exc:
                    raise LorahubError(f"{name}: {key}: {exc}; is it for another base model?") from None
                wrapper.add(adapter)
                applied += 1
            if unmatched and (strict or applied == 0) and model.layers:
                raise LorahubError(f"{name}: {len(unmatched)} of {len(model.layers)} layers match no module of "
                                   f"this pipeline (e.g. {unmatched[0]}); is it for another base model?")
            handle.applied.append(applied)
            handle.unmatched.append(unmatched)
            handle.tokens.append(_load_embeddings(handle, model) if model.embeddings else [])
            state.set(slot, 1.0)
    except BaseException:
        handle.remove()
        raise
    return handle
