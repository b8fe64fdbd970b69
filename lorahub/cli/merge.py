"""`lorahub merge`: combine LoRAs (svd / concat / sum) or bake them into a checkpoint, from a TOML recipe,
the inline form ``A:0.8 B:0.6``, or a stored recipe (``--from ID``).

Module level imports only typer/stdlib; torch and the merge code are imported inside the command.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, JsonOpt, console, open_registry, print_json, progress

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _stored_recipe(reg, ref: str):
    """(recipe, resolved inputs) of the merged entry ``ref`` from its lineage rows."""
    from lorahub.errors import LorahubError
    from lorahub.ops import recipe as rc
    from lorahub.ops.recipe import ResolvedLora, parse_recipe, resolve_lora

    entry = reg.resolve(ref)
    rows = [r for r in reg.lineage(entry["id"]) if r.get("relation") == "merged-from"]
    text = next((r["detail"].get("recipe") for r in rows if isinstance(r.get("detail"), dict)
                 and r["detail"].get("recipe")), None)
    if not text:
        raise LorahubError(f"{entry['name']} ({entry['id']}) has no stored merge recipe")
    recipe = parse_recipe(text, source=f"recipe of {entry['name']}", folder=None)
    by_index = {}
    for r in rows:
        idx = (r.get("detail") or {}).get("index")
        if isinstance(idx, int):
            by_index[idx] = r
    resolved = []
    for i, lo in enumerate(recipe.loras):
        row = by_index.get(i)
        parent = None
        if row is not None:
            sha = row.get("parent_sha256") or (row.get("detail") or {}).get("sha256")
            if row.get("parent_id"):
                try:
                    parent = reg.get(row["parent_id"])
                except LorahubError:
                    parent = None
            if parent is None and sha:
                parent = reg.find_sha256(sha)
        if parent is not None:
            resolved.append(ResolvedLora(lo, reg.blob_path(parent), parent["sha256"], parent,
                                         label=parent.get("name") or lo.ref))
        else:
            detail = (row or {}).get("detail") or {}
            where = f"{recipe.source}: lora #{i + 1}: "
            if detail.get("path") and Path(detail["path"]).is_file():
                r = resolve_lora(rc.RecipeLora(ref=detail["path"], weight=lo.weight, parts=lo.parts),
                                 registry=reg, where=where)
                r.spec = lo  # keep the recipe's own ref (it is part of the merged file's metadata)
            else:
                r = resolve_lora(lo, registry=reg, where=where)
            want = (row or {}).get("parent_sha256") or detail.get("sha256")
            if want and r.sha256 != want:
                raise LorahubError(f"{recipe.source}: lora #{i + 1} ({lo.ref}) now resolves to a different file "
                                   f"(sha256 {r.sha256[:12]}, the merge used {want[:12]})")
            resolved.append(r)
    return entry, recipe, text, resolved


def _storage_dtype(models) -> str:
    import torch

    seen = set()
    for m in models:
        for layer in m.layers.values():
            for t in layer.weights.values():
                seen.add(t.dtype)
                break
            break
    if seen and seen <= {torch.float16}:
        return "fp16"
    if seen and seen <= {torch.bfloat16}:
        return "bf16"
    return "fp32"


def _lineage(resolved, weights_text: str) -> list[dict]:
    items = []
    for i, r in enumerate(resolved):
        detail = {"weight": r.spec.weight, "ref": r.spec.ref}
        if r.spec.parts:
            detail["parts"] = r.spec.parts
        # short facts first (`lorahub show` prints the first few), the recipe text last
        detail.update({"index": i, "sha256": r.sha256})
        if r.entry is None:
            detail["path"] = str(Path(r.path).resolve())  # for --from when the ref was relative
        detail["recipe"] = weights_text
        items.append({"relation": "merged-from", "parent": r.parent, "detail": detail})
    return items


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
    base: Annotated[Optional[str], typer.Option("--base", help="Base family (sd1|sd2|sdxl) or, with --checkpoint, "
                                                 "the model to bake into (tiny-sd1, folder, .safetensors, registry ref).")] = None,
    checkpoint: Annotated[bool, typer.Option("--checkpoint", help="Bake into the --base model instead of "
                                              "writing a LoRA (output = \"checkpoint\").")] = False,
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the merged LoRA (registry and metadata).")] = None,
    dialect: Annotated[Optional[str], typer.Option("--dialect", help="kohya | diffusers | peft (default kohya).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp32 | fp16 | bf16 of the written LoRA "
                                                  "(default: the inputs' own).")] = None,
    register: Annotated[bool, typer.Option("--register", help="Add the result to the registry with its lineage.")] = False,
    from_id: Annotated[Optional[str], typer.Option("--from", help="Re-run the recipe stored with this merged entry.")] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Print the Frobenius retained of every layer.")] = False,
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
    reg = None
    stored_entry = None
    try:
        # ---- the recipe ---------------------------------------------------------------------------
        if from_id:
            if items:
                raise LorahubError("give either --from ID or a recipe / REF:WEIGHT list, not both")
            reg = open_registry(home)
            stored_entry, recipe, text, resolved = _stored_recipe(reg, from_id)
            if any(v is not None for v in (rank, method, base, dialect, dtype, name)) or checkpoint:
                raise LorahubError("--from re-runs the stored recipe as it is; options other than --out, "
                                   "--register, --json cannot change it")
        else:
            if not items:
                raise LorahubError("nothing to merge: give a recipe .toml, REF:WEIGHT items, or --from ID")
            if len(items) == 1 and items[0].lower().endswith(".toml"):
                recipe = rc.load_recipe(items[0])
                overrides = {k: v for k, v in (("rank", rank), ("method", method), ("base", base),
                                                 ("dialect", dialect), ("dtype", dtype), ("name", name)) if v is not None}
                if checkpoint:
                    overrides["output"] = "checkpoint"
                if overrides:
                    if "rank" in overrides and "method" not in overrides and recipe.method == "concat":
                        overrides["method"] = "svd"
                    for k, v in overrides.items():
                        setattr(recipe, k, v)
                    folder = recipe.folder
                    recipe = rc.parse_recipe(recipe.to_toml(), source=items[0], folder=folder)
                    text = recipe.to_toml()
                else:
                    text = Path(items[0]).read_text(encoding="utf-8")
            else:
                recipe = rc.inline_recipe(items, rank=rank, method=method, name=name, base=base,
                                          output="checkpoint" if checkpoint else "lora", dtype=dtype, dialect=dialect)
                text = recipe.to_toml()
            if register or rc.needs_registry(recipe) or (recipe.output == "checkpoint" and recipe.base
                                                         and recipe.family is None
                                                         and not Path(recipe.base).expanduser().exists()):
                reg = open_registry(home)
            resolved = rc.resolve_recipe(recipe, registry=reg)
        if register and reg is None:
            reg = open_registry(home)
        if out is None and not (register and recipe.output == "lora"):
            raise LorahubError("give --out (or --register to keep the merged LoRA only in the registry)")
        if out is not None and out.exists():
            raise LorahubError(f"{out}: already exists; choose a new output path")

        report = _run(recipe, text, resolved, out, reg, register, json_out, per_layer)
        if stored_entry is not None:
            report["rerun_of"] = {"id": stored_entry["id"], "name": stored_entry["name"],
                                  "identical": report.get("sha256") == stored_entry.get("sha256")}
            if not json_out:
                same = "identical to" if report["rerun_of"]["identical"] else "differs from"
                console().print(f"re-run {same} {stored_entry['name']} ({stored_entry['id']})")
        if json_out:
            print_json(report)
    finally:
        if reg is not None:
            reg.close()


def _run(recipe, text, resolved, out, reg, register, json_out, per_layer) -> dict:
    import torch

    from lorahub.errors import LorahubError
    from lorahub.formats.io import load_lora, save_lora
    from lorahub.ops import merge as mg

    models = []
    inputs = []
    for r in resolved:
        try:
            model = load_lora(r.path)
        except LorahubError as exc:
            raise LorahubError(f"{r.spec.ref}: {exc}") from None
        if r.entry and model.base == "unknown" and r.entry.get("base") not in (None, "unknown"):
            model.base = r.entry["base"]
        models.append(model)
        inputs.append(mg.MergeInput(model, r.spec.weight, r.spec.parts, label=r.label))

    report: dict = {"name": recipe.name, "output": recipe.output,
                    "inputs": [{"ref": r.spec.ref, "weight": r.spec.weight, "sha256": r.sha256,
                                "entry": r.entry["id"] if r.entry else None, "parts": r.spec.parts}
                               for r in resolved]}
    n_keys = len({k for m in models for k in m.layers})
    notes = [f"{r.label}: its bundled embedding(s) {', '.join(sorted(m.embeddings))} are not carried into the "
             "merge (load them separately)" for r, m in zip(resolved, models) if m.embeddings]
    if notes:
        report["notes"] = notes
        if not json_out:
            for n in notes:
                console(stderr=True).print(f"note: {n}")
    # every refusal before any progress bar, so that it stays one line
    if recipe.output == "checkpoint":
        mg.validate(inputs, method="concat", base=recipe.family)
    else:
        mg.validate(inputs, method=recipe.method, rank=recipe.rank, base=recipe.family)

    if recipe.output == "checkpoint":
        from lorahub.ops import bake as bk
        from lorahub.ops import checkpoints
        from lorahub.ops.models import resolve_model_ref

        base_path = resolve_model_ref(recipe.base, reg)
        if register and base_path.is_dir():
            raise LorahubError("--register needs a single-file checkpoint; the base is a diffusers folder, "
                               "so the baked model would be a folder")
        with checkpoints.open_checkpoint(base_path) as ck:
            fam = ck.family
        mg.check_families(inputs, fam if fam != "unknown" else recipe.family)
        res = mg.merge(inputs, method="concat", base=fam if fam != "unknown" else recipe.family)
        bk.check(base_path, res.model, out)
        with progress() as bar:
            task = bar.add_task("baking", total=len(res.model.layers))
            rep = bk.bake(base_path, res.model, out, recipe_text=text,
                          on_tensor=lambda _n: bar.advance(task))
        report.update({"out": str(out), "base": str(base_path), **rep.to_dict()})
        if register:
            if not out.is_file():
                raise LorahubError("--register needs a single-file checkpoint (the baked model is a folder)")
            entry, created = reg.add_file(out, name=recipe.name, base=fam if fam != "unknown" else None,
                                          lineage=_lineage(resolved, text), source="lorahub merge")
            report.update({"entry": entry["id"], "sha256": entry["sha256"], "created": created})
        if not json_out:
            console().print(f"baked {rep.layers} weights into {out} ({rep.layout}, "
                            f"{', '.join(f'{k}×{v}' for k, v in rep.dtypes.items())})")
        return report

    dt_name = recipe.dtype or _storage_dtype(models)
    out_dtype = getattr(torch, _DTYPES[dt_name])
    with progress() as bar:
        task = bar.add_task(f"merging ({recipe.method})", total=n_keys)
        res = mg.merge(inputs, method=recipe.method, rank=recipe.rank, out_dtype=out_dtype,
                       base=recipe.family, on_layer=lambda _k: bar.advance(task))
    summ = res.summary()
    merged = res.model
    merged.metadata = {
        "lorahub.recipe": text,
        "lorahub.merge": json.dumps({"method": recipe.method, "rank": recipe.rank, "retained": round(summ["retained"], 6),
                                     "inputs": [{"ref": r.spec.ref, "weight": r.spec.weight, "sha256": r.sha256}
                                                for r in resolved]}, separators=(",", ":")),
        "modelspec.merged_from": ", ".join(r.label for r in resolved),
    }
    if recipe.name:
        merged.metadata["modelspec.title"] = recipe.name
    dialect = recipe.dialect or "kohya"
    tmpdir = None
    target = out
    if target is None:
        tmpdir = tempfile.mkdtemp(prefix=".lorahub-merge-")
        target = Path(tmpdir) / f"{recipe.name or 'merged'}.safetensors"
    try:
        save_lora(merged, target, dialect=dialect, dtype=out_dtype)
        report.update({"out": str(out) if out else None, "dialect": dialect, "dtype": dt_name,
                       "base": merged.base, **summ})
        if register:
            entry, created = reg.add_file(target, name=recipe.name, base=merged.base if merged.base != "unknown" else None,
                                          lineage=_lineage(resolved, text), source="lorahub merge")
            if not created and not any(r.get("relation") == "merged-from" for r in reg.lineage(entry["id"])):
                reg.add_lineage(entry["id"], _lineage(resolved, text))
            report.update({"entry": entry["id"], "entry_name": entry["name"], "sha256": entry["sha256"],
                           "created": created})
        else:
            from lorahub.ops.recipe import file_sha256

            report["sha256"] = file_sha256(target)
    finally:
        if tmpdir:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)
    if per_layer or json_out:
        report["per_layer"] = [r.to_dict() for r in res.layers]
    if not json_out:
        _print_report(report, res, per_layer)
    return report


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
