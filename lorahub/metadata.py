"""What a LoRA file and the files beside it say about it: trigger tokens, names, tags, previews.

Sources, in the order their values win:

* ``<stem>.json`` — the webui's user sidecar: ``description``, ``sd version``, ``activation text``,
  ``preferred weight``, ``negative text``, ``notes``;
* ``<stem>.civitai.info`` — Civitai Helper's copy of Civitai's version JSON: ``trainedWords``,
  ``baseModel``, ``model.type``, ``model.name``, ``modelId``/``id``, ``description``;
* ``<stem>.preview.png`` (or ``.png``/``.jpg``/``.jpeg``/``.webp`` and their ``.preview.`` forms) — a preview;
* ``<stem>.txt`` — a free-text description (the webui's extra-network card description);
* the safetensors header: ``modelspec.trigger_phrase``/``modelspec.title``/``modelspec.description``,
  the additional-networks ``ssmd_*`` fields (display name, author, keywords, tags, description,
  source, rating, cover images) and kohya's ``ss_tag_frequency`` (most frequent tags, used for
  triggers only when nothing names them explicitly).

Nothing here imports torch or PIL; cover images are returned as raw bytes for the registry to check.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MAX_SIDECAR_BYTES = 16 * 1024 * 1024
MAX_TAG_TRIGGERS = 5


@dataclass
class Imported:
    """Everything found about one file besides its tensors."""

    name: str | None = None
    triggers: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    description: str | None = None
    source: str | None = None
    base: str | None = None            # sd1 | sd2 | sdxl | None
    created_at: str | None = None
    extra: dict = field(default_factory=dict)
    previews: list[tuple[str, bytes | Path]] = field(default_factory=list)  # (kind, bytes or path)
    sidecars: list[str] = field(default_factory=list)  # file names read
    notes: list[str] = field(default_factory=list)


def split_words(value) -> list[str]:
    """Trigger words from a string (comma/newline separated) or a list of such strings."""
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            continue
        for part in re.split(r"[,\n]", item):
            part = part.strip()
            if part:
                out.append(part)
    return dedupe(out)


def dedupe(words) -> list[str]:
    seen: set[str] = set()
    out = []
    for w in words:
        key = w.casefold()
        if key not in seen:
            seen.add(key)
            out.append(w)
    return out


def tag_frequency_triggers(raw: str | None, limit: int = MAX_TAG_TRIGGERS) -> list[str]:
    """The most frequent tags of kohya's ``ss_tag_frequency`` (JSON: dataset dir -> tag -> count).

    Counts are summed over the dataset folders; a tag qualifies when its count is at least 80 % of
    the largest count (trigger words caption every image). At most ``limit``, most frequent first.
    """
    if not raw:
        return []
    try:
        obj = json.loads(raw)
    except (ValueError, TypeError):
        return []
    if not isinstance(obj, dict):
        return []
    counts: dict[str, int] = {}
    for tags in obj.values():
        if not isinstance(tags, dict):
            continue
        for tag, n in tags.items():
            if isinstance(tag, str) and isinstance(n, (int, float)) and not isinstance(n, bool) and tag.strip():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    if not counts:
        return []
    top = max(counts.values())
    cut = max(1, 0.8 * top)
    ranked = sorted((t for t, n in counts.items() if n >= cut), key=lambda t: (-counts[t], t))
    return dedupe(ranked)[:limit]


BASE_HINTS = (
    (re.compile(r"sdxl|pony|illustrious|noobai|\bxl\b", re.I), "sdxl"),
    (re.compile(r"sd[ _-]?2|sd_v2|v2[-.]", re.I), "sd2"),
    (re.compile(r"sd[ _-]?1|sd_v1|v1[-.]", re.I), "sd1"),
)


def base_hint(text: str | None) -> str | None:
    """sd1/sd2/sdxl from free text such as "SD 1.5", "SDXL 1.0", "sd_v2", "stable-diffusion-xl-v1-base/lora"."""
    if not text or not isinstance(text, str):
        return None
    t = text.strip()
    if re.search(r"stable-diffusion-xl", t, re.I):
        return "sdxl"
    if re.search(r"stable-diffusion-v2", t, re.I):
        return "sd2"
    if re.search(r"stable-diffusion-v1", t, re.I):
        return "sd1"
    for rx, base in BASE_HINTS:
        if rx.search(t):
            return base
    return None


def _read_json(path: Path, notes: list[str]) -> dict | None:
    try:
        if path.stat().st_size > MAX_SIDECAR_BYTES:
            notes.append(f"{path.name}: sidecar too large, ignored")
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        notes.append(f"{path.name}: not valid JSON, ignored")
        return None
    if not isinstance(obj, dict):
        notes.append(f"{path.name}: not a JSON object, ignored")
        return None
    return obj


def _str(v) -> str | None:
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None


def _strip_html(text: str) -> str:
    text = re.sub(r"<br\s*/?>|</p>", "\n", text, flags=re.I)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _timestamp(v) -> str | None:
    try:
        ts = float(v)
    except (TypeError, ValueError):
        return None
    if not 0 < ts < 4e9:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sidecar_paths(path: Path) -> dict[str, Path]:
    """The sidecar files that exist beside ``path`` (keys: json, civitai, txt, preview)."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    folder = path.parent
    found: dict[str, Path] = {}
    cand = {"json": folder / f"{stem}.json", "civitai": folder / f"{stem}.civitai.info",
            "txt": folder / f"{stem}.txt"}
    for k, p in cand.items():
        if p.is_file():
            found[k] = p
    for ext in IMAGE_EXTS:
        for name in (f"{stem}.preview{ext}", f"{stem}{ext}"):
            p = folder / name
            if p.is_file():
                found["preview"] = p
                break
        if "preview" in found:
            break
    return found


def from_header(meta: dict[str, str], out: Imported) -> list[str]:
    """Fill ``out`` from safetensors header metadata; return explicit trigger words found."""
    triggers: list[str] = []
    triggers += split_words(meta.get("modelspec.trigger_phrase"))
    triggers += split_words(meta.get("ssmd_keywords"))
    out.name = out.name or _str(meta.get("ssmd_display_name")) or _str(meta.get("modelspec.title"))
    out.description = out.description or _str(meta.get("ssmd_description")) or _str(meta.get("modelspec.description"))
    out.source = out.source or _str(meta.get("ssmd_source"))
    out.tags = dedupe(out.tags + split_words(meta.get("ssmd_tags")) + split_words(meta.get("modelspec.tags")))
    for key, extra_key in (("ssmd_author", "author"), ("modelspec.author", "author"), ("ssmd_rating", "rating"),
                           ("modelspec.license", "license")):
        v = _str(meta.get(key))
        if v and extra_key not in out.extra:
            out.extra[extra_key] = v
    out.base = out.base or base_hint(meta.get("modelspec.architecture")) or base_hint(meta.get("ss_base_model_version"))
    if not out.base and meta.get("ss_v2") == "True":
        out.base = "sd2"
    out.created_at = (out.created_at or _str(meta.get("modelspec.date"))
                      or _timestamp(meta.get("ss_training_finished_at")) or _timestamp(meta.get("ss_training_started_at")))
    covers = meta.get("ssmd_cover_images")
    if covers:
        try:
            items = json.loads(covers)
        except ValueError:
            items = []
            out.notes.append("ssmd_cover_images is not JSON, ignored")
        if isinstance(items, list):
            for item in items[:8]:
                if not isinstance(item, str):
                    continue
                try:
                    data = base64.b64decode(item, validate=False)
                except (binascii.Error, ValueError):
                    out.notes.append("a cover image is not base64, ignored")
                    continue
                if data:
                    out.previews.append(("cover", data))
    return triggers


def collect(path: Path, meta: dict[str, str], *, sidecars: bool = True) -> Imported:
    """Everything about ``path`` from its header metadata ``meta`` and (if ``sidecars``) the files beside it."""
    out = Imported()
    explicit: list[str] = []
    if sidecars:
        found = sidecar_paths(path)
        if "json" in found:
            obj = _read_json(found["json"], out.notes)
            if obj is not None:
                out.sidecars.append(found["json"].name)
                explicit += split_words(obj.get("activation text"))
                out.description = _str(obj.get("description"))
                out.base = base_hint(obj.get("sd version"))
                for k, ek in (("preferred weight", "preferred_weight"), ("negative text", "negative_text"),
                              ("notes", "notes")):
                    v = obj.get(k)
                    if v not in (None, "", 0, 0.0):
                        out.extra[ek] = v
        if "civitai" in found:
            obj = _read_json(found["civitai"], out.notes)
            if obj is not None:
                out.sidecars.append(found["civitai"].name)
                explicit += split_words(obj.get("trainedWords") or [])
                model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
                out.base = out.base or base_hint(obj.get("baseModel"))
                if _str(obj.get("baseModel")):
                    out.extra["civitai_base_model"] = obj["baseModel"]
                if _str(model.get("type")):
                    out.extra["civitai_type"] = model["type"]
                out.name = out.name or _str(model.get("name"))
                desc = _str(obj.get("description")) or _str(model.get("description"))
                if desc and not out.description:
                    out.description = _strip_html(desc)
                mid, vid = obj.get("modelId"), obj.get("id")
                if isinstance(mid, int) and not out.source:
                    out.source = f"https://civitai.com/models/{mid}" + (f"?modelVersionId={vid}" if isinstance(vid, int) else "")
                tags = model.get("tags")
                if isinstance(tags, list):
                    out.tags = dedupe(out.tags + [t.strip() for t in tags if isinstance(t, str) and t.strip()])
        if "txt" in found:
            try:
                text = found["txt"].read_text(encoding="utf-8")[:MAX_SIDECAR_BYTES].strip()
            except (OSError, UnicodeDecodeError):
                text = ""
                out.notes.append(f"{found['txt'].name}: not UTF-8 text, ignored")
            if text:
                out.sidecars.append(found["txt"].name)
                if not out.description:
                    out.description = text
        if "preview" in found:
            out.sidecars.append(found["preview"].name)
            out.previews.append(("sidecar", found["preview"]))
    explicit += from_header(meta, out)
    out.triggers = dedupe(explicit)
    if not out.triggers:
        out.triggers = tag_frequency_triggers(meta.get("ss_tag_frequency"))
    return out


def webui_sidecar(entry: dict) -> dict:
    """The webui ``<name>.json`` sidecar for an entry (what `lorahub export` writes)."""
    sd_version = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}.get(entry.get("base") or "", "Unknown")
    extra = entry.get("extra") or {}
    return {
        "description": entry.get("description") or "",
        "sd version": sd_version,
        "activation text": ", ".join(entry.get("triggers") or []),
        "preferred weight": extra.get("preferred_weight", 0),
        "negative text": extra.get("negative_text", ""),
        "notes": extra.get("notes", ""),
    }
