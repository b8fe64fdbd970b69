"""Training images: captions, centre crop or aspect-ratio buckets, deterministic batch order.

The batch of step ``s`` is a pure function of (seed, s): a resumed run sees exactly the batches the
interrupted run would have seen, without any saved sampler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lorahub.errors import LorahubError
from lorahub.train.captions import list_images, read_caption


@dataclass
class Item:
    path: Path
    caption: str
    bucket: tuple[int, int]  # (width, height) in pixels
    original_size: tuple[int, int] = (0, 0)  # (height, width) before cropping (SDXL time ids)
    crop_top_left: tuple[int, int] = (0, 0)


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, area close to resolution², aspect within max_ratio."""
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * max_ratio:
        h = int(area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
        w += step
    out.add((resolution, resolution))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    w, h = size
    r = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def resize_crop(img, target: tuple[int, int]):
    """Scale ``img`` to cover ``target`` (w, h), then centre crop. Returns (image, (top, left))."""
    from PIL import Image

    tw, th = target
    w, h = img.size
    s = max(tw / w, th / h)
    nw, nh = max(tw, round(w * s)), max(th, round(h * s))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return img.crop((left, top, left + tw, top + th)), (top, left)


def to_tensor(img):
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageSet:
    """Images of one folder with their prompts, grouped into size buckets."""

    def __init__(self, folder, *, resolution: int, default_prompt: str, buckets: bool = False,
                 bucket_step: int = 64, prompt_fn=None):
        from PIL import Image

        folder = Path(folder)
        paths = list_images(folder)
        if not paths:
            raise LorahubError(f"{folder}: no training images (png, jpg, webp)")
        bucket_list = make_buckets(resolution, bucket_step) if buckets else [(resolution, resolution)]
        self.items: list[Item] = []
        self.raw_captions: list[str] = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    size = im.size
                    if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation: rotated by 90°
                        size = (size[1], size[0])
            except Exception as exc:  # unreadable images are reported by the lint
                raise LorahubError(f"{p.name}: cannot read image ({exc})") from None
            cap = read_caption(p)
            self.raw_captions.append(cap or "")
            prompt = cap if cap else default_prompt
            if prompt_fn is not None:
                prompt = prompt_fn(prompt)
            b = nearest_bucket(size, bucket_list) if buckets else bucket_list[0]
            self.items.append(Item(p, prompt, b, (size[1], size[0])))
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, flip: bool = False):
        """Pixel tensor (3, H, W) in [-1, 1] of item ``index``, resized and cropped to its bucket."""
        from PIL import Image, ImageOps

        it = self.items[index]
        with Image.open(it.path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im, crop = resize_crop(im, it.bucket)
        it.crop_top_left = crop
        if flip:
            im = ImageOps.mirror(im)
        return to_tensor(im)

    # --- batch order ------------------------------------------------------------------------------
    def epoch_batches(self, seed: int, epoch: int, batch_size: int) -> list[list[int]]:
        """All batches of one epoch: shuffled within buckets, batches shuffled; deterministic."""
        import torch

        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i in torch.randperm(len(self.items), generator=g).tolist():
            groups.setdefault(self.items[i].bucket, []).append(i)
        batches: list[list[int]] = []
        for key in sorted(groups):
            idx = groups[key]
            # repeat within the bucket so every batch is full
            while len(idx) % batch_size:
                idx = idx + idx[: batch_size - len(idx) % batch_size]
            batches += [idx[j: j + batch_size] for j in range(0, len(idx), batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[k] for k in order]

    def batch_for_step(self, seed: int, step: int, batch_size: int, micro: int = 0,
                       grad_accum: int = 1, rank: int = 0, world: int = 1) -> list[int]:
        """Indices of the micro-batch ``micro`` of optimizer step ``step`` for process ``rank``."""
        n = (step * grad_accum + micro) * world + rank
        per_epoch = getattr(self, "_per_epoch", {}).get(batch_size)
        if per_epoch is None:
            per_epoch = len(self.epoch_batches(seed, 0, batch_size))
            self._per_epoch = {**getattr(self, "_per_epoch", {}), batch_size: per_epoch}
        epoch, k = divmod(n, per_epoch)
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != (seed, epoch, batch_size):
            self._cache = ((seed, epoch, batch_size), self.epoch_batches(seed, epoch, batch_size))
        return self._cache[1][k]
