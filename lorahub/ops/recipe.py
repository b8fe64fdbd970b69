"""Merge recipes: a TOML file (or the inline ``A:0.8 B:0.6`` form) naming LoRAs, weights and a method.

```toml
name = "miku-arcane"
base = "sd1"            # family (sd1|sd2|sdxl), or a model: tiny-sd1, a diffusers folder, a .safetensors
                        # checkpoint, a registry reference (required for output = "checkpoint")
output = "lora"         # "lora" (a new LoRA) or "checkpoint" (baked into the base model)
rank = 64               # svd: rank after merge
method = "svd"          # "svd" | "concat" | "sum"
[[lora]]
ref = "miku"            # registry id, name, hash prefix, or path
weight = 0.8
[[lora]]
ref = "arcane-style"
weight = 0.6
parts = ["unet"]        # optional: only these parts / layer patterns
```

Parsing is strict: unknown keys are named, weights must be numbers, refs must resolve. This module
imports only the standard library (plus the registry lazily).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.errors import LorahubError
from lorahub.outputs import Written
from lorahub.refs import LoraRef
from lorahub.vocab import DIALECTS, DTYPES, FAMILIES, TINY_MODELS

TOP_KEYS = ("name", "base", "output", "rank", "method", "dtype", "dialect", "description", "lora")
LORA_KEYS = ("ref", "weight", "parts")
OUTPUTS = ("lora", "checkpoint")
METHODS = ("svd", "concat", "sum")


@dataclass
class RecipeLora:
    """One LoRA of a recipe: a reference (registry id, name, hash prefix or path), its weight (any
    real number) and an optional filter (part names or layer patterns)."""

    ref: str
    weight: float = 1.0
    parts: list[str] | None = None


@dataclass
class Recipe:
    """A merge: which LoRAs with which weights, how (``method``: svd to ``rank`` | concat | sum), and
    into what (``output`` "lora", or "checkpoint": baked into the model ``base``).

    ``method`` None means svd with a rank, else concat. Build one directly, with :func:`load_recipe`
    (a TOML file), :func:`parse_recipe` (TOML text) or :func:`inline_recipe` (``A:0.8 B:0.6``);
    :func:`merge_recipe` validates it like a file before running it.
    """

    loras: list[RecipeLora]
    name: str | None = None
    base: str | None = None
    output: str = "lora"
    rank: int | None = None
    method: str | None = None
    dtype: str | None = None
    dialect: str | None = None
    description: str | None = None
    source: str = "recipe"  # where it came from, for messages
    folder: Path | None = None  # folder of the recipe file (relative refs)
    text: str | None = None  # the TOML it was parsed from (a file's own text, comments kept)

    def to_toml(self) -> str:
        """The recipe as TOML text (parses back to the same recipe)."""
        import tomli_w

        data = {k: getattr(self, k) for k in ("name", "base", "output", "rank", "method", "dtype", "dialect",
                                              "description") if getattr(self, k) is not None}
        data["lora"] = [{"ref": lo.ref, "weight": float(lo.weight), **({"parts": list(lo.parts)} if lo.parts else {})}
                        for lo in self.loras]
        return tomli_w.dumps(data)

    @property
    def family(self) -> str | None:
        """The base family named by ``base`` when it is one (sd1|sd2|sdxl|tiny-sd1|tiny-sdxl), else None."""
        if self.base in FAMILIES:
            return self.base
        return TINY_MODELS.get(self.base)

    def validated(self) -> "Recipe":
        """This recipe checked like a file (one clear error), with ``text`` and ``method`` filled in."""
        if self.text is not None:
            return self
        return parse_recipe(self.to_toml(), source=self.source, folder=self.folder)

    def replace(self, **changes) -> "Recipe":
        """A validated copy with ``changes`` (recipe fields); a ``rank`` given without a ``method``
        turns a concat recipe into an svd one. Unchanged, the recipe keeps its own text."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self.validated()
        if "rank" in changes and "method" not in changes and self.method == "concat":
            changes["method"] = "svd"
        new = dataclasses.replace(self, text=None, **changes)
        return parse_recipe(new.to_toml(), source=self.source, folder=self.folder)


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LorahubError(f"{where}: weight must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise LorahubError(f"{where}: weight must be a finite number, got {value!r}")
    return v


def _unknown(keys, allowed, where: str) -> None:
    bad = [k for k in keys if k not in allowed]
    if bad:
        raise LorahubError(f"{where}: unknown key{'s' if len(bad) > 1 else ''} "
                           f"{', '.join(repr(k) for k in bad)} (allowed: {', '.join(allowed)})")


def _choice(value, choices, what: str, where: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise LorahubError(f"{where}: {what} must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_recipe(text: str, *, source: str = "recipe", folder: Path | None = None) -> Recipe:
    """Parse and validate recipe TOML text. Raises LorahubError with one clear line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LorahubError(f"{source}: not valid TOML ({exc})") from None
    _unknown(data.keys(), TOP_KEYS, source)
    loras_raw = data.get("lora")
    if loras_raw is None:
        raise LorahubError(f"{source}: no [[lora]] entries")
    if not isinstance(loras_raw, list) or not all(isinstance(x, dict) for x in loras_raw):
        raise LorahubError(f"{source}: 'lora' must be an array of tables ([[lora]] sections)")
    if not loras_raw:
        raise LorahubError(f"{source}: no [[lora]] entries")
    loras = []
    for i, item in enumerate(loras_raw, 1):
        where = f"{source}: lora #{i}"
        _unknown(item.keys(), LORA_KEYS, where)
        ref = item.get("ref")
        if not isinstance(ref, str) or not ref.strip():
            raise LorahubError(f"{where}: 'ref' (registry id, name, hash prefix or path) is required")
        where = f"{source}: lora #{i} ({ref})"
        weight = _number(item.get("weight", 1.0), where)
        parts = item.get("parts")
        if parts is not None:
            if isinstance(parts, str):
                parts = [parts]
            if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p for p in parts):
                raise LorahubError(f"{where}: 'parts' must be a list of part names or layer patterns")
        loras.append(RecipeLora(ref=ref.strip(), weight=weight, parts=parts))

    for key in ("name", "base", "description"):
        if key in data and not isinstance(data[key], str):
            raise LorahubError(f"{source}: {key} must be a string, got {data[key]!r}")
    output = _choice(data.get("output", "lora"), OUTPUTS, "output", source)
    rank = data.get("rank")
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LorahubError(f"{source}: rank must be a positive integer, got {rank!r}")
    method = data.get("method")
    if method is None:
        method = "svd" if rank is not None else "concat"
    method = _choice(method, METHODS, "method", source)
    if method == "svd" and rank is None and output == "lora":
        raise LorahubError(f"{source}: method 'svd' needs a rank (e.g. rank = 64)")
    dtype = data.get("dtype")
    if dtype is not None:
        dtype = _choice(dtype, DTYPES, "dtype", source)
    dialect = data.get("dialect")
    if dialect is not None:
        dialect = _choice(dialect, DIALECTS, "dialect", source)
    if output == "checkpoint" and not data.get("base"):
        raise LorahubError(f"{source}: output = \"checkpoint\" needs base = <model> "
                           "(tiny-sd1, a diffusers folder, a .safetensors checkpoint or a registry reference)")
    return Recipe(loras=loras, name=data.get("name"), base=data.get("base"), output=output, rank=rank,
                  method=method, dtype=dtype, dialect=dialect, description=data.get("description"),
                  source=source, folder=folder, text=text)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file (relative refs are resolved from its folder)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorahubError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LorahubError(f"{path}: cannot read the recipe ({exc})") from None
    return parse_recipe(text, source=str(path), folder=p.resolve().parent)


def parse_inline(spec: str) -> RecipeLora:
    """``REF:WEIGHT``, ``REF`` (weight 1) or a pasted webui token ``<lora:NAME:WEIGHT>`` /
    ``<lyco:NAME:WEIGHT>`` (:func:`lorahub.refs.parse_weighted`)."""
    from lorahub.refs import parse_weighted

    w = parse_weighted(spec)
    return RecipeLora(ref=w.ref, weight=w.weight)


def inline_recipe(specs: list[str], *, rank: int | None = None, method: str | None = None,
                  name: str | None = None, base: str | None = None, output: str = "lora",
                  dtype: str | None = None, dialect: str | None = None) -> Recipe:
    """A recipe from the inline form ``["A:0.8", "B:0.6"]`` (see :func:`parse_inline`), validated like a file."""
    r = Recipe(loras=[parse_inline(s) for s in specs], name=name, base=base, output=output, rank=rank,
               method=method, dtype=dtype, dialect=dialect)
    return parse_recipe(r.to_toml(), source="command line", folder=Path.cwd())




# --------------------------------------------------------------------------------------------------
# Resolving refs


@dataclass
class ResolvedLora:
    """A recipe entry and the file its reference resolved to (:func:`lorahub.refs.resolve_lora`)."""

    spec: RecipeLora
    lora: LoraRef

    @property
    def path(self) -> Path:
        return self.lora.path

    @property
    def entry(self) -> dict | None:
        return self.lora.entry

    @property
    def sha256(self) -> str:
        return self.lora.sha256

    @property
    def parent(self) -> str:
        return self.lora.parent

    @property
    def label(self) -> str:
        return self.lora.name


def resolve_lora(spec: RecipeLora, *, registry=None, folder: Path | None = None, where: str = "") -> ResolvedLora:
    """A path (relative to the recipe's folder, then the current one) or a registry reference; a file
    that is registered gets its entry when the registry is open."""
    from lorahub.refs import resolve_lora as resolve

    try:
        return ResolvedLora(spec, resolve(spec.ref, registry, folder=folder, match_registered=True))
    except LorahubError as exc:
        raise LorahubError(f"{where}ref {spec.ref!r} does not resolve: {exc}") from None


def resolve_recipe(recipe: Recipe, *, registry=None) -> list[ResolvedLora]:
    """Every LoRA of ``recipe``, resolved. ``registry``: a Registry, a LazyRegistry, a home folder or
    None (the default home). When some reference needs the registry it is opened first, so that files
    that are registered are recorded as their entries."""
    from lorahub.refs import LazyRegistry, needs_registry

    with LazyRegistry.using(registry) as regs:
        needing = [(i, lo) for i, lo in enumerate(recipe.loras, 1) if needs_registry(lo.ref, folder=recipe.folder)]
        if needing:
            try:
                regs.get(create=False)
            except LorahubError as exc:
                i, lo = needing[0]
                raise LorahubError(f"{recipe.source}: lora #{i}: ref {lo.ref!r} does not resolve: {exc}") from None
        return [resolve_lora(lo, registry=regs, folder=recipe.folder, where=f"{recipe.source}: lora #{i}: ")
                for i, lo in enumerate(recipe.loras, 1)]


def stored_recipe(registry, ref: str) -> tuple[dict, Recipe, list[ResolvedLora]]:
    """(entry, recipe, resolved inputs) of the merged entry ``ref``, from its lineage: each input is
    the recorded parent entry (or the entry with the recorded sha256), else the recipe's reference (a
    file by its name, from the current folder) -- and must be the same bytes as when it was merged."""
    from lorahub.refs import LoraRef

    entry = registry.resolve(ref)
    rows = [r for r in registry.lineage(entry["id"]) if r.get("relation") == "merged-from"]
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
        row = by_index.get(i) or {}
        detail = row.get("detail") or {}
        want = row.get("parent_sha256") or detail.get("sha256")
        parent = None
        if row.get("parent_id"):
            try:
                parent = registry.get(row["parent_id"])
            except LorahubError:
                parent = None
        if parent is None and want:
            parent = registry.find_sha256(want)
        if parent is not None:
            resolved.append(ResolvedLora(lo, LoraRef(lo.ref, registry.blob_path(parent), parent,
                                                     list(parent.get("triggers") or []))))
            continue
        # not registered: the recipe's reference (a file is recorded by its name, see public_ref)
        try:
            r = resolve_lora(lo, registry=registry, where=f"{recipe.source}: lora #{i + 1}: ")
        except LorahubError as exc:
            raise LorahubError(f"{exc} (an input that is not registered is looked for by its file name in the "
                               "current folder; register it to re-run from anywhere)") from None
        if want and r.sha256 != want:
            raise LorahubError(f"{recipe.source}: lora #{i + 1} ({lo.ref}) now resolves to a different file "
                               f"(sha256 {r.sha256[:12]}, the merge used {want[:12]})")
        resolved.append(r)
    return entry, recipe, resolved


# --------------------------------------------------------------------------------------------------
# Running a recipe


@dataclass
class RecipeResult(Written):
    """What :func:`merge_recipe` made.

    A LoRA (``recipe.output == "lora"``): ``merge`` (per-layer report, see
    :class:`lorahub.ops.merge.MergeResult`), ``dialect`` and ``dtype`` of the file. A checkpoint:
    ``bake`` (:class:`lorahub.ops.bake.BakeReport`). ``out`` is None for a LoRA kept only in the
    registry; ``entry`` / ``created`` when registered; ``rerun_of`` the merged entry a
    :func:`rerun_recipe` reproduced.
    """

    recipe: Recipe
    inputs: list[ResolvedLora]
    sha256: str | None = None
    base: str = "unknown"              # family of a merged LoRA; the model path of a baked checkpoint
    merge: object | None = None        # MergeResult
    bake: object | None = None         # BakeReport
    dtype: str | None = None
    notes: list[str] = field(default_factory=list)
    rerun_of: dict | None = None

    @property
    def identical(self) -> bool | None:
        """For a re-run: whether it reproduced the merged entry's bytes."""
        return None if self.rerun_of is None else self.sha256 == self.rerun_of.get("sha256")

    def to_dict(self) -> dict:
        d: dict = {"name": self.recipe.name, "output": self.recipe.output,
                   "inputs": [{"ref": r.spec.ref, "weight": r.spec.weight, "sha256": r.sha256,
                               "entry": r.entry["id"] if r.entry else None, "parts": r.spec.parts}
                              for r in self.inputs]}
        if self.notes:
            d["notes"] = self.notes
        d["out"] = str(self.out) if self.out else None
        if self.bake is not None:
            d.update({"base": self.base, **self.bake.to_dict()})
            if self.entry is not None:
                d.update({"entry": self.entry["id"], "sha256": self.sha256, "created": self.created})
        else:
            d.update({"dialect": self.dialect, "dtype": self.dtype, "base": self.base, **self.merge.summary()})
            if self.entry is not None:
                d.update({"entry": self.entry["id"], "entry_name": self.entry["name"], "sha256": self.sha256,
                          "created": self.created})
            else:
                d["sha256"] = self.sha256
            d["per_layer"] = [r.to_dict() for r in self.merge.layers]
        if self.rerun_of is not None:
            d["rerun_of"] = {"id": self.rerun_of["id"], "name": self.rerun_of["name"], "identical": self.identical}
        return d


def merge_recipe(recipe: Recipe | str | os.PathLike, *, out: str | os.PathLike | None = None,
                 register: bool = False, force: bool = False, registry=None, on_layer=None) -> RecipeResult:
    """Run a merge recipe: write the merged LoRA (or the checkpoint baked with it) to ``out``.

    ``recipe``: a :class:`Recipe`, or the path of a recipe TOML file. ``out``: the output file (a
    folder for a checkpoint baked into a diffusers folder); a LoRA may omit it when ``register`` keeps it
    in the registry only. ``register`` adds the result to the registry with one ``merged-from`` lineage
    row per input (the recipe text included, so :func:`rerun_recipe` can repeat it).
    ``on_layer(i, n, key)`` reports progress.
    """
    from lorahub.refs import LazyRegistry

    recipe = load_recipe(recipe) if isinstance(recipe, (str, os.PathLike)) else recipe.validated()
    with LazyRegistry.using(registry) as regs:
        if register:
            regs.get()
        return _run(recipe, resolve_recipe(recipe, registry=regs), regs, out=out, register=register, force=force,
                    on_layer=on_layer)


def bake_loras(base: str | os.PathLike, loras: list, *, out: str | os.PathLike, name: str | None = None,
               register: bool = False, force: bool = False, registry=None, on_layer=None) -> RecipeResult:
    """Bake LoRAs into the model ``base`` (see :func:`lorahub.refs.resolve_model`): W = W0 + Σ wᵢ·ΔWᵢ,
    written to ``out`` in the base's own layout (a diffusers folder -> a folder, a single file -> a
    .safetensors file). ``loras``: :class:`RecipeLora` items, ``(ref, weight)`` pairs or references
    (weight 1). ``register`` (single-file bases only) adds the baked checkpoint to the registry."""
    items = [x if isinstance(x, RecipeLora) else RecipeLora(str(x), 1.0) if isinstance(x, (str, os.PathLike))
             else RecipeLora(str(x[0]), float(x[1])) for x in loras]
    recipe = Recipe(loras=items, name=name, base=str(base), output="checkpoint", source="bake", folder=Path.cwd())
    return merge_recipe(recipe, out=out, register=register, force=force, registry=registry, on_layer=on_layer)


def rerun_recipe(ref: str, *, out: str | os.PathLike | None = None, register: bool = False, force: bool = False,
                 registry=None, on_layer=None) -> RecipeResult:
    """Run again the recipe stored with the merged registry entry ``ref``, on the same inputs (see
    :func:`stored_recipe`); ``result.identical`` tells whether the same bytes came out."""
    from lorahub.refs import LazyRegistry

    with LazyRegistry.using(registry) as regs:
        entry, recipe, resolved = stored_recipe(regs.get(), ref)
        res = _run(recipe, resolved, regs, out=out, register=register, force=force, on_layer=on_layer)
    res.rerun_of = entry
    return res


def _run(recipe: Recipe, resolved: list[ResolvedLora], regs, *, out, register: bool, force: bool,
         on_layer) -> RecipeResult:
    from lorahub.formats.io import load_lora
    from lorahub.ops import merge as mg
    from lorahub.outputs import check_output

    if out is None and not (register and recipe.output == "lora"):
        raise LorahubError("no output path: a merged checkpoint is always written to a file or folder, a "
                           "merged LoRA unless it is registered")
    if out is not None:
        out = check_output(out, force=force, inputs=[r.path for r in resolved], folder=None)
    res = RecipeResult(recipe=recipe, inputs=resolved, out=out)
    models, inputs = [], []
    for r in resolved:
        try:
            model = load_lora(r.path)
        except LorahubError as exc:
            raise LorahubError(f"{r.spec.ref}: {exc}") from None
        if r.entry and model.base == "unknown" and r.entry.get("base") not in (None, "unknown"):
            model.base = r.entry["base"]
        models.append(model)
        inputs.append(mg.MergeInput(model, r.spec.weight, r.spec.parts, label=r.label))
        if model.embeddings:
            res.notes.append(f"{r.label}: its bundled embedding(s) {', '.join(sorted(model.embeddings))} are not "
                             "carried into the merge (load them separately)")
    if recipe.output == "checkpoint":
        _bake(res, inputs, regs, register=register, force=force, on_layer=on_layer)
    else:
        _merge_lora(res, inputs, models, regs, register=register, on_layer=on_layer)
    return res


def _lineage(res: RecipeResult) -> list:
    from lorahub.lineage import Parent

    parents = []
    for i, r in enumerate(res.inputs):
        detail = {"weight": r.spec.weight, "ref": public_ref(r.spec.ref)}
        if r.spec.parts:
            detail["parts"] = r.spec.parts
        # short facts first (`lorahub show` prints the first few), the recipe text (shared) last.
        # No local path: lineage details reach model cards; a re-run finds the input by its sha256.
        detail.update({"index": i, "sha256": r.sha256})
        parents.append(Parent(r.parent, detail))
    return parents


def public_ref(ref: str) -> str:
    """A reference as it may leave this machine (file metadata, lineage, model cards): a file or
    folder path becomes its name; registry references (ids, names, hash prefixes) are kept."""
    from lorahub.vocab import looks_like_path

    if looks_like_path(ref) or Path(ref).expanduser().is_absolute():
        return Path(ref.replace("\\", "/")).name or ref
    return ref


def public_text(recipe: Recipe) -> str:
    """The recipe's TOML as it may leave this machine: its own text when no reference (nor the base)
    is a path, else the recipe re-written with :func:`public_ref` names."""
    refs = [lo.ref for lo in recipe.loras] + ([recipe.base] if recipe.base else [])
    if all(public_ref(r) == r for r in refs):
        return recipe.text or recipe.to_toml()
    loras = [RecipeLora(ref=public_ref(lo.ref), weight=lo.weight, parts=lo.parts) for lo in recipe.loras]
    return dataclasses.replace(recipe, loras=loras, base=public_ref(recipe.base) if recipe.base else None,
                               text=None).to_toml()


def _register(res: RecipeResult, regs, path: Path, base: str | None) -> None:
    from lorahub.lineage import register_derived

    res.entry, res.created = register_derived(regs.get(), path, relation="merged-from", parents=_lineage(res),
                                              detail={"recipe": public_text(res.recipe)}, name=res.recipe.name,
                                              base=base, source="lorahub merge")
    res.sha256 = res.entry["sha256"]


# fields that describe one input file, never a merge of several (besides those kohya.derived_metadata recomputes)
PER_FILE = ("ss_output_name", "ss_session_id", "ss_training_comment", "modelspec.date", "modelspec.description",
            "modelspec.thumbnail", "modelspec.trigger_phrase", "modelspec.usage_hint", "modelspec.tags",
            "ssmd_cover_images", "ssmd_display_name", "ssmd_description", "ssmd_keywords", "ssmd_version")


def shared_metadata(metadatas: list[dict[str, str]]) -> dict[str, str]:
    """The training metadata every input of a merge agrees on (same key, same value: the base model,
    clip skip, resolution, ...), which therefore still describes the merged file; lorahub's own records
    and per-file fields (:data:`PER_FILE`) excluded. Model paths are reduced to file names."""
    from lorahub.ops.resize import kept_metadata

    if not metadatas:
        return {}
    first = kept_metadata(metadatas[0])
    others = [kept_metadata(m) for m in metadatas[1:]]
    return {k: v for k, v in first.items()
            if not k.startswith("lorahub") and k not in PER_FILE and all(o.get(k) == v for o in others)}


def _bake(res: RecipeResult, inputs: list, regs, *, register: bool, force: bool, on_layer) -> None:
    from lorahub.ops import bake as bk
    from lorahub.ops import checkpoints
    from lorahub.ops import merge as mg
    from lorahub.refs import resolve_model

    recipe = res.recipe
    mg.validate(inputs, method="concat", base=recipe.family)  # every refusal before any work
    base = resolve_model(recipe.base, regs).path
    if register and base.is_dir():
        raise LorahubError("registering needs a single-file checkpoint; the base is a diffusers folder, so the "
                           "baked model would be a folder")
    with checkpoints.open_checkpoint(base) as ck:
        fam = ck.family if ck.family != "unknown" else recipe.family
    mg.check_families(inputs, fam)
    merged = mg.merge(inputs, method="concat", base=fam).model
    bk.check(base, merged, res.out, force=force)
    n = len(merged.layers)
    done = iter(range(1, n + 1))
    res.bake = bk.bake(base, merged, res.out, recipe_text=public_text(recipe), force=force,
                       on_tensor=(lambda name: on_layer(next(done), n, name)) if on_layer else None)
    res.base = str(base)
    if register:
        _register(res, regs, res.out, fam)


def _merge_lora(res: RecipeResult, inputs: list, models: list, regs, *, register: bool, on_layer) -> None:
    import shutil
    import tempfile

    from lorahub.formats import kohya
    from lorahub.formats.io import dtype_name, parse_dtype, save_lora
    from lorahub.formats.names import default_dialect
    from lorahub.hashing import sha256_file
    from lorahub.ops import merge as mg

    recipe = res.recipe
    _, terms = mg.validate(inputs, method=recipe.method, rank=recipe.rank, base=recipe.family)
    firsts = {next(iter(layer.weights.values())).dtype for m in models for layer in list(m.layers.values())[:1]}
    res.dtype = recipe.dtype or (dtype_name(firsts.pop()) if len(firsts) == 1 else "fp32")
    out_dtype = parse_dtype(res.dtype)
    n = len(terms)  # the layers merge reports (Flux/SD3 svd: fused q/k/v count once)
    done = iter(range(1, n + 1))
    merged = mg.merge(inputs, method=recipe.method, rank=recipe.rank, out_dtype=out_dtype, base=recipe.family,
                      on_layer=(lambda key: on_layer(next(done), n, key)) if on_layer else None)
    res.merge = merged
    summ = merged.summary()
    model = merged.model
    # kohya's build_merged_from: each input's modelspec.title, else its name (stable across re-runs)
    merged_from = ", ".join(m.metadata.get("modelspec.title") or Path(public_ref(r.spec.ref)).stem
                            for m, r in zip(models, res.inputs))
    # what kohya's svd_merge_lora.py / merge_lora.py write, the inputs' shared training metadata, the operation
    # kohya's svd_merge_lora.py titles the result by its output file's name
    title = recipe.name or (Path(res.out).stem if res.out is not None else f"merge of {merged_from}")
    model.metadata = kohya.derived_metadata(model, title=title,
                                            inherited=shared_metadata([m.metadata for m in models]),
                                            merged_from=merged_from)
    model.metadata.update({
        "lorahub.recipe": public_text(recipe),
        "lorahub.merge": json.dumps({"method": recipe.method, "rank": recipe.rank, "retained": round(summ["retained"], 6),
                                     "inputs": [{"ref": public_ref(r.spec.ref), "weight": r.spec.weight,
                                                 "sha256": r.sha256} for r in res.inputs]}, separators=(",", ":")),
    })
    res.dialect = recipe.dialect or default_dialect(model)
    res.base = model.base
    tmpdir = None
    target = res.out
    if target is None:
        from lorahub.outputs import default_output

        tmpdir = tempfile.mkdtemp(prefix=".lorahub-merge-")
        target = default_output(recipe.name or "merged", ".safetensors", tmpdir)
    try:
        save_lora(model, target, dialect=res.dialect, dtype=out_dtype)
        if register:
            _register(res, regs, target, model.base)
        else:
            res.sha256 = sha256_file(target)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
