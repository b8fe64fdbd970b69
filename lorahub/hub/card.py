"""Model cards (README.md) for the Hugging Face Hub: written by us, read defensively.

The front matter follows what diffusers' training scripts write for LoRA repos (``base_model``,
``tags`` with ``lora``/``text-to-image``/``diffusers``/``template:sd-lora``, ``instance_prompt``,
``license``, ``widget`` and ``library_name: diffusers``), so the Hub shows a LoRA widget and search
filters find it. Only what is known is written: no ``instance_prompt`` without trigger words, no
``base_model`` or ``license`` for an entry of an unknown base, and ``license: other`` always comes with
its ``license_name``.

Cards written by lorahub also carry a ``lorahub:`` section (the *marker*): every file of the push with
its SHA-256 and role (``original``, ``converted`` copy of another file, ``embedding``, ``preview``), and
for each entry the fields the registry holds (name, type, triggers, tags, description, base, the
``extra`` fields of :data:`ENTRY_EXTRA`). A pull reads it back, so what lorahub pushed comes back as
the same entry, and a converted copy is never registered in place of its original.

Output is deterministic: the same entries give byte-identical cards.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from lorahub.errors import LorahubError
from lorahub.formats.families import check_base_model, from_text, is_base
from lorahub.vocab import KINDS, LORA_TYPES, OTHER_BASE

# Default base-model repo per family (what a card's `base_model` names when the entry doesn't say):
# each family's reference model (FLUX.1 LoRAs are trained on FLUX.1-dev; SD3's first release is medium).
BASE_MODEL_IDS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "flux": "black-forest-labs/FLUX.1-dev",
}
# The Hub repo of a base model inside a family (the registry's ``base_model`` column), when there is one.
BASE_MODEL_REPOS = {
    "flux-1-dev": "black-forest-labs/FLUX.1-dev", "flux-1-schnell": "black-forest-labs/FLUX.1-schnell",
    "flux-1-kontext": "black-forest-labs/FLUX.1-Kontext-dev", "flux-1-krea": "black-forest-labs/FLUX.1-Krea-dev",
    "flux-1-fill": "black-forest-labs/FLUX.1-Fill-dev",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large", "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo",
    "playground": "playgroundai/playground-v2.5-1024px-aesthetic",
}
LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++"}
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
                "sd3": "Stable Diffusion 3", "flux": "FLUX.1", "unknown": "an unknown Stable Diffusion base"}
# The Hub's filter tags per family (what diffusers' training scripts write), and the pipeline class
# the card's diffusers example loads; other:<name> families get DiffusionPipeline and no family tag.
FAMILY_TAGS = {"sd1": ("stable-diffusion", "stable-diffusion-diffusers"),
               "sd2": ("stable-diffusion", "stable-diffusion-diffusers"),
               "sdxl": ("stable-diffusion", "stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
               "sd3": ("sd3", "sd3-diffusers"), "flux": ("flux", "flux-diffusers"),
               "unknown": ("stable-diffusion", "stable-diffusion-diffusers")}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "unknown": "StableDiffusionPipeline"}

# Tags that say what a repo is for the Hub's filters, not what the LoRA depicts: not entry tags.
HUB_TAGS = {"text-to-image", "lora", "diffusers", "diffusers-training", "template:sd-lora",
            "textual_inversion", "textual-inversion", "safetensors", "region:us", "endpoints_compatible",
            *(t for tags in FAMILY_TAGS.values() for t in tags), *KINDS}
# Hub tags that mark a textual-inversion repo (diffusers' textual_inversion script writes the first).
TI_TAGS = ("textual_inversion", "textual-inversion")

# The entry ``extra`` fields a card carries (the rest is local: detection notes, sidecars, provenance).
# ``base_model``: the Hub id a card named. (The base model's short name, ``pony``, is the entry's
# ``base_model`` column, carried as the record's own field; cards before it carried ``base_model_name``.)
ENTRY_EXTRA = ("preferred_weight", "negative_text", "notes", "author", "civitai_base_model",
               "base_model", "license", "license_name", "license_link")
LEGACY_BASE_MODEL = "base_model_name"
# Preview ``params`` a card carries (what a sweep recorded; entry ids are local and left out).
PREVIEW_PARAMS = ("prompt", "prompts", "negative_prompt", "alphas", "recommended_alpha", "seed", "seeds",
                  "steps", "guidance")

MAX_CARD_BYTES = 1024 * 1024
MAX_YAML_NODES = 20000
MARKER_VERSION = 1
ROLES = ("original", "converted", "embedding", "preview")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def base_family(base_model: Any) -> str | None:
    """The family (sd1 / sd2 / sdxl / sd3 / flux / other:<name>) a card's ``base_model`` names (a repo id,
    or a list of them), read by :func:`lorahub.formats.families.from_text`."""
    ev = _base_evidence(base_model)
    return ev.base if ev is not None else None


def _base_evidence(base_model: Any):
    for b in base_model if isinstance(base_model, list) else [base_model]:
        ev = from_text(b, "card base_model") if isinstance(b, str) else None
        if ev is not None:
            return ev
    return None


def family_name(base: str) -> str:
    """A family as a card's prose names it (``FLUX.1``; ``qwen-image`` for other:qwen-image)."""
    return FAMILY_NAMES.get(base) or base.removeprefix(OTHER_BASE)


def entry_base_model(entry: dict) -> str | None:
    """The entry's base model inside its family (``pony``, ``flux-1-dev``): the registry's ``base_model``
    column, else the ``base_model_name`` an entry pulled from an older lorahub card keeps in ``extra``."""
    bm = entry.get("base_model") or (entry.get("extra") or {}).get(LEGACY_BASE_MODEL)
    if not isinstance(bm, str):
        return None
    try:
        return check_base_model(bm)
    except LorahubError:
        return None


# ---------------------------------------------------------------------------------------- reading
def split_front_matter(text: str) -> tuple[str | None, str]:
    """(YAML text or None, body) of a README."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.startswith("---"):
        return None, text
    m = re.match(r"^---[ \t]*\r?\n(.*?)(?:\r?\n)?^---[ \t]*(?:\r?\n|$)", text, re.S | re.M)
    if not m:
        raise LorahubError("model card front matter has no closing '---' line")
    return m.group(1), text[m.end():]


def _count_nodes(obj: Any, budget: list[int], depth: int = 0) -> None:
    budget[0] -= 1
    if budget[0] < 0 or depth > 20:
        raise LorahubError("model card front matter is too large or too deeply nested")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _count_nodes(k, budget, depth + 1)
            _count_nodes(v, budget, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _count_nodes(v, budget, depth + 1)


def parse_card(data: bytes, *, where: str = "README.md") -> dict:
    """The front matter of a model card as a dict ({} without one). Bad input -> LorahubError."""
    if len(data) > MAX_CARD_BYTES:
        raise LorahubError(f"{where}: model card is larger than {MAX_CARD_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise LorahubError(f"{where}: model card is not UTF-8 text") from None
    try:
        raw, _body = split_front_matter(text)
    except LorahubError as exc:
        raise LorahubError(f"{where}: {exc}") from None
    if raw is None or not raw.strip():
        return {}
    import yaml

    try:
        meta = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 2})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise LorahubError(f"{where}: model card front matter is not valid YAML{at}: {problem}") from None
    except RecursionError:
        raise LorahubError(f"{where}: model card front matter is nested too deeply") from None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise LorahubError(f"{where}: model card front matter is not a mapping")
    _count_nodes(meta, [MAX_YAML_NODES])
    return meta


def _text(value: Any, limit: int = 200) -> str | None:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        s = " ".join(str(value).split())[:limit]
        return s or None
    return None


def _str_list(value: Any, *, limit: int = 64) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        value = [value]
    if not isinstance(value, list):
        return []
    out = []
    for v in value:
        s = _text(v)
        if s and s not in out:
            out.append(s)
    return out[:limit]


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) < 1e6:
        return float(value)
    return None


@dataclass
class MarkedFile:
    """One file of a lorahub card's marker."""

    path: str
    role: str                       # original | converted | embedding | preview
    sha256: str | None = None
    from_sha256: str | None = None  # converted: the original's SHA-256; preview: its entry's
    dialect: str | None = None      # converted: the dialect it was written in
    entry: dict | None = None       # original / embedding: the entry's fields
    params: dict = field(default_factory=dict)  # preview: how it was made


def _clean_entry(raw: Any) -> dict | None:
    """An entry record of a marker, every field checked (cards are untrusted input)."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {}
    name = _text(raw.get("name"))
    if name:
        out["name"] = name
    if raw.get("type") in LORA_TYPES:
        out["type"] = raw["type"]
    if isinstance(raw.get("base"), str) and is_base(raw["base"]):
        out["base"] = raw["base"]
    if raw.get("kind") in KINDS:
        out["kind"] = raw["kind"]
    out["triggers"] = _str_list(raw.get("triggers"))
    out["tags"] = _str_list(raw.get("tags"))
    desc = raw.get("description")
    if isinstance(desc, str) and desc.strip():
        out["description"] = desc.strip()[:20000]
    extra = raw.get("extra")
    out["extra"] = {}
    bm = raw.get("base_model")
    if bm is None and isinstance(extra, dict):
        bm = extra.get(LEGACY_BASE_MODEL)   # cards written before the base_model field
    if isinstance(bm, str):
        try:
            out["base_model"] = check_base_model(bm)
        except LorahubError:
            pass
    if isinstance(extra, dict):
        for k in ENTRY_EXTRA:
            v = extra.get(k)
            if _number(v) is not None:
                out["extra"][k] = v
            elif isinstance(v, str) and v.strip():
                out["extra"][k] = v.strip()[:2000]
    return out


def _clean_params(raw: Any) -> dict:
    out = {}
    if isinstance(raw, dict):
        for k in PREVIEW_PARAMS:
            v = raw.get(k)
            if _number(v) is not None or (isinstance(v, str) and len(v) <= 2000):
                out[k] = v
            elif isinstance(v, list) and len(v) <= 64 and all(
                    _number(x) is not None or (isinstance(x, str) and len(x) <= 2000) for x in v):
                out[k] = list(v)
    return out


def read_marker(meta: dict, text: str = "") -> dict[str, MarkedFile]:
    """The files a lorahub card describes, by path ({} for other cards). Reads the ``lorahub:``
    section, and the ``lorahub-converted`` comment that cards of earlier versions carry."""
    out: dict[str, MarkedFile] = {}
    sec = meta.get("lorahub") if isinstance(meta, dict) else None
    files = sec.get("files") if isinstance(sec, dict) else None
    for item in files if isinstance(files, list) else []:
        if not isinstance(item, dict) or item.get("role") not in ROLES:
            continue
        path = item.get("path")
        if not isinstance(path, str) or not path or len(path) > 500 or path in out:
            continue
        sha = item.get("sha256") if isinstance(item.get("sha256"), str) and _SHA256.fullmatch(item["sha256"]) \
            else None
        frm = item.get("from_sha256") if isinstance(item.get("from_sha256"), str) \
            and _SHA256.fullmatch(item["from_sha256"]) else None
        mf = MarkedFile(path=path, role=item["role"], sha256=sha, from_sha256=frm,
                        dialect=_text(item.get("dialect"), 32))
        if mf.role in ("original", "embedding"):
            mf.entry = _clean_entry(item.get("entry"))
        if mf.role == "preview":
            mf.params = _clean_params(item.get("params"))
        out[path] = mf
    m = re.search(r"<!-- lorahub-converted: (\{.*?\}) -->", text or "")
    if m:
        try:
            legacy = json.loads(m.group(1))
        except ValueError:
            legacy = {}
        for path, rec in (legacy.items() if isinstance(legacy, dict) else []):
            if isinstance(path, str) and isinstance(rec, dict) and path not in out and isinstance(rec.get("from"), str) \
                    and _SHA256.fullmatch(rec["from"]):
                out[path] = MarkedFile(path=path, role="converted", from_sha256=rec["from"],
                                       dialect=_text(rec.get("dialect"), 32))
    return out


def card_fields(meta: dict) -> dict:
    """What a pull takes from any card: base_model (the Hub id), family and base_model_name (the base
    model inside the family that id names: ``flux-1-dev``), triggers, tags (without the Hub's own
    filter tags), the type when one of its tags names exactly one, license (with license_name/link)
    and the widget's images (``[(prompt, url)]``)."""
    base_models = _str_list(meta.get("base_model"), limit=4)
    ev = _base_evidence(base_models)
    prompt = meta.get("instance_prompt")
    triggers: list[str] = []
    if isinstance(prompt, str):
        triggers = [t for t in (" ".join(p.split()) for p in prompt.split(",")) if t][:16]
    tags = _str_list(meta.get("tags"))
    types = [t for t in tags if t in LORA_TYPES]
    widget = []
    for w in meta.get("widget") if isinstance(meta.get("widget"), list) else []:
        if isinstance(w, dict) and isinstance(w.get("output"), dict) and isinstance(w["output"].get("url"), str):
            widget.append((_text(w.get("text"), 2000), w["output"]["url"]))
    lic = meta.get("license")
    return {
        "base_model": base_models[0] if base_models else None,
        "family": ev.base if ev is not None else None,
        "base_model_name": ev.base_model if ev is not None else None,
        "triggers": triggers,
        "tags": [t for t in tags if t not in HUB_TAGS and not t.startswith(("base_model:", "license:"))],
        "type": types[0] if len(types) == 1 else None,
        "license": lic if isinstance(lic, str) else None,
        "license_name": _text(meta.get("license_name")),
        "license_link": _text(meta.get("license_link"), 500),
        "widget": widget[:16],
    }


# ---------------------------------------------------------------------------------------- writing
def _fmt_alpha(a: Any) -> str:
    try:
        return f"{float(a):g}"
    except (TypeError, ValueError):
        return str(a)


def recommended_alpha(previews: list[dict], entry_id: str | None = None) -> tuple[float | None, list[float]]:
    """(recommended α, α values swept) from the params a sweep stored with its previews.

    A sweep of two LoRAs stores the second one's strengths as ``alphas2``; ``entry_id`` picks the list.
    """
    def num(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    rec, alphas = None, []
    for p in previews:
        params = p.get("params") or {}
        keys = ["alphas", "alpha", "scales"]
        loras = params.get("loras")
        if entry_id and isinstance(loras, list) and len(loras) > 1 and isinstance(loras[1], dict) \
                and loras[1].get("id") == entry_id:
            keys = ["alphas2"]
        for key in ("recommended_alpha", "recommended", "best_alpha"):
            if num(params.get(key)) and rec is None:
                rec = float(params[key])
        for key in keys:
            v = params.get(key)
            for x in (v if isinstance(v, list) else [v]):
                if num(x) and float(x) not in alphas:
                    alphas.append(float(x))
    return rec, sorted(alphas)


def license_fields(entry: dict) -> dict:
    """``license`` (+ ``license_name``/``license_link``) for a card: the entry's own (a Hub id, or
    free text as ``other``), else the family's, else nothing."""
    extra = entry.get("extra") or {}
    lic = extra.get("license")
    out: dict[str, str] = {}
    if isinstance(lic, str) and lic.strip():
        lic = lic.strip()
        if lic != "other" and _LICENSE_ID.fullmatch(lic):
            return {"license": lic}
        name = extra.get("license_name") if lic == "other" else lic
        out = {"license": "other", "license_name": _license_name(name or entry.get("name") or "custom")}
        if isinstance(extra.get("license_link"), str) and extra["license_link"].strip():
            out["license_link"] = extra["license_link"].strip()
        return out
    base = entry.get("base") or "unknown"
    return {"license": LICENSES[base]} if base in LICENSES else {}


def _license_name(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s[:64] or "custom"


def card_base_model(entry: dict, override: str | None = None) -> str | None:
    """The Hub id a card names as ``base_model``: the one given, else the one the entry came with
    (a pulled card's), else the repo of the entry's base model (``flux-1-schnell`` ->
    black-forest-labs/FLUX.1-schnell) when it belongs to the entry's family, else the family's
    reference model; None for an unknown base or a family without one (other:<name>)."""
    if override:
        return override
    bm = (entry.get("extra") or {}).get("base_model")
    if isinstance(bm, str) and _HUB_ID.fullmatch(bm.strip()):
        return bm.strip()
    base = entry.get("base") or "unknown"
    repo = BASE_MODEL_REPOS.get(entry_base_model(entry) or "")
    if repo is not None and base_family(repo) == base:
        return repo
    return BASE_MODEL_IDS.get(base)


def entry_record(entry: dict, *, preferred_weight: float | None = None) -> dict:
    """The marker's record of an entry (what a pull restores)."""
    extra = entry.get("extra") or {}
    rec: dict[str, Any] = {"name": entry["name"], "kind": entry.get("kind")}
    for k in ("type", "base"):
        if entry.get(k):
            rec[k] = entry[k]
    if entry_base_model(entry):
        rec["base_model"] = entry_base_model(entry)
    rec["triggers"] = list(entry.get("triggers") or [])
    rec["tags"] = list(entry.get("tags") or [])
    if entry.get("description"):
        rec["description"] = str(entry["description"])
    kept = {k: extra[k] for k in ENTRY_EXTRA if k in extra and extra[k] not in (None, "")
            and (isinstance(extra[k], str) or _number(extra[k]) is not None)}
    if preferred_weight is not None:
        kept["preferred_weight"] = preferred_weight
    if kept:
        rec["extra"] = kept
    return rec


def marker(plan: dict) -> dict:
    """The ``lorahub:`` section of a card: every file with its SHA-256 and role."""
    files = []
    for f in plan["files"]:
        item: dict[str, Any] = {"path": f["path"], "role": f["role"], "sha256": f["sha256"]}
        if f["role"] == "converted":
            item.update({"from_sha256": f["from_sha256"], "dialect": f["dialect"]})
        elif f["role"] in ("original", "embedding"):
            weight = plan.get("preferred_weight") if f["entry"] is plan["main"]["entry"] else None
            item["entry"] = entry_record(f["entry"], preferred_weight=weight)
        elif f["role"] == "preview":
            item["from_sha256"] = plan["main"]["entry"]["sha256"]
            params = _clean_params(f.get("params"))
            if params:
                item["params"] = params
        files.append(item)
    return {"version": MARKER_VERSION, "files": files}


def front_matter(plan: dict) -> dict:
    """The card's YAML metadata: only what is known, valid for the Hub."""
    entry = plan["main"]["entry"]
    base = entry.get("base") or "unknown"
    kind = entry.get("kind") or "lora"
    tags = ["text-to-image", *FAMILY_TAGS.get(base, ())]
    tags += ["textual_inversion", "diffusers"] if kind == "textual-inversion" else \
        ["lora", "diffusers", "template:sd-lora"]
    for t in [kind, entry.get("type"), *(entry.get("tags") or []), *plan.get("tags", [])]:
        if t and isinstance(t, str) and t not in tags:
            tags.append(t)
    fm: dict[str, Any] = {}
    if plan["base_model"]:
        fm["base_model"] = plan["base_model"]
    fm["tags"] = tags
    if plan["triggers"]:
        fm["instance_prompt"] = ", ".join(plan["triggers"])
    fm.update(license_fields(entry))
    if plan["widget"]:
        fm["widget"] = plan["widget"]
    fm["library_name"] = "diffusers"
    fm["pipeline_tag"] = "text-to-image"
    fm["lorahub"] = marker(plan)
    return fm


def _dump_yaml(fm: dict) -> str:
    import yaml

    return yaml.safe_dump(fm, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def render(plan: dict) -> str:
    """README.md text of a push ``plan`` (built by :func:`lorahub.hub.push.plan_push`)."""
    main = plan["main"]
    entry = main["entry"]
    base = entry.get("base") or "unknown"
    triggers = plan["triggers"]
    rec, swept = plan["alpha"], plan["alphas"]
    fm = front_matter(plan)
    L: list[str] = ["---", _dump_yaml(fm).rstrip("\n"), "---", "", f"# {entry['name']}", ""]
    kind = entry.get("kind") or "lora"
    what = "Textual-inversion embedding" if kind == "textual-inversion" else f"{kind.upper() if kind != 'lora' else 'LoRA'} adapter"
    rank = entry.get("rank")
    bits = [f"{what} for {family_name(base)}"]
    name = entry_base_model(entry)
    if plan["base_model"]:
        bits.append(f"(base model `{plan['base_model']}`" + (f", {name})" if name else ")"))
    elif name:
        bits.append(f"(base model {name})")
    L.append(" ".join(bits) + ".")
    details = []
    if rank:
        details.append(f"rank {rank}" if not entry.get("rank_max") or entry.get("rank_min") == entry.get("rank_max")
                       else f"rank {entry.get('rank_min')}–{entry.get('rank_max')}")
    if entry.get("alpha") is not None:
        details.append(f"network alpha {_fmt_alpha(entry['alpha'])}")
    if entry.get("parts"):
        details.append("trains " + ", ".join(entry["parts"]))
    if entry.get("type"):
        details.append(f"type: {entry['type']}")
    if details:
        L += ["", "; ".join(details[:1]).capitalize() + ("; " + "; ".join(details[1:]) if details[1:] else "") + "."]
    if entry.get("description"):
        L += ["", str(entry["description"]).strip()]

    L += ["", "## Trigger words", ""]
    if triggers:
        L.append("Use " + ", ".join(f"`{t}`" for t in triggers) + " in the prompt to activate it.")
    else:
        L.append("No trigger words are recorded for this adapter.")

    L += ["", "## Recommended strength", ""]
    if rec is not None:
        origin = {"sweep": "from a lorahub sweep", "entry": "(the entry's preferred weight)",
                  "given": "(given when pushing)"}.get(plan.get("alpha_from") or "sweep", "")
        L.append(f"Recommended α (LoRA scale) {origin}: **{_fmt_alpha(rec)}**"
                 + (f" (swept α = {', '.join(_fmt_alpha(a) for a in swept)})." if swept else "."))
    elif swept:
        L.append(f"A lorahub sweep rendered α = {', '.join(_fmt_alpha(a) for a in swept)} (see the images); "
                 "no single value was recorded as best.")
    else:
        L.append("No sweep was recorded; start at α = 1.0 and lower it if the effect is too strong.")

    L += ["", "## Files", "", "| file | form | for |", "|---|---|---|"]
    for f in plan["files"]:
        if f["role"] == "preview":
            continue
        L.append(f"| `{f['path']}` | {f['form']} | {f['for']} |")

    alpha = _fmt_alpha(rec if rec is not None else 1.0)
    pipe_cls = PIPELINES.get(base, "DiffusionPipeline")
    dtype = "torch.bfloat16" if base == "flux" else "torch.float16"
    scale_kw = {"sd3": "joint_attention_kwargs", "flux": "joint_attention_kwargs"}.get(
        base, "cross_attention_kwargs" if base in PIPELINES else None)
    repo = plan["repo"]
    prompt = (", ".join(triggers) + ", " if triggers else "") + "a photo"
    L += ["", "## Use with diffusers", "", "```python", "import torch",
          f"from diffusers import {pipe_cls}", "",
          f"pipe = {pipe_cls}.from_pretrained(\"{plan['base_model'] or 'BASE_MODEL'}\", torch_dtype={dtype}).to(\"cuda\")"]
    diff = plan.get("diffusers_file")
    if diff:
        L.append(f"pipe.load_lora_weights(\"{repo}\", weight_name=\"{diff}\")")
    for emb in plan.get("embeddings", []):
        tok = emb["token"]
        L.append(f"pipe.load_textual_inversion(\"{repo}\", weight_name=\"{emb['path']}\", token=\"{tok}\")")
    scale = f", {scale_kw}={{\"scale\": {alpha}}}" if diff and scale_kw else ""
    L += [f"image = pipe(\"{prompt}\"{scale}).images[0]", "```"]
    if not diff and kind != "textual-inversion":
        L += ["", f"diffusers cannot load this {kind} adapter directly; use the webui file below."]

    L += ["", "## Use in the AUTOMATIC1111 / Forge webui", ""]
    webui = plan.get("webui_file")
    if webui:
        stem = webui.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        L.append(f"Download `{webui}` into `models/Lora/` and add `<lora:{stem}:{alpha}>` to the prompt"
                 + (f" together with {', '.join(f'`{t}`' for t in triggers)}." if triggers else "."))
    for emb in plan.get("embeddings", []):
        stem = emb["path"].rsplit("/", 1)[-1].rsplit(".", 1)[0]
        L.append(f"Download `{emb['path']}` into `embeddings/` and write `{stem}` in the prompt.")

    L += ["", "## Lineage", ""]
    if plan["lineage"]:
        for item in plan["lineage"]:
            parent = item.get("parent_name") or item.get("parent")
            pid = f" (`{item['parent_id']}`)" if item.get("parent_id") else ""
            detail = item.get("detail") or {}
            det = ", ".join(f"{k}={v}" for k, v in sorted(detail.items()) if isinstance(v, (str, int, float)))
            L.append(f"- {item['relation']} **{parent}**{pid}" + (f": {det}" if det else ""))
    else:
        L.append("No training or merge lineage is recorded.")

    L += ["", "## Hashes", "", "| file | SHA256 | AutoV2 | BLAKE3 | CRC32 |", "|---|---|---|---|---|"]
    for f in plan["files"]:
        e = f.get("entry")
        if f["role"] in ("original", "embedding") and e is not None:
            L.append(f"| `{f['path']}` | `{(e.get('sha256') or '-').upper()}` | `{(e.get('autov2') or '-').upper()}` "
                     f"| `{e.get('blake3') or '-'}` | `{(e.get('crc32') or '-').upper()}` |")
    conv = [f for f in plan["files"] if f["role"] == "converted"]
    if conv:
        L.append("")
        for f in conv:
            src = next((o["path"] for o in plan["files"] if o["role"] == "original"
                        and o["entry"]["sha256"] == f["from_sha256"]), "the original")
            L.append(f"`{f['path']}` was converted by lorahub from `{src}` (same weights, {f['dialect']} key names; "
                     f"SHA256 `{f['sha256'].upper()}`).")
    L += ["", "---", "", "Card written by lorahub from its local registry.", ""]
    return "\n".join(L)
