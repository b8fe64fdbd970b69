"""lorahub: catalogue, inspect, create and share LoRA adapters for Stable Diffusion-family models.

The Python API (see docs/api.md). Every workflow of the ``lorahub`` command is a function here, in
API terms, returning a typed result whose ``to_dict()`` is what ``--json`` prints::

    import lorahub

    res = lorahub.extract("tiny-sd1", "my-finetune/", rank=16, out="mine.safetensors")
    merged = lorahub.merge(lorahub.Recipe([lorahub.RecipeLora("a.safetensors", 0.8),
                                           lorahub.RecipeLora("b.safetensors", 0.5)], rank=16),
                           out="ab.safetensors")
    print(lorahub.inspect("ab.safetensors").report["rank"])

References (``ref``) are files or registry references (id, name, hash prefix); ``registry`` is an open
:class:`Registry`, a home folder, or None for the default home (``$LORAHUB_HOME`` or ``~/.lorahub``),
opened only when a reference needs it. Names are imported on first use (PEP 562), so ``import
lorahub`` loads neither torch nor numpy.
"""

from __future__ import annotations

import importlib

from lorahub.errors import (  # noqa: F401  (re-exported)
    Ambiguous, FormatError, LorahubError, NotFound, OutputExists, UnsafeFile)

__version__ = "0.1.0"

# public name -> "module:attribute"
_API = {
    # the registry (add_file, add_many, search, resolve, lineage, ... are its methods)
    "Registry": "lorahub.registry:Registry",
    # LoRA files
    "LoraModel": "lorahub.formats.canonical:LoraModel",
    "LoraLayer": "lorahub.formats.canonical:LoraLayer",
    "load_lora": "lorahub.formats.io:load_lora",
    "save_lora": "lorahub.formats.io:save_lora",
    "detect": "lorahub.formats.detect:detect",
    "convert": "lorahub.ops.convert:convert",
    "ConvertResult": "lorahub.ops.convert:ConvertResult",
    # references and lineage
    "resolve_lora": "lorahub.refs:resolve_lora",
    "resolve_model": "lorahub.refs:resolve_model",
    "parse_weighted": "lorahub.refs:parse_weighted",
    "register_derived": "lorahub.lineage:register_derived",
    "Parent": "lorahub.lineage:Parent",
    # looking at LoRAs
    "inspect": "lorahub.ops.inspect:inspect_lora",
    "InspectResult": "lorahub.ops.inspect:InspectResult",
    "diff": "lorahub.ops.diff:diff_loras",
    "DiffResult": "lorahub.ops.diff:DiffResult",
    # making LoRAs
    "extract": "lorahub.ops.extract:extract_lora",
    "ExtractResult": "lorahub.ops.extract:ExtractResult",
    "resize": "lorahub.ops.resize:resize_lora",
    "ResizeResult": "lorahub.ops.resize:ResizeResult",
    "RankCriteria": "lorahub.linalg.rank:RankCriteria",
    "Recipe": "lorahub.ops.recipe:Recipe",
    "RecipeLora": "lorahub.ops.recipe:RecipeLora",
    "load_recipe": "lorahub.ops.recipe:load_recipe",
    "parse_recipe": "lorahub.ops.recipe:parse_recipe",
    "inline_recipe": "lorahub.ops.recipe:inline_recipe",
    "merge": "lorahub.ops.recipe:merge_recipe",
    "rerun_merge": "lorahub.ops.recipe:rerun_recipe",
    "bake": "lorahub.ops.recipe:bake_loras",
    "RecipeResult": "lorahub.ops.recipe:RecipeResult",
    "train_lora": "lorahub.train:train_lora",
    # seeing what a LoRA does
    "sweep": "lorahub.ops.sweep:sweep",
    "SweepResult": "lorahub.ops.sweep:SweepResult",
    "render": "lorahub.ops.sweep:render",
    "RenderResult": "lorahub.ops.sweep:RenderResult",
    # sharing
    "push": "lorahub.hub.push:push",
    "PushResult": "lorahub.hub.push:PushResult",
    "pull": "lorahub.hub.pull:pull",
    "PullResult": "lorahub.hub.pull:PullResult",
    "search_hub": "lorahub.hub.pull:search",
    "list_hub_repo": "lorahub.hub.pull:list_repo",
    # the web gallery (``lorahub serve``)
    "GalleryServer": "lorahub.web.server:GalleryServer",
    "RepoListing": "lorahub.hub.pull:RepoListing",
}

__all__ = ["open_registry", "__version__", "LorahubError", "NotFound", "Ambiguous", "FormatError",
           "UnsafeFile", "OutputExists"]
__all__ += sorted(_API)


def open_registry(home=None):
    """Open (creating if needed) the registry at ``home`` (default ``$LORAHUB_HOME`` or ``~/.lorahub``).
    Use it as a context manager, or call ``close()``."""
    from lorahub.registry import Registry

    return Registry.open(home)


def __getattr__(name: str):
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'lorahub' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
