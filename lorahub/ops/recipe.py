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
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lorahub.errors import LorahubError

TOP_KEYS = ("name", "base", "output", "rank", "method", "dtype", "dialect", "description", "lora")
LORA_KEYS = ("ref", "weight", "parts")
OUTPUTS = ("lora", "checkpoint")
METHODS = ("svd", "concat", "sum")
DTYPES = ("fp32", "fp16", "bf16")
DIALECTS = ("kohya", "diffusers", "peft")
FAMILIES = ("sd1", "sd2", "sdxl")
PART_NAMES = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class RecipeLora:
    ref: str
    weight: float = 1.0
    parts: list[str] | None = None


@dataclass
class Recipe:
    loras: list[RecipeLora]
    name: str | None = None
    base: str | None = None
    output: str = "lora"
    rank: int | None = None
    method: str = "svd"
    dtype: str | None = None
    dialect: str | None = None
    description: str | None = None
    source: str = "recipe"  # where it came from, for messages
    folder: Path | None = None  # folder of the recipe file (relative refs)

    def to_toml(self) -> str:
        """The recipe as TOML text (what is stored with a merge; parses back to the same recipe)."""
        lines = []
        for key in ("name", "base", "output", "rank", "method", "dtype", "dialect", "description"):
            val = getattr(self, key)
            if val is None:
                continue
            lines.append(f"{key} = {_toml_value(val)}")
        for lo in self.loras:
            lines.append("")
            lines.append("[[lora]]")
            lines.append(f"ref = {_toml_value(lo.ref)}")
            lines.append(f"weight = {_toml_value(float(lo.weight))}")
            if lo.parts:
                lines.append(f"parts = [{', '.join(_toml_value(p) for p in lo.parts)}]")
        return "\n".join(lines) + "\n"

    @property
    def family(self) -> str | None:
        """The base family named by ``base`` when it is one (sd1|sd2|sdxl|tiny-sd1|tiny-sdxl), else None."""
        if self.base in FAMILIES:
            return self.base
        if self.base in ("tiny-sd1", "tiny-sdxl"):
            return self.base.split("-", 1)[1]
        return None


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a valid TOML basic string


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
                  source=source, folder=folder)


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LorahubError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LorahubError(f"{path}: cannot read the recipe ({exc})") from None
    return parse_recipe(text, source=str(path), folder=p.resolve().parent)


def parse_inline(spec: str) -> RecipeLora:
    """``REF:WEIGHT`` (or just ``REF``, weight 1). The weight is after the last colon."""
    ref, sep, w = spec.rpartition(":")
    if not sep:
        return RecipeLora(ref=spec, weight=1.0)
    if not ref:
        raise LorahubError(f"{spec!r}: give REF:WEIGHT, e.g. miku:0.8")
    try:
        weight = float(w)
    except ValueError:
        if Path(spec).exists():  # a path that happens to contain a colon
            return RecipeLora(ref=spec, weight=1.0)
        raise LorahubError(f"{spec!r}: weight {w!r} is not a number") from None
    if not math.isfinite(weight):
        raise LorahubError(f"{spec!r}: weight {w!r} is not a finite number")
    return RecipeLora(ref=ref, weight=weight)


def inline_recipe(specs: list[str], *, rank: int | None = None, method: str | None = None,
                  name: str | None = None, base: str | None = None, output: str = "lora",
                  dtype: str | None = None, dialect: str | None = None) -> Recipe:
    """A recipe from the command line form ``A:0.8 B:0.6 --rank 64 --method svd``, validated like a file."""
    r = Recipe(loras=[parse_inline(s) for s in specs], name=name, base=base, output=output, rank=rank,
               method=method or ("svd" if rank is not None else "concat"), dtype=dtype, dialect=dialect)
    return parse_recipe(r.to_toml(), source="command line", folder=Path.cwd())


# --------------------------------------------------------------------------------------------------
# Resolving refs


@dataclass
class ResolvedLora:
    spec: RecipeLora
    path: Path
    sha256: str
    entry: dict | None = None  # registry entry when the ref named one (or the file is registered)
    label: str = ""

    @property
    def parent(self) -> str:
        """What the lineage records as the parent: the entry id, else the file's SHA-256."""
        return self.entry["id"] if self.entry else self.sha256


def file_sha256(path: Path) -> str:
    from lorahub.hashing import sha256_file

    return sha256_file(path)


def resolve_lora(spec: RecipeLora, *, registry=None, folder: Path | None = None, where: str = "") -> ResolvedLora:
    """A path (relative to the recipe's folder, then the current one) or a registry reference."""
    ref = spec.ref
    candidates = []
    p = Path(ref).expanduser()
    if not p.is_absolute() and folder is not None:
        candidates.append(folder / p)
    candidates.append(p)
    for c in candidates:
        if c.is_file():
            sha = file_sha256(c)
            entry = registry.find_sha256(sha) if registry is not None else None
            return ResolvedLora(spec, c, sha, entry, label=(entry or {}).get("name") or c.name)
        if c.exists():
            raise LorahubError(f"{where}ref {ref!r} is not a file")
    if registry is None:
        raise LorahubError(f"{where}ref {ref!r} does not resolve: no such file (and no registry to look in)")
    try:
        entry = registry.resolve(ref)
        path = registry.blob_path(entry)
    except LorahubError as exc:
        raise LorahubError(f"{where}ref {ref!r} does not resolve: {exc}") from None
    return ResolvedLora(spec, Path(path), entry["sha256"], entry, label=entry.get("name") or ref)


def resolve_recipe(recipe: Recipe, *, registry=None) -> list[ResolvedLora]:
    out = []
    for i, lo in enumerate(recipe.loras, 1):
        out.append(resolve_lora(lo, registry=registry, folder=recipe.folder,
                                where=f"{recipe.source}: lora #{i}: "))
    return out


def needs_registry(recipe: Recipe) -> bool:
    """True when some ref is not an existing file (so it must be a registry reference)."""
    for lo in recipe.loras:
        p = Path(lo.ref).expanduser()
        if not ((recipe.folder is not None and not p.is_absolute() and (recipe.folder / p).is_file())
                or p.is_file()):
            return True
    return False
