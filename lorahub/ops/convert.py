"""Convert a LoRA between dialects (kohya, diffusers, peft), losslessly: :func:`convert`.

Reading goes through :func:`lorahub.formats.io.load_lora` (cloneofsimo, LyCORIS, DoRA and embeddings
too), writing through :func:`lorahub.formats.io.save_lora`; converting back gives the same tensors bit
for bit and the same metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.errors import LorahubError
from lorahub.formats.names import unmapped
from lorahub.outputs import Written
from lorahub.vocab import ARCHS


@dataclass
class ConvertResult(Written):
    """What :func:`convert` wrote (``out``, in ``dialect``), and the registry entry it made (``entry``,
    ``created``)."""

    input: Path
    source_format: str            # the input's dialect (detected)
    kind: str
    base: str
    arch: str
    layers: int
    embeddings: list[str] = field(default_factory=list)
    dropped_embeddings: list[str] = field(default_factory=list)
    dtype: str | None = None      # None: the input's own
    unmapped_layers: list[str] = field(default_factory=list)  # kept under their kohya names: no module list maps them
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"input": str(self.input), "output": str(self.out), "from": self.source_format,
                "to": self.dialect, "kind": self.kind, "base": self.base, "arch": self.arch, "layers": self.layers,
                "unmapped": len(self.unmapped_layers), "unmapped_layers": self.unmapped_layers, "notes": self.notes,
                "embeddings": self.embeddings, "dropped_embeddings": self.dropped_embeddings,
                "dtype": self.dtype or "unchanged",
                "registered": {"id": self.entry["id"], "created": self.created} if self.entry else None}


def convert(lora: str | os.PathLike, dialect: str, *, out: str | os.PathLike | None = None, dtype: str | None = None,
            arch: str | None = None, base: str | None = None, config: str | os.PathLike | None = None,
            drop_embeddings: bool = False, force: bool = False, register: bool = False,
            registry=None) -> ConvertResult:
    """Rewrite the LoRA ``lora`` (a file or a registry reference) in ``dialect``.

    ``out`` defaults to ``<name>.<dialect>.safetensors`` beside an input file (in the current folder
    for a registry entry). ``dtype`` (fp16 | bf16 | fp32) casts the factors; None keeps them.

    Dialects that keep module names (kohya to kohya, diffusers to peft and back, a UNet's or text
    encoder's diffusers names to kohya) need no architecture. kohya names are module paths with dots turned into underscores, so reading
    them back needs a module list: a built-in one (inferred from names and shapes, or named by ``arch``:
    one of :data:`lorahub.vocab.ARCHS`), or that of the model ``base`` (a diffusers folder, a registry
    checkpoint, a single-file checkpoint with ``config`` = a diffusers folder of its architecture),
    derived from its own config. Layers no module list maps keep their kohya names: kohya output
    writes them back as they were; diffusers/peft output refuses them, naming them.

    ``drop_embeddings`` leaves bundled token embeddings out (diffusers and peft files cannot hold
    them). ``register`` adds the output to the registry (lineage: converted-from), with the input
    entry's type, triggers, tags and description. Files holding NaN or Inf are refused.
    """
    from lorahub.formats.detect import detect
    from lorahub.formats.io import check_dialect, check_finite, load_lora, parse_dtype, save_lora
    from lorahub.lineage import register_derived
    from lorahub.outputs import check_output, default_output
    from lorahub.refs import LazyRegistry, resolve_lora

    check_dialect(dialect)
    if arch is not None and arch not in ARCHS:
        raise LorahubError(f"unknown architecture {arch!r} (one of {', '.join(ARCHS)})")
    if arch is not None and base is not None:
        raise LorahubError("give an architecture or a base model, not both")
    dt = parse_dtype(dtype)
    with LazyRegistry.using(registry) as regs:
        src = resolve_lora(lora, regs)
        det = detect(src.path)
        if det.format == "checkpoint":
            raise LorahubError(f"{lora}: is a full model checkpoint, not a LoRA")
        if base is not None:
            from lorahub.ops.models import arch_of_model

            arch = arch_of_model(base, regs, config=config)
        model = load_lora(src.path, arch=arch)
        bad = check_finite(model)
        if bad:
            raise LorahubError(f"{lora}: refusing to convert: {len(bad)} layer(s) hold NaN or Inf values "
                               f"(first: {bad[0]})")
        dropped = []
        if model.embeddings and drop_embeddings:
            dropped = list(model.embeddings)
            model.embeddings = {}
        if out is None:
            out = default_output(src.name, f".{dialect}.safetensors", Path.cwd() if src.entry else src.path.parent)
        out = check_output(out, force=force, inputs=[src.path])
        path = save_lora(model, out, dialect=dialect, dtype=dt)
        notes = list(model.notes)
        from lorahub.formats.dit import diffusers_notes, fusion_notes

        notes += fusion_notes(model) if dialect == "kohya" else diffusers_notes(model)
        res = ConvertResult(input=src.path, out=Path(path), source_format=det.format, dialect=dialect,
                            kind=model.kind, base=model.base, arch=model.arch, layers=len(model.layers),
                            embeddings=list(model.embeddings), dropped_embeddings=dropped, dtype=dtype,
                            unmapped_layers=unmapped(model.layers), notes=notes)
        if register:
            entry = src.entry or {}
            res.entry, res.created = register_derived(
                regs.get(), path, relation="converted-from", parents=[src.parent],
                detail={"from": det.format, "to": dialect, "dtype": dtype or "unchanged",
                        "dropped_embeddings": dropped},
                type=entry.get("type"), triggers=entry.get("triggers"), tags=entry.get("tags"),
                description=entry.get("description"), source=str(entry["id"] if src.entry else src.path))
    return res
