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

The LoRA's type (character, style, …; :data:`lorahub.vocab.LORA_TYPES`) is filled from the evidence
the files carry (:func:`type_evidence`): Civitai's model tags/categories, a "<type> LoRA" phrase in the
webui ``.json`` or kohya's ``ss_training_comment``, the class word of kohya's dataset folders
(``10_aqua character``), then the name of the folder the file lies in (``Lora/chars/``); where it came
from is kept in ``Imported.type_source``.

Everything read here is hostile input: JSON goes through :func:`lorahub.formats.header.loads_json`
(depth, number limits), sidecars are read only up to :data:`MAX_SIDECAR_BYTES`, and images are checked by
:func:`read_image` (size and pixel limits, no decompression bombs) before anything stores them. A
sidecar that cannot be used is ignored with a note; hostile header metadata refuses the file.
Nothing here imports torch; PIL only inside :func:`read_image`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorahub.errors import FormatError, LorahubError
from lorahub.formats.header import loads_json

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MAX_SIDECAR_BYTES = 16 * 1024 * 1024   # a .json / .civitai.info / .txt sidecar
MAX_IMAGE_BYTES = 64 * 1024 * 1024     # a preview or cover image file
MAX_IMAGE_PIXELS = 64 * 1024 * 1024    # width x height of a preview (8K x 8K); PIL's own bomb limit is 179 MP
MAX_COVERS = 8
MAX_TAG_TRIGGERS = 5
MAX_TAG_COUNT = 10**12                 # an image count in ss_tag_frequency; larger counts are ignored


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
    type: str | None = None            # one of LORA_TYPES, from the evidence (type_evidence)
    type_source: str | None = None     # where ``type`` came from, e.g. "Civitai tag 'character'"


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
    Text that is not JSON gives no triggers; hostile JSON raises :class:`~lorahub.errors.FormatError`.
    """
    obj = _json_field(raw, "ss_tag_frequency")
    if not isinstance(obj, dict):
        return []
    counts: dict[str, int] = {}
    for tags in obj.values():
        if not isinstance(tags, dict):
            continue
        for tag, n in tags.items():
            if (isinstance(tag, str) and isinstance(n, (int, float)) and not isinstance(n, bool)
                    and 0 < n <= MAX_TAG_COUNT and tag.strip()):
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    if not counts:
        return []
    top = max(counts.values())
    cut = max(1, 0.8 * top)
    ranked = sorted((t for t, n in counts.items() if n >= cut), key=lambda t: (-counts[t], t))
    return dedupe(ranked)[:limit]


def _json_field(raw, what: str):
    """A JSON-valued metadata field, parsed as hostile input: None when absent or not JSON."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    try:
        return loads_json(raw, what)
    except ValueError:
        return None


def base_hint(text: str | None) -> str | None:
    """The base family free text names -- sd1, sd2, sdxl, sd3, flux or other:<name> -- from text such as
    "SD 1.5", "SDXL 1.0", "Pony", "Flux.1 D", "SD 3.5 Large", "sd_v2", "stable-diffusion-xl-v1-base/lora"
    (:func:`lorahub.formats.families.from_text`); None when it names none."""
    from lorahub.formats.families import from_text

    ev = from_text(text, "text") if isinstance(text, str) else None
    return ev.base if ev is not None else None


def _read_sidecar(path: Path, notes: list[str]) -> bytes | None:
    """The bytes of a sidecar file, or None (with a note) when it is too large or unreadable."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_SIDECAR_BYTES:
                notes.append(f"{path.name}: sidecar larger than {MAX_SIDECAR_BYTES} bytes, ignored")
                return None
            return f.read(MAX_SIDECAR_BYTES + 1)[:MAX_SIDECAR_BYTES]
    except OSError as exc:
        notes.append(f"{path.name}: cannot read it ({exc.strerror or exc}), ignored")
        return None


def _read_json(path: Path, notes: list[str]) -> dict | None:
    raw = _read_sidecar(path, notes)
    if raw is None:
        return None
    try:
        obj = loads_json(raw, path.name)
    except FormatError as exc:
        notes.append(f"{exc}, ignored")
        return None
    except ValueError:  # not JSON, not UTF-8
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
        items = _json_field(covers, "ssmd_cover_images")
        if items is None:
            out.notes.append("ssmd_cover_images is not JSON, ignored")
        if isinstance(items, list):
            for item in items[:MAX_COVERS]:
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
    """Everything about ``path`` from its header metadata ``meta`` and (if ``sidecars``) the files beside it.

    Raises :class:`~lorahub.errors.FormatError` when the file's path is not valid UTF-8 (it could not be
    recorded or shown) or its metadata is hostile (see :func:`lorahub.formats.header.loads_json`).
    """
    check_path_text(path)
    out = Imported()
    explicit: list[str] = []
    webui: dict | None = None
    civitai: dict | None = None
    if sidecars:
        found = sidecar_paths(path)
        if "json" in found:
            obj = webui = _read_json(found["json"], out.notes)
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
            obj = civitai = _read_json(found["civitai"], out.notes)
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
            raw = _read_sidecar(found["txt"], out.notes)
            try:
                text = raw.decode("utf-8").strip() if raw else ""
            except UnicodeDecodeError:
                text = ""
                out.notes.append(f"{found['txt'].name}: not UTF-8 text, ignored")
            if text:
                out.sidecars.append(found["txt"].name)
                if not out.description:
                    out.description = text
        if "preview" in found:
            out.sidecars.append(found["preview"].name)
            out.previews.append(("sidecar", found["preview"]))
    try:
        explicit += from_header(meta, out)
        out.triggers = dedupe(explicit)
        if not out.triggers:
            out.triggers = tag_frequency_triggers(meta.get("ss_tag_frequency"))
        found_type = type_evidence(path, meta, civitai=civitai, webui=webui)
    except FormatError as exc:
        raise FormatError(f"{display_path(path.name)}: {exc}") from None
    if found_type:
        out.type, out.type_source = found_type
    return out


def display_path(p: str | os.PathLike) -> str:
    """A path as text that can always be printed and stored: bytes that are not UTF-8 (a Linux file
    name decoded with surrogate escapes) become ``\\xNN``."""
    try:
        return os.fsencode(p).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file system produced
        return os.fspath(p).encode("utf-8", "backslashreplace").decode("utf-8")


def check_path_text(path: str | os.PathLike) -> None:
    """Refuse a path whose name is not valid UTF-8: the registry could not store it, nor print it."""
    text = os.path.abspath(os.fspath(path))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{display_path(text)}: the path is not valid UTF-8; rename the file or "
                          "folder") from None


# ------------------------------------------------------------------------------------ type evidence
# Words that name a LoRA type (lorahub.vocab.LORA_TYPES) in each kind of evidence.
CIVITAI_CATEGORIES = {"character": "character", "celebrity": "character", "style": "style",
                      "concept": "concept", "clothing": "clothing", "poses": "pose", "pose": "pose",
                      "objects": "object", "object": "object"}
FOLDER_WORDS = {**CIVITAI_CATEGORIES, "characters": "character", "chars": "character", "char": "character",
                "celebrities": "character", "people": "character", "persons": "character",
                "styles": "style", "artstyle": "style", "artstyles": "style", "concepts": "concept",
                "clothes": "clothing", "outfit": "clothing", "outfits": "clothing", "costumes": "clothing",
                "items": "object", "props": "object"}
# the class word of a kohya DreamBooth-style dataset folder ("10_aqua character", "5_sks woman")
CLASS_WORDS = {"character": "character", "person": "character", "woman": "character", "man": "character",
               "girl": "character", "boy": "character", "1girl": "character", "1boy": "character",
               "style": "style", "artstyle": "style", "concept": "concept", "outfit": "clothing",
               "clothes": "clothing", "clothing": "clothing", "costume": "clothing", "pose": "pose",
               "object": "object"}
_TYPE_PHRASE = re.compile(r"\b(character|style|concept|clothing|outfit|pose|object)s?[ -]"
                          r"(?:lora|lycoris|locon|loha|lokr|dora|model)\b", re.I)
_PHRASE_TYPES = {"outfit": "clothing"}


def _phrase_type(text) -> str | None:
    if not isinstance(text, str):
        return None
    m = _TYPE_PHRASE.search(text[:100_000])
    if not m:
        return None
    word = m.group(1).lower()
    return _PHRASE_TYPES.get(word, word)


def _civitai_tags(obj: dict) -> list[str]:
    model = obj.get("model") if isinstance(obj.get("model"), dict) else {}
    out = []
    for tags in (model.get("tags"), obj.get("tags")):
        for t in tags if isinstance(tags, list) else []:
            name = t.get("name") if isinstance(t, dict) else t
            if isinstance(name, str):
                out.append(name.strip())
    return out


def _dataset_folders(meta: dict[str, str]) -> list[str]:
    names: list[str] = []
    for key in ("ss_tag_frequency", "ss_dataset_dirs"):
        obj = _json_field(meta.get(key), key)
        if isinstance(obj, dict):
            names += [k for k in obj if isinstance(k, str)]
    return names


def type_evidence(path: Path, meta: dict[str, str], *, civitai: dict | None = None,
                  webui: dict | None = None) -> tuple[str, str] | None:
    """``(type, where it came from)`` from what the file and its sidecars say, strongest evidence first:
    a Civitai category tag (``character``, ``style``, ``concept``, ``clothing``, ``poses``, ``objects``),
    a "<type> LoRA" phrase in the webui ``.json`` (description, notes) or kohya's ``ss_training_comment``,
    the class word of a kohya dataset folder (``10_aqua character``), the folder the file lies in."""
    if civitai:
        for tag in _civitai_tags(civitai):
            t = CIVITAI_CATEGORIES.get(tag.lower())
            if t:
                return t, f"Civitai tag {tag!r}"
    for field_name in ("description", "notes"):
        t = _phrase_type((webui or {}).get(field_name))
        if t:
            return t, f"webui .json {field_name}"
    t = _phrase_type(meta.get("ss_training_comment"))
    if t:
        return t, "ss_training_comment"
    for folder in _dataset_folders(meta):
        m = re.fullmatch(r"\s*\d+_(.*\S)\s*", folder.replace("\\", "/").rsplit("/", 1)[-1])
        words = m.group(1).lower().split() if m else []
        if len(words) >= 2 and words[-1] in CLASS_WORDS:
            return CLASS_WORDS[words[-1]], f"kohya dataset folder {folder[:80]!r}"
    parent = os.path.basename(os.path.dirname(os.path.abspath(os.fspath(path))))
    t = FOLDER_WORDS.get(parent.lower())
    if t:
        return t, f"folder {parent!r}"
    return None


# ------------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class CheckedImage:
    """An image that PIL read back: its bytes, file extension (png, jpg, webp, gif) and size."""

    data: bytes
    ext: str
    width: int
    height: int


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what browsers show; PIL's other plugins are not opened
_bomb_warning_silenced = False


def read_image(src: bytes | str | os.PathLike) -> CheckedImage:
    """Check a preview/cover image (bytes or a file) before anything stores it.

    Raises :class:`~lorahub.errors.LorahubError` when the file is larger than :data:`MAX_IMAGE_BYTES`,
    is not a PNG/JPEG/WebP/GIF that PIL can verify, or has more than :data:`MAX_IMAGE_PIXELS` pixels
    (a "decompression bomb": a small file that would expand to gigabytes).
    """
    global _bomb_warning_silenced
    import io
    import warnings

    from PIL import Image

    if not _bomb_warning_silenced:
        # PIL warns (once per process) between 89 and 179 MP; we refuse at MAX_IMAGE_PIXELS instead
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _bomb_warning_silenced = True
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        try:
            with open(src, "rb") as f:
                data = f.read(MAX_IMAGE_BYTES + 1)
        except OSError as exc:
            raise LorahubError(f"{display_path(src)}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise LorahubError(f"image larger than {MAX_IMAGE_BYTES} bytes")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            fmt = (im.format or "").lower()
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise LorahubError(f"image of {w}x{h} pixels is larger than the {MAX_IMAGE_PIXELS} pixel limit")
            im.verify()
    except LorahubError:
        raise
    except Image.DecompressionBombError:
        raise LorahubError(f"image is larger than the {MAX_IMAGE_PIXELS} pixel limit") from None
    except Exception as exc:  # PIL raises many types on damaged input; each means "not an image"
        raise LorahubError(f"not a readable image ({type(exc).__name__})") from None
    return CheckedImage(data, {"jpeg": "jpg"}.get(fmt, fmt), w, h)


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
