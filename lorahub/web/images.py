"""Preview images for the browser, always re-encoded from the registry's store.

A stored preview is never sent as it is: it is decoded with Pillow and written again (PNG for still
images and single frames, GIF for animations), so what reaches the browser is exactly the picture
and its declared type, whatever else the stored bytes may hold. Variants:

* ``full`` — the whole image (an animation stays animated);
* ``thumb`` — at most :data:`THUMB` pixels wide and high, for gallery cards (an animation's last frame:
  the strongest α of a sweep);
* ``frame-N`` — frame N of an animation (the α slider of an entry page).

Results are cached in ``<home>/cache/images/<sha256>-<variant>.<ext>`` (a stored file never
changes, so its SHA-256 is a complete key); in memory when the home is not writable or
``persist=False`` (a read-only gallery).
"""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lorahub.errors import LorahubError, NotFound
from lorahub.web.analysis import CACHE_DIR

THUMB = 360
MAX_PIXELS = 64_000_000     # per frame; larger previews are not decoded
MAX_FRAMES = 400
MEMORY_ITEMS = 256
VARIANT = re.compile(r"^(full|thumb|frame-\d{1,4})$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Encoded:
    data: bytes
    media_type: str   # image/png | image/gif


class Images:
    """Re-encoded previews of one registry home (see the module docs)."""

    def __init__(self, home: Path, store, *, persist: bool = True):
        self.root = Path(home) / CACHE_DIR / "images"
        self.persist = persist
        self.store = store
        self._frames: dict[str, int] = {}
        self._memory: OrderedDict[str, Encoded] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ decoding
    def _open(self, sha256: str):
        from PIL import Image, UnidentifiedImageError

        path = self.store.path(sha256)
        if not path.is_file():
            raise NotFound("the preview's stored file is missing")
        try:
            im = Image.open(path)
        except (UnidentifiedImageError, OSError, ValueError):
            raise LorahubError("the stored preview is not a readable image") from None
        w, h = im.size
        if w * h > MAX_PIXELS or w <= 0 or h <= 0:
            im.close()
            raise LorahubError(f"the stored preview is too large to show ({w}x{h})")
        return im

    def frame_count(self, sha256: str) -> int:
        """How many frames the stored image has (1 for a still image)."""
        if sha256 not in self._frames:
            try:
                with self._open(sha256) as im:
                    n = int(getattr(im, "n_frames", 1) or 1)  # Pillow: only animated formats have n_frames
            except LorahubError:
                n = 1
            self._frames[sha256] = max(1, min(n, MAX_FRAMES))
        return self._frames[sha256]

    def _encode(self, sha256: str, variant: str) -> Encoded:
        from PIL import Image, ImageSequence

        with self._open(sha256) as im:
            try:
                n = min(int(getattr(im, "n_frames", 1) or 1), MAX_FRAMES)
                if variant == "full" and n > 1:
                    frames, durations = [], []
                    for i, fr in enumerate(ImageSequence.Iterator(im)):
                        if i >= n:
                            break
                        frames.append(fr.convert("RGB"))
                        durations.append(int(fr.info.get("duration") or im.info.get("duration") or 500))
                    buf = io.BytesIO()
                    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:],
                                   duration=durations, loop=0)
                    return Encoded(buf.getvalue(), "image/gif")
                if variant.startswith("frame-"):
                    index = int(variant.removeprefix("frame-"))
                    if not 0 <= index < n:
                        raise NotFound(f"the preview has no frame {index}")
                    im.seek(index)
                elif variant == "thumb" and n > 1:
                    im.seek(n - 1)
                elif variant not in ("full", "thumb"):
                    raise NotFound(f"no image variant {variant!r}")
                out = im.convert("RGBA" if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info else "RGB")
            except (OSError, ValueError, EOFError):
                raise LorahubError("the stored preview is not a readable image") from None
        if variant == "thumb":
            small = min(out.size) <= THUMB  # tiny renders stay sharp
            out.thumbnail((THUMB, THUMB), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        out.save(buf, format="PNG", optimize=False)
        return Encoded(buf.getvalue(), "image/png")

    def get(self, sha256: str, variant: str) -> Encoded:
        """The re-encoded ``variant`` of stored image ``sha256`` (cached)."""
        from lorahub.fsutil import atomic_write_bytes

        if not VARIANT.match(variant) or not SHA256.match(sha256):
            raise NotFound(f"no image variant {variant!r}")
        key = f"{sha256}-{variant}"
        with self._lock:
            hit = self._memory.get(key)
        if hit is not None:
            return hit
        for ext, media in (("png", "image/png"), ("gif", "image/gif")):
            p = self.root / f"{key}.{ext}"
            if p.is_file():
                try:
                    return Encoded(p.read_bytes(), media)
                except OSError:
                    break
        enc = self._encode(sha256, variant)
        if self.persist:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(self.root / f"{key}.{enc.media_type.split('/')[1]}", enc.data)
                return enc
            except (OSError, LorahubError):  # a read-only home: keep it in memory
                pass
        with self._lock:
            self._memory[key] = enc
            while len(self._memory) > MEMORY_ITEMS:
                self._memory.popitem(last=False)
        return enc
