"""One font loader for every picture lorahub draws (sweep grids, heat maps)."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load_font(size: int):
    """(font, unicode_ok): DejaVu Sans when installed (has α ‖ Δ –), else Pillow's default font,
    whose glyph set lacks those characters (callers then spell them in ASCII)."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size), False
    except (TypeError, OSError, ValueError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default(), False


def ascii_fallback(text: str) -> str:
    """Spell the symbols lorahub uses in ASCII, for fonts without them."""
    for a, b in (("α", "a"), ("‖", "|"), ("Δ", "d"), ("–", "-"), ("·", "-"), ("×", "x"), ("…", "..."),
                 ("√", "sqrt"), ("Σ", "sum"), ("₂", "2")):
        text = text.replace(a, b)
    return text.encode("ascii", "replace").decode("ascii")
