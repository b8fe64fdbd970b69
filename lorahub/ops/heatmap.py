"""Heat-map PNG of a LoRA's strength by block (rows) and layer type (columns), drawn with Pillow.

Rows run down the UNet (down.0 … mid … up.N), then the text encoder layers (te.0 …, te2.0 …);
columns are the module types (self-attn, cross-attn, ff/mlp, proj, resnet, sampler, other). Each cell
is coloured on a linear viridis-like scale from 0 to the largest cell and carries its value; blank
cells (grey, "–") mean the LoRA has no layer there. A legend bar on the right shows the scale.
"""

from __future__ import annotations

from pathlib import Path

from lorahub.fsutil import atomic_path

# viridis anchor colours (perceptually ordered, readable in greyscale)
_ANCHORS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
EMPTY = (225, 225, 225)
BG = (255, 255, 255)
FG = (20, 20, 20)


def colour(t: float) -> tuple[int, int, int]:
    """Colour of t ∈ [0, 1] on the scale."""
    t = 0.0 if t != t else min(1.0, max(0.0, t))  # NaN -> 0
    x = t * (len(_ANCHORS) - 1)
    i = min(int(x), len(_ANCHORS) - 2)
    f = x - i
    a, b = _ANCHORS[i], _ANCHORS[i + 1]
    return tuple(int(round(a[j] + (b[j] - a[j]) * f)) for j in range(3))


def _text_colour(c: tuple[int, int, int]) -> tuple[int, int, int]:
    lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    return (0, 0, 0) if lum > 140 else (255, 255, 255)


def _font(size: int):
    from lorahub.ops.fonts import load_font

    return load_font(size)


def _plain(text: str) -> str:
    from lorahub.ops.fonts import ascii_fallback

    return ascii_fallback(text)


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 0.001:
        return f"{v:.2e}"
    return f"{v:.3g}"


def row_label(block: str) -> str:
    head, _, tail = block.partition(".")
    names = {"down": "UNet down", "mid": "UNet mid", "up": "UNet up", "unet": "UNet", "te": "TE",
             "te2": "TE2"}
    return f"{names.get(head, head)} {tail}".strip()


def _centred(d, xy, text, font, fill) -> None:
    try:
        d.text(xy, text, font=font, fill=fill, anchor="mm")
    except ValueError:  # bitmap fonts have no anchors
        box = d.textbbox((0, 0), text, font=font)
        d.text((xy[0] - (box[0] + box[2]) / 2, xy[1] - (box[1] + box[3]) / 2), text, font=font, fill=fill)


def render(grid: dict, out: Path | str, *, title: str = "LoRA strength") -> Path:
    """Draw ``grid`` (rows, cols, values, quantity — see lorahub.ops.inspect.grid) to a PNG, atomically."""
    from PIL import Image, ImageDraw

    rows, cols, values = grid["rows"], grid["cols"], grid["values"]
    if not rows or not cols:
        rows, cols, values = ["(no layers)"], ["-"], [[None]]
    (f_cell, uni), (f_lab, _), (f_title, _), (f_small, _) = _font(13), _font(14), _font(17), _font(12)
    txt = (lambda t: t) if uni else _plain
    cell_w, cell_h = 96, 24
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def tw(text, font):
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    label_w = max(tw(row_label(r), f_lab)[0] for r in rows) + 24
    top = 78
    legend_w = 120
    width = max(label_w + cell_w * len(cols) + legend_w + 20, tw(txt(title), f_title)[0] + 40, 420)
    height = top + cell_h * len(rows) + 54
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    d.text((12, 10), txt(title), font=f_title, fill=FG)
    d.text((12, 34), txt(f"cell = {grid.get('quantity', '')}  ·  grey = no layer there"), font=f_small, fill=(90, 90, 90))

    finite = [v for row in values for v in row if v is not None]
    vmax = max(finite) if finite else 0.0
    # column headers
    for j, c in enumerate(cols):
        w, _ = tw(c, f_lab)
        d.text((label_w + j * cell_w + (cell_w - w) / 2, top - 22), c, font=f_lab, fill=FG)
    prev_group = None
    for i, r in enumerate(rows):
        y = top + i * cell_h
        group = "te" if r.startswith("te") else "unet"
        if prev_group is not None and group != prev_group:  # separator between UNet and text encoder
            d.line([(6, y - 1), (label_w + cell_w * len(cols), y - 1)], fill=FG, width=2)
        prev_group = group
        lab = row_label(r)
        _, h = tw(lab, f_lab)
        d.text((10, y + (cell_h - h) / 2 - 2), lab, font=f_lab, fill=FG)
        for j, v in enumerate(values[i]):
            x = label_w + j * cell_w
            if v is None:
                fill, text = EMPTY, txt("–")
            else:
                fill = colour(v / vmax if vmax > 0 else 0.0)
                text = fmt(v)
            d.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=fill)
            _centred(d, (x + (cell_w - 2) / 2, y + (cell_h - 2) / 2), text, f_cell,
                     _text_colour(fill) if v is not None else (120, 120, 120))
    # legend bar
    lx = label_w + cell_w * len(cols) + 24
    ly0, ly1 = top, top + max(cell_h * len(rows) - 2, 60)
    bar_w = 18
    for y in range(ly0, ly1 + 1):
        t = 1.0 - (y - ly0) / max(1, ly1 - ly0)
        d.line([(lx, y), (lx + bar_w, y)], fill=colour(t))
    d.rectangle([lx, ly0, lx + bar_w, ly1], outline=FG)
    for t in (0.0, 0.5, 1.0):
        y = ly1 - t * (ly1 - ly0)
        d.line([(lx + bar_w, y), (lx + bar_w + 4, y)], fill=FG)
        d.text((lx + bar_w + 7, y - 8), fmt(vmax * t), font=f_small, fill=FG)
    d.text((12, height - 30), f"max cell {fmt(vmax)}", font=f_small, fill=(90, 90, 90))
    out = Path(out)
    with atomic_path(out) as tmp:
        img.save(tmp, format="PNG")
    return out
