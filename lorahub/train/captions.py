"""`lorahub captions lint`: the usual caption advice for LoRA datasets, made a check.

A dataset folder holds images (png, jpg/jpeg, webp) and optional same-name ``.txt`` captions.
Findings (``level`` is ``error`` or ``warning``):

- ``no-images``         the folder holds no image at all (error)
- ``unreadable-image``  PIL cannot decode the image (error)
- ``too-small``         the shorter side is below the training resolution (warning)
- ``missing-caption``   no ``.txt`` beside the image: the instance prompt is used instead (warning)
- ``empty-caption``     the ``.txt`` is empty or only whitespace (warning)
- ``missing-trigger``   character LoRAs: every caption must name the trigger (error);
                        other types except style: warning
- ``style-word``        style LoRAs: phrases such as "an illustration of", "a photo of", "painting"
                        would be learned as part of the style (warning)
- ``duplicate-image``   two files with the same pixels/bytes (warning)
- ``duplicate-caption`` two images with the identical caption (warning)
- ``orphan-caption``    a ``.txt`` with no image of the same name (warning)

Only stdlib + PIL: usable from the CLI without torch.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorahub.errors import LorahubError
from lorahub.vocab import LORA_TYPES

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")

# Phrases that name the medium/style itself; in a style LoRA's captions they would be bound to
# the style instead of the style being learned from what is not described.
STYLE_WORDS = (
    "an illustration of", "illustration of", "a photo of", "a photograph of", "photo of",
    "a picture of", "a painting of", "a drawing of", "a sketch of", "a render of",
    "in the style of", "art style", "painting", "illustration", "drawing", "artwork",
    "digital art", "watercolor", "watercolour", "oil painting", "sketch", "anime style",
    "photograph", "3d render",
)
_STYLE_RES = [(w, re.compile(r"(?<![\w-])" + re.escape(w) + r"(?![\w-])", re.IGNORECASE)) for w in STYLE_WORDS]


@dataclass
class Finding:
    level: str  # error | warning
    code: str
    file: str | None
    message: str


@dataclass
class LintReport:
    data_dir: str
    type: str | None
    trigger: str | None
    images: int = 0
    captioned: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def to_dict(self) -> dict:
        return {"data_dir": self.data_dir, "type": self.type, "trigger": self.trigger,
                "images": self.images, "captioned": self.captioned,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [asdict(f) for f in self.findings]}


def list_images(data_dir: Path) -> list[Path]:
    """Image files directly inside ``data_dir`` (sorted, hidden files skipped)."""
    return sorted(p for p in data_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def caption_path(image: Path) -> Path:
    return image.with_suffix(".txt")


def read_caption(image: Path) -> str | None:
    """The caption of ``image`` (stripped, one line), or None when there is no ``.txt``."""
    p = caption_path(image)
    if not p.is_file():
        return None
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return " ".join(text.split())


def contains_trigger(caption: str, trigger: str) -> bool:
    """Whole-word, case-insensitive match of every trigger phrase in ``trigger`` (| separates alternatives: any)."""
    for alt in [t.strip() for t in trigger.split("|") if t.strip()]:
        pat = r"(?<![\w<>])" + re.escape(alt) + r"(?![\w<>])"
        if re.search(pat, caption, re.IGNORECASE):
            return True
    return False


def style_words(caption: str) -> list[str]:
    found = []
    for word, rx in _STYLE_RES:
        if rx.search(caption) and not any(word in longer for longer in found):
            found.append(word)
    return found


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """kohya-style tag counts: captions split on commas, each tag stripped and counted."""
    counts: Counter[str] = Counter()
    for cap in captions:
        for tag in cap.split(","):
            tag = tag.strip()
            if tag:
                counts[tag] += 1
    return dict(counts.most_common())


def lint(data_dir, *, type: str | None = None, trigger: str | None = None,
         min_size: int | None = 512) -> LintReport:
    """Check the dataset in ``data_dir``; see the module docstring for the findings."""
    from PIL import Image, UnidentifiedImageError

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LorahubError(f"{data_dir}: not a folder")
    if type is not None and type not in LORA_TYPES:
        raise LorahubError(f"unknown type {type!r} (one of {', '.join(LORA_TYPES)})")
    rep = LintReport(str(data_dir), type, trigger)
    images = list_images(data_dir)
    rep.images = len(images)
    if not images:
        rep.findings.append(Finding("error", "no-images", None,
                                    f"no images ({', '.join(IMAGE_EXTS)}) in {data_dir}"))
    stems = {p.stem for p in images}
    for txt in sorted(data_dir.glob("*.txt")):
        if txt.stem not in stems and not txt.name.startswith("."):
            rep.findings.append(Finding("warning", "orphan-caption", txt.name,
                                        "caption without an image of the same name"))
    by_hash: dict[str, list[str]] = defaultdict(list)
    by_caption: dict[str, list[str]] = defaultdict(list)
    for img in images:
        name = img.name
        try:
            with Image.open(img) as im:
                im.load()
                w, h = im.size
                digest = hashlib.sha256(im.convert("RGB").tobytes() + f"{w}x{h}".encode()).hexdigest()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            rep.findings.append(Finding("error", "unreadable-image", name, f"cannot read image: {exc}"))
            continue
        by_hash[digest].append(name)
        if min_size and min(w, h) < min_size:
            rep.findings.append(Finding("warning", "too-small", name,
                                        f"{w}x{h} is smaller than {min_size} px on its short side"))
        cap = read_caption(img)
        if cap is None:
            rep.findings.append(Finding("warning", "missing-caption", name,
                                        "no caption file; the instance prompt will be used"))
            continue
        if not cap:
            rep.findings.append(Finding("warning", "empty-caption", name, "caption file is empty"))
            continue
        rep.captioned += 1
        by_caption[cap.lower()].append(name)
        if trigger and type != "style" and not contains_trigger(cap, trigger):
            level = "error" if type == "character" else "warning"
            rep.findings.append(Finding(level, "missing-trigger", name,
                                        f"caption does not contain the trigger {trigger!r}"))
        if type == "style":
            words = style_words(cap)
            if words:
                rep.findings.append(Finding("warning", "style-word", name,
                                            "style words would be learned as the style: "
                                            + ", ".join(repr(w) for w in words)))
    for names in by_hash.values():
        if len(names) > 1:
            rep.findings.append(Finding("warning", "duplicate-image", names[1],
                                        f"same image as {', '.join(names[:1] + names[2:])}"))
    for names in by_caption.values():
        if len(names) > 1:
            rep.findings.append(Finding("warning", "duplicate-caption", names[1],
                                        f"identical caption to {', '.join(names[:1] + names[2:])}"))
    if type == "character" and not trigger:
        rep.findings.append(Finding("warning", "no-trigger", None,
                                    "character LoRA without a trigger word to look for in the captions"))
    return rep
