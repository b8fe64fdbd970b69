"""The ``lorahub demo`` workflow: tiny fixture pipelines and LoRA files of every dialect, catalogued
in a registry, then searched, and the ML commands to try on them.

Each step is a function the CLI calls in order and prints (``lorahub/cli/demo.py``); nothing here
prints. Everything is built on CPU in seconds, offline (:mod:`lorahub.tiny`, :mod:`lorahub.tiny_loras`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorahub.errors import LorahubError

TAG = "demo"
BASE_TAGS = {"sd1": "demo-sd1", "sdxl": "demo-sdxl"}
SOURCE = "lorahub demo (tiny fixtures)"
PIPELINES = ("sd1", "sdxl")


@dataclass
class DemoAdd:
    """One tiny LoRA file added to the demo registry (``entry`` None and ``error`` set when it failed)."""

    label: str
    path: Path
    entry: dict | None
    created: bool
    error: str | None = None


@dataclass
class DemoFiles:
    """The tiny LoRA files written (to ``folder``, removed afterwards) and what adding each did."""

    folder: Path
    added: list[DemoAdd]

    @property
    def entries(self) -> list[dict]:
        return [a.entry for a in self.added if a.entry is not None]


def fresh_home() -> Path:
    """A new empty folder for a demo registry (never the user's own registry)."""
    return Path(tempfile.mkdtemp(prefix="lorahub-demo-"))


def pipeline(kind: str) -> Path:
    """The tiny ``kind`` (sd1 | sdxl) diffusers pipeline folder, built once and cached."""
    from lorahub import tiny

    return tiny.ensure(kind)


def add_tiny_loras(reg) -> DemoFiles:
    """Write the tiny LoRA files of every dialect to a temp folder and add them to ``reg`` under their
    labels, tagged ``demo`` and ``demo-sd1``/``demo-sdxl`` by base. The files are removed afterwards
    (the registry keeps its copies)."""
    from lorahub.tiny_loras import write_all

    work = Path(tempfile.mkdtemp(prefix="lorahub-demo-files-"))
    added = []
    try:
        for label, path in sorted(write_all(work).items()):
            try:
                entry, created = reg.add_file(path, name=label, tags=[TAG], source=SOURCE)
            except LorahubError as exc:
                added.append(DemoAdd(label, path, None, False, str(exc)))
                continue
            base_tag = BASE_TAGS.get(entry["base"])
            if base_tag and base_tag not in entry["tags"]:
                entry = reg.update(entry["id"], tags=entry["tags"] + [base_tag])
            added.append(DemoAdd(label, path, entry, created))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DemoFiles(work, added)


def searches(entries: list[dict]) -> list[tuple[str, dict]]:
    """The searches the demo runs: ``(query, filters)`` — a trigger word when an entry has one, then
    ``base=sdxl`` and ``kind=loha``."""
    out: list[tuple[str, dict]] = [("", {"base": "sdxl"}), ("", {"kind": "loha"})]
    with_triggers = [e for e in entries if e["triggers"]]
    if with_triggers:
        out.insert(0, (with_triggers[0]["triggers"][0], {}))
    return out


def showcase(entries: list[dict]) -> dict | None:
    """The entry the demo shows in full: the first with trigger words, else the first."""
    with_triggers = [e for e in entries if e["triggers"]]
    return (with_triggers or entries or [None])[0]


def ml_commands(home: Path, entries: list[dict]) -> tuple[Path, list[list[str]]]:
    """The ML half of the demo, as the ``lorahub`` command lines a user would type (convert, inspect,
    diff, merge, sweep on the tiny SD1 kohya and diffusers LoRAs), with their outputs folder.
    Empty when those two entries are not in ``entries``."""
    out = home / "demo-outputs"
    by_name = {e["name"]: e for e in entries}
    if "sd1-kohya" not in by_name or "sd1-diffusers" not in by_name:
        return out, []
    k, d = by_name["sd1-kohya"]["id"], by_name["sd1-diffusers"]["id"]
    return out, [
        ["convert", k, "--to", "diffusers", "--out", str(out / "sd1-kohya.diffusers.safetensors"), "--register"],
        ["inspect", k, "--top", "5", "--plot", str(out / "sd1-kohya.heatmap.png")],
        ["diff", k, d, "--top", "5"],
        ["merge", f"{k}:0.8", f"{d}:-0.5", "--rank", "4", "--out", str(out / "merged.safetensors"), "--register"],
        ["sweep", k, "--base", "tiny-sd1", "--prompt", "a portrait", "--alphas", "0,0.5,1", "--seeds", "1,2",
         "--steps", "2", "--size", "64", "--out", str(out / "sweep.png"), "--gif", str(out / "sweep.gif")],
    ]
