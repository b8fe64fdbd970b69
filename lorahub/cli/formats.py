"""`lorahub convert`: rewrite a LoRA in another dialect, losslessly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json

DIALECTS = ("kohya", "diffusers", "peft")


def _resolve(ref: str, home):
    """(path, registry entry or None, registry or None): an existing path is a file, else a registry ref."""
    from lorahub.errors import LorahubError

    p = Path(ref).expanduser()
    if p.exists():
        if p.is_dir():
            raise LorahubError(f"{ref}: is a folder, not a LoRA file")
        return p, None, None
    if any(c in ref for c in "/\\") or ref.endswith((".safetensors", ".pt", ".ckpt", ".bin")):
        raise LorahubError(f"{ref}: no such file")
    from lorahub.registry import Registry

    reg = Registry.open(home)
    entry = reg.resolve(ref)
    return Path(reg.blob_path(entry)), entry, reg


@app.command()
def convert(
    ref: Annotated[str, typer.Argument(help="LoRA file, or registry reference (id, name, hash prefix).")],
    to: Annotated[str, typer.Option("--to", help="Target dialect: kohya | diffusers | peft.")],
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Cast factors: fp16 | bf16 | fp32 (default: keep).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file (default: <name>.<dialect>.safetensors "
                                                               "beside the input, or in the current folder).")] = None,
    register: Annotated[bool, typer.Option("--register", help="Add the output to the registry (lineage: converted-from).")] = False,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture the names belong to: sd1 | sd2 | sdxl | "
                                                              "tiny-sd1 | tiny-sdxl (default: inferred from names and shapes).")] = None,
    drop_embeddings: Annotated[bool, typer.Option("--drop-embeddings", help="Leave bundled token embeddings out "
                                                                          "(diffusers/peft files cannot hold them).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert a LoRA between kohya, diffusers and PEFT dialects (reads cloneofsimo, LyCORIS, DoRA and
    embeddings too). Lossless: converting back gives the same tensors bit for bit and the same metadata.

    \b
    Examples:
      lorahub convert my_lora.safetensors --to diffusers
      lorahub convert 3f2a9c --to kohya --dtype fp16 --out lora_fp16.safetensors --register
    """
    from lorahub.errors import LorahubError

    if to not in DIALECTS:
        raise LorahubError(f"--to {to!r}: choose one of {', '.join(DIALECTS)}")
    if arch is not None and arch not in ("sd1", "sd2", "sdxl", "tiny-sd1", "tiny-sdxl"):
        raise LorahubError(f"--arch {arch!r}: choose one of sd1, sd2, sdxl, tiny-sd1, tiny-sdxl")
    src, entry, reg = _resolve(ref, home)

    from lorahub.formats.detect import detect
    from lorahub.formats.io import check_finite, load_lora, parse_dtype, save_lora

    dt = parse_dtype(dtype)
    det = detect(src)
    if det.format == "checkpoint":
        raise LorahubError(f"{ref}: is a full model checkpoint, not a LoRA")
    model = load_lora(src, arch=arch)
    bad = check_finite(model)
    if bad:
        raise LorahubError(f"{ref}: refusing to convert: {len(bad)} layer(s) hold NaN or Inf values "
                           f"(first: {bad[0]})")
    dropped = []
    if model.embeddings and drop_embeddings:
        dropped = list(model.embeddings)
        model.embeddings = {}

    if out is None:
        stem = (entry["name"] if entry else src.stem)
        stem = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in stem) or "lora"
        folder = Path.cwd() if entry else src.parent
        out = folder / f"{stem}.{to}.safetensors"
    out = out.expanduser()
    if out.exists():
        if out.resolve() == src.resolve():
            raise LorahubError(f"{out}: is the input file; choose another --out")
        if not force:
            raise LorahubError(f"{out}: already exists (use --force to overwrite)")
    path = save_lora(model, out, dialect=to, dtype=dt)

    registered = None
    if register:
        from lorahub.registry import Registry

        reg = reg or Registry.open(home)
        if entry is not None:
            parent = entry["id"]
        else:
            from lorahub.hashing import sha256_file

            parent = sha256_file(src)
        lineage = [{"relation": "converted-from", "parent": parent,
                    "detail": {"from": det.format, "to": to, "dtype": dtype or "unchanged",
                               "dropped_embeddings": dropped}}]
        kwargs = {}
        if entry is not None:
            for k in ("type", "triggers", "tags", "description"):
                if entry.get(k):
                    kwargs[k] = entry[k]
        new, created = reg.add_file(path, lineage=lineage, source=str(src if entry is None else entry["id"]),
                                    **kwargs)
        registered = {"id": new["id"], "created": created}

    result = {"input": str(src), "output": str(path), "from": det.format, "to": to, "kind": model.kind,
              "base": model.base, "arch": model.arch, "layers": len(model.layers),
              "embeddings": list(model.embeddings), "dropped_embeddings": dropped,
              "dtype": dtype or "unchanged", "registered": registered}
    if json_out:
        print_json(result)
        return
    con = console()
    con.print(f"converted {src.name} ({det.format}, {model.kind}, {model.base}, {len(model.layers)} layers) "
              f"-> {path} ({to}{', ' + dtype if dtype else ''})")
    if dropped:
        con.print(f"dropped {len(dropped)} bundled embedding(s): {', '.join(dropped)}")
    if registered:
        con.print(f"registered as {registered['id']}" + ("" if registered["created"] else " (already there)"))
