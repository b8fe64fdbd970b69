"""`lorahub merge`: combine LoRAs (svd / concat / sum) or bake them into a checkpoint, from a TOML recipe,
the inline form ``A:0.8 B:0.6``, or a stored recipe (``--from ID``).

Module level imports only typer/stdlib; torch and the merge code are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lorahub.cli.app import ForceOpt, app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json
from lorahub.cli.steps import steps


@app.command()
def merge(
    items: Annotated[Optional[List[str]], typer.Argument(
        help="A recipe .toml file, or LoRAs as REF:WEIGHT (REF = registry id, name, hash prefix or path).",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (LoRA or single-file checkpoint) "
                                                 "or folder (checkpoint baked into a diffusers folder).")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", "-r", help="Rank after an svd merge.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="svd | concat | sum "
                                                   "(default: svd with --rank, else concat).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base family (sd1|sd2|sdxl|sd3|flux|other:<name>) or, with --checkpoint, "
                                                 "the model to bake into (tiny-sd1, tiny-flux, …, folder, .safetensors, registry ref).")] = None,
    checkpoint: Annotated[bool, typer.Option("--checkpoint", help="Bake into the --base model instead of "
                                              "writing a LoRA (output = \"checkpoint\").")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the merged LoRA (registry and metadata).")] = None,
    dialect: Annotated[Optional[str], typer.Option("--dialect", help="kohya | diffusers | peft (default kohya).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp32 | fp16 | bf16 of the written LoRA "
                                                  "(default: the inputs' own).")] = None,
    register: Annotated[bool, typer.Option("--register", help="Add the result to the registry with its lineage.")] = False,
    from_id: Annotated[Optional[str], typer.Option("--from", help="Re-run the recipe stored with this merged entry.")] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Print the Frobenius retained of every layer.")] = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Merge LoRAs into one (svd to a rank, exact concat, or same-rank sum), or bake them into a checkpoint.

    \b
    lorahub merge recipe.toml --out merged.safetensors --register
    lorahub merge miku:0.8 arcane-style:0.6 --rank 64 --method svd --out miku-arcane.safetensors
    lorahub merge a.safetensors:1 b.safetensors:-0.5 --method concat --out diff.safetensors
    lorahub merge a:0.7 b:0.5 --checkpoint --base ./my-sd15-folder --out ./baked
    lorahub merge --from 3f2a9c1b7d00 --out again.safetensors
    """
    from lorahub.errors import LorahubError
    from lorahub.ops import recipe as rc

    items = list(items or [])
    if from_id:
        if items:
            raise LorahubError("give either --from ID or a recipe / REF:WEIGHT list, not both")
        if any(v is not None for v in (rank, method, base, dialect, dtype, name)) or checkpoint:
            raise LorahubError("--from re-runs the stored recipe as it is; options other than --out, "
                               "--register, --json cannot change it")
    elif not items:
        raise LorahubError("nothing to merge: give a recipe .toml, REF:WEIGHT items, or --from ID")
    recipe = None
    if not from_id:
        changes = dict(rank=rank, method=method, base=base, dialect=dialect, dtype=dtype, name=name,
                       output="checkpoint" if checkpoint else None)
        if len(items) == 1 and items[0].lower().endswith(".toml"):
            recipe = rc.load_recipe(items[0]).replace(**changes)
        else:
            recipe = rc.inline_recipe(items, **{k: v for k, v in changes.items() if v is not None})
    if out is None and not register:
        raise LorahubError("give --out (or --register to keep the merged LoRA only in the registry)")
    with steps("merging") as on_layer:
        if recipe is None:
            res = rc.rerun_recipe(from_id, out=out, register=register, force=force, registry=home,
                                  on_layer=on_layer)
        else:
            res = rc.merge_recipe(recipe, out=out, register=register, force=force, registry=home,
                                  on_layer=on_layer)
    if json_out:
        print_json(res.to_dict())
        return
    for n in res.notes:
        console(stderr=True).print(f"note: {n}")
    if res.bake is not None:
        console().print(f"baked {res.bake.layers} weights into {res.out} ({res.bake.layout}, "
                        f"{', '.join(f'{k}×{v}' for k, v in res.bake.dtypes.items())})")
    else:
        _print_report(res.to_dict(), res.merge, per_layer)
    if res.rerun_of is not None:
        same = "identical to" if res.identical else "differs from"
        console().print(f"re-run {same} {res.rerun_of['name']} ({res.rerun_of['id']})")


def _print_report(report: dict, res, per_layer: bool) -> None:
    from rich.table import Table

    c = console()
    where = report.get("out") or "the registry"
    c.print(f"merged {len(report['inputs'])} LoRAs ({report['method']}) -> {where}: {report['layers']} layers, "
            f"rank {report['rank_min']}-{report['rank_max']}, Frobenius retained {report['retained']:.4%} overall")
    if report.get("materialised_layers"):
        c.print(f"{report['materialised_layers']} LyCORIS layer(s) were materialised to merge them")
    if report["method"] == "sum":
        c.print(f"note: 'sum' mixes factors; relative error vs the exact sum {report['rel_error']:.3%}")
    if report.get("entry"):
        state = "registered" if report.get("created") else "already registered as"
        c.print(f"{state} {report.get('entry_name')} ({report['entry']})")
    if per_layer:
        t = Table(header_style="bold")
        for col in ("layer", "inputs", "rank in", "rank", "retained"):
            t.add_column(col, overflow="fold")
        for r in res.layers:
            t.add_row(r.key, str(r.inputs), str(r.rank_in), str(r.rank), f"{r.retained:.4%}")
        c.print(t)
    elif res.layers and report["method"] != "concat":
        worst = sorted(res.layers, key=lambda r: r.retained)[:3]
        c.print("lowest retained: " + ", ".join(f"{r.key} {r.retained:.3%}" for r in worst))
