"""Labelled sweep grids (PNG) and α animations (GIF / WebP) with Pillow.

``make_grid(cells, col_labels, row_labels, title, col_axis)`` lays out images (rows × columns) with a
title line, a column axis caption (e.g. ``my-lora  α``), the α value over every column and a label at
the left of every row. Small images (tiny test pipelines render 64 px) are upscaled with nearest
neighbour so that the text stays readable next to them.

``make_animation(cells, ...)`` builds one frame per column: every row's image at that α stacked
vertically, with the row labels and the current α written on the frame; saved as an animated GIF or
WebP (chosen by the file suffix).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from lorahub.errors import LorahubError
from lorahub.fsutil import atomic_path

BG = (255, 255, 255)
FG = (20, 20, 20)
MIN_CELL = 160


def _font(size: int):
    from lorahub.ops.fonts import load_font

    return load_font(size)[0]


def _label(text: str) -> str:
    """Text as the loaded font can draw it (α and friends in ASCII when the font lacks them)."""
    from lorahub.ops.fonts import ascii_fallback, load_font

    return text if load_font(14)[1] else ascii_fallback(text)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.multiline_textbbox((0, 0), text, font=font, spacing=3)
    return box[2] - box[0], box[3] - box[1]


def _fit(draw, text: str, font, max_w: int) -> str:
    """Shorten each line of ``text`` with an ellipsis to at most ``max_w`` pixels."""
    out = []
    ell = _label("…")
    for line in _label(text).split("\n"):
        if _text_size(draw, line, font)[0] <= max_w:
            out.append(line)
            continue
        while line and _text_size(draw, line + ell, font)[0] > max_w:
            line = line[:-1]
        out.append(line + ell)
    return "\n".join(out)


def _wrap(draw, text: str, font, max_w: int, max_lines: int = 3) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        cand = (cur + " " + w).strip()
        if _text_size(draw, cand, font)[0] <= max_w or not cur:
            cur = cand
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " …"
    return _fit(draw, "\n".join(lines), font, max_w)


def _scaled(img: Image.Image, cell: int) -> Image.Image:
    img = img.convert("RGB")
    if img.width == cell:
        return img
    h = round(img.height * cell / img.width)
    resample = Image.NEAREST if img.width < cell else Image.LANCZOS
    return img.resize((cell, h), resample)


def format_alpha(a: float) -> str:
    s = f"{a:.3f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def make_grid(cells: list[list[Image.Image]], col_labels: list[str], row_labels: list[str], *,
              title: str = "", col_axis: str = "", row_axis: str = "", cell: int | None = None) -> Image.Image:
    """Grid image: ``cells[row][col]``, labels over columns and left of rows, title and axis captions."""
    if not cells or not cells[0]:
        raise LorahubError("nothing to draw: the sweep produced no images")
    n_rows, n_cols = len(cells), len(cells[0])
    if len(col_labels) != n_cols or len(row_labels) != n_rows:
        raise ValueError("labels do not match the grid")
    w0 = cells[0][0].width
    cell = cell or max(w0, MIN_CELL)
    imgs = [[_scaled(im, cell) for im in row] for row in cells]
    cell_h = max(im.height for row in imgs for im in row)
    fsize = max(14, min(28, cell // 10))
    font, small = _font(fsize), _font(max(12, fsize - 2))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(6, fsize // 2)
    label_w = min(max(cell, 180), 2 * cell + 80)
    row_texts = [_wrap(probe, t, small, label_w - 2 * pad, max_lines=max(2, cell_h // (fsize + 4))) for t in row_labels]
    title_h = _text_size(probe, title or "Ag", font)[1] + 2 * pad if title else 0
    axis_h = _text_size(probe, "Ag", font)[1] + pad if col_axis else 0
    col_h = _text_size(probe, "Ag", font)[1] + 2 * pad
    top = title_h + axis_h + col_h
    W = label_w + n_cols * (cell + pad) + pad
    H = top + n_rows * (cell_h + pad) + pad
    canvas = Image.new("RGB", (W, H), BG)
    d = ImageDraw.Draw(canvas)
    if title:
        d.text((pad, pad), _fit(d, title, font, W - 2 * pad), fill=FG, font=font)
    if col_axis:
        ax = _fit(d, col_axis, font, n_cols * (cell + pad))
        tw = _text_size(d, ax, font)[0]
        d.text((label_w + (n_cols * (cell + pad) - tw) // 2, title_h), ax, fill=FG, font=font)
    if row_axis:
        d.text((pad, title_h + axis_h), _fit(d, row_axis, small, label_w - 2 * pad), fill=FG, font=small)
    for c, lab in enumerate(col_labels):
        lab = _fit(d, lab, font, cell)
        tw, _ = _text_size(d, lab, font)
        x = label_w + c * (cell + pad) + (cell - tw) // 2
        d.text((x, title_h + axis_h + pad), lab, fill=FG, font=font)
    for r, row in enumerate(imgs):
        y = top + r * (cell_h + pad)
        d.multiline_text((pad, y + pad), row_texts[r], fill=FG, font=small, spacing=3)
        for c, im in enumerate(row):
            canvas.paste(im, (label_w + c * (cell + pad), y))
    return canvas


def make_animation(cells: list[list[Image.Image]], col_labels: list[str], row_labels: list[str], *,
                   title: str = "", cell: int | None = None) -> list[Image.Image]:
    """Frames cycling the columns (α): frame j shows every row's image at column j, labelled."""
    frames = []
    for j, lab in enumerate(col_labels):
        column = [[row[j]] for row in cells]
        frames.append(make_grid(column, [lab], row_labels, title=title, cell=cell))
    return frames


def save_image(img: Image.Image, dest: Path, params: dict | None = None) -> Path:
    """Write a PNG atomically, with the sweep parameters as a text chunk."""
    from PIL.PngImagePlugin import PngInfo

    dest = Path(dest)
    info = None
    if params is not None:
        import json

        info = PngInfo()
        info.add_text("lorahub", json.dumps(params, sort_keys=True, default=str))
    fmt = "PNG" if dest.suffix.lower() == ".png" else None
    with atomic_path(dest) as tmp:
        if fmt == "PNG":
            img.save(tmp, format="PNG", pnginfo=info)
        else:
            img.save(tmp, format=_format_of(dest))
    return dest


def _format_of(dest: Path) -> str:
    ext = dest.suffix.lower()
    fmt = {".png": "PNG", ".gif": "GIF", ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(ext)
    if fmt is None:
        raise LorahubError(f"{dest}: unsupported image type {ext or '(no suffix)'} (use .png, .gif, .webp, .jpg)")
    return fmt


def save_animation(frames: list[Image.Image], dest: Path, *, duration_ms: int = 600) -> Path:
    """Animated GIF or WebP (by suffix), looping forever."""
    dest = Path(dest)
    fmt = _format_of(dest)
    if fmt not in ("GIF", "WEBP"):
        raise LorahubError(f"{dest}: animations are written as .gif or .webp")
    if not frames:
        raise LorahubError("nothing to animate")
    with atomic_path(dest) as tmp:
        first, rest = frames[0], frames[1:]
        if fmt == "GIF":
            first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0,
                       disposal=2, optimize=False)
        else:
            first.save(tmp, format="WEBP", save_all=True, append_images=rest, duration=duration_ms, loop=0,
                       lossless=True)
    return dest
