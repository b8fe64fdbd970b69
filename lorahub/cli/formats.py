"""`lorahub convert`: rewrite a LoRA in another dialect, losslessly (:func:`lorahub.ops.convert.convert`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lorahub.cli.app import ForceOpt, app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json
from lorahub.vocab import ARCHS


@app.command()
def convert(
    ref: Annotated[str, typer.Argument(help="LoRA file, or registry reference (id, name, hash prefix).")],
    to: Annotated[str, typer.Option("--to", help="Target dialect: kohya | diffusers | peft.")],
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Cast factors: fp16 | bf16 | fp32 (default: keep).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output file (default: <name>.<dialect>.safetensors "
                                                               "beside the input, or in the current folder).")] = None,
    register: Annotated[bool, typer.Option("--register", help="Add the output to the registry (lineage: converted-from).")] = False,
    arch: Annotated[Optional[str], typer.Option("--arch", help="Built-in architecture the names belong to: "
                                                              f"{' | '.join(ARCHS)} (default: inferred from names "
                                                              "and shapes).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model whose own module list maps kohya names "
                                                              "(diffusers folder, registry checkpoint, .safetensors "
                                                              "with --config): needed for models no built-in "
                                                              "table holds.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Diffusers folder of the base's architecture, "
                                                                   "for a single-file --base.")] = None,
    drop_embeddings: Annotated[bool, typer.Option("--drop-embeddings", help="Leave bundled token embeddings out "
                                                                          "(diffusers/peft files cannot hold them).")] = False,
    force: ForceOpt = False,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Convert a LoRA between kohya, diffusers and PEFT dialects (reads cloneofsimo, LyCORIS, DoRA and
    embeddings too). Lossless: converting back gives the same tensors bit for bit and the same metadata.

    \b
    Examples:
      lorahub convert my_lora.safetensors --to diffusers
      lorahub convert 3f2a9c --to kohya --dtype fp16 --out lora_fp16.safetensors --register
      lorahub convert custom_kohya.safetensors --to diffusers --base ./my-distilled-sd
    """
    from lorahub.ops.convert import convert as run

    res = run(ref, to, out=out, dtype=dtype, arch=arch, base=base, config=config, drop_embeddings=drop_embeddings,
              force=force, register=register, registry=home)
    if json_out:
        print_json(res.to_dict())
        return
    con = console()
    con.print(f"converted {res.input.name} ({res.source_format}, {res.kind}, {res.base}, {res.layers} layers) "
              f"-> {res.out} ({res.dialect}{', ' + dtype if dtype else ''})")
    from rich.markup import escape

    for note in res.notes:
        con.print(f"note: {escape(note)}")
    if res.dropped_embeddings:
        con.print(f"dropped {len(res.dropped_embeddings)} bundled embedding(s): {', '.join(res.dropped_embeddings)}")
    if res.entry:
        con.print(f"registered as {res.entry['id']}" + ("" if res.created else " (already there)"))
