"""Registering what a workflow made, with where it came from: :func:`register_derived`.

Every workflow that writes a new LoRA or model (convert, extract, resize, merge, bake, train, pull)
registers it here, so that the lineage rows (``lorahub show``, ``lorahub merge --from``, model cards)
are written one way. Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lorahub.errors import LorahubError
from lorahub.formats.families import is_family
from lorahub.vocab import RELATIONS


@dataclass
class Parent:
    """One parent of a derived entry.

    ``ref``: a registry entry (dict), an entry id, a file's SHA-256 (a file that is not registered), or
    another reference (a model's BLAKE3, ``repo@commit``). ``detail``: facts about this parent.
    """

    ref: dict | str
    detail: dict = field(default_factory=dict)


def register_derived(registry, path: str | os.PathLike, *, relation: str, parents: list[Parent | dict | str],
                     detail: dict | None = None, name: str | None = None, type: str | None = None,
                     triggers: list[str] | None = None, tags: list[str] | None = None, base: str | None = None,
                     description: str | None = None, source: str | None = None, extra: dict | None = None,
                     sidecars: bool = True) -> tuple[dict, bool]:
    """Register the file ``path`` (copied into the store) with one lineage row per parent.

    ``relation``: one of :data:`lorahub.vocab.RELATIONS`. ``detail``: facts shared by every parent,
    stored after each parent's own (``lorahub show`` prints the first few). ``base``: a family
    (sd1 | sd2 | sdxl | sd3 | flux | other:<name>); anything else leaves the registry's own detection. Returns ``(entry, created)``;
    when the file was registered already without this relation, the lineage is added to it.
    """
    if relation not in RELATIONS:
        raise LorahubError(f"unknown lineage relation {relation!r} (one of {', '.join(RELATIONS)})")
    items = []
    for p in parents:
        p = p if isinstance(p, Parent) else Parent(p)
        items.append({"relation": relation, "parent": p.ref, "detail": {**p.detail, **(detail or {})}})
    entry, created = registry.add_file(path, name=name, type=type, triggers=triggers or None, tags=tags or None,
                                       base=base if is_family(base) else None, description=description,
                                       source=source, lineage=items, extra=extra, sidecars=sidecars)
    if not created and not any(r.get("relation") == relation for r in registry.lineage(entry["id"])):
        registry.add_lineage(entry["id"], items)
    return entry, created
