"""Which files of a Hub repo are its LoRAs: decided from evidence, not from file names alone.

Evidence, in order:

1. **Where a file is.** The LoRAs of a repo are its top-level files. Subfolders are looked at only when
   the top level holds no LoRA or embedding; ``checkpoint-*`` folders (what diffusers' training scripts
   upload next to the final weights: ``checkpoint-500/``, ``checkpoint-1000/``) hold intermediate
   training states and are taken only when asked for by file name or pattern. Pipeline folders
   (``unet/``, ``text_encoder/``, …) and full-model files are never LoRAs.
2. **What the header says.** Every candidate's safetensors header is read (online: a range request, no
   download): full checkpoints are left out, and the kind, format and ranks are known before downloading.
3. **What a lorahub card says.** A card lorahub wrote lists every file with its SHA-256 and role: a file
   recorded as a converted copy of another file of the repo (and still holding the recorded bytes) is
   not registered in place of its original.
4. **Equal ΔW.** Two LoRA files of the same kind, layer count and ranks are compared by their weight
   updates, from the factors (r×r products per layer, no out×in matrix): when ΔW is the same (relative
   difference under :data:`SAME_DELTA_TOL`), they are one LoRA in two dialects and one is registered.
   Two LoRAs that merely sit side by side are both registered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from lorahub.errors import LorahubError, NotFound, UnsafeFile
from lorahub.vocab import PICKLE_SUFFIXES

PIPELINE_DIRS = {"unet", "text_encoder", "text_encoder_2", "vae", "transformer", "safety_checker",
                 "feature_extractor", "tokenizer", "tokenizer_2", "scheduler", "controlnet"}
FULL_MODEL_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
SAME_DELTA_TOL = 5e-3   # ‖ΔW_a − ΔW_b‖_F / max(‖ΔW_a‖_F, ‖ΔW_b‖_F): fp16 round-trips stay far below it


def in_checkpoint_dir(path: str) -> bool:
    """The file lies in an intermediate training checkpoint folder (``checkpoint-500/…``)."""
    return any(p.startswith("checkpoint-") for p in path.split("/")[:-1])


def is_candidate(path: str) -> bool:
    """A .safetensors file that may be a LoRA or an embedding (not a pipeline part, not a full model)."""
    if not path.lower().endswith(".safetensors"):
        return False
    parts = path.split("/")
    return not any(p in PIPELINE_DIRS for p in parts[:-1]) and parts[-1] not in FULL_MODEL_NAMES


def is_pickle(path: str) -> bool:
    parts = path.split("/")
    return path.lower().endswith(PICKLE_SUFFIXES) and not any(p in PIPELINE_DIRS for p in parts[:-1])


def folder_label(path: str) -> str:
    """``checkpoint-500`` for ``checkpoint-500/pytorch_lora_weights.safetensors`` ('' at the top)."""
    return "-".join(PurePosixPath(path).parts[:-1])


@dataclass
class Choice:
    """What a pull takes: ``chosen`` paths, ``skipped`` ({file, why}), the header ``detections``,
    the ``pairs`` of chosen LoRAs to compare by ΔW once downloaded, and the card's record of each file."""

    chosen: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    detections: dict = field(default_factory=dict)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    marked: dict = field(default_factory=dict)

    def skip(self, path: str, why: str) -> None:
        if path in self.chosen:
            self.chosen.remove(path)
        if all(s["file"] != path for s in self.skipped):
            self.skipped.append({"file": path, "why": why})


def _pickle_refusal(repo: str, commit: str, pickles: list[str]) -> UnsafeFile:
    names = ", ".join(pickles[:4]) + (f" (+{len(pickles) - 4} more)" if len(pickles) > 4 else "")
    return UnsafeFile(f"pull: {repo}@{commit[:12]} has its weights only as pickle files ({names}); lorahub never "
                      "unpickles downloaded files -- ask for a .safetensors version")


def choose(src, *, file: str | None = None, include: list[str] | None = None, marker: dict | None = None) -> Choice:
    """Decide which files of ``src`` (a :class:`~lorahub.hub.repo.RepoSource`) are registered.

    ``file``: exactly this file; ``include``: the files matching these glob patterns (``*`` crosses
    folders: ``checkpoint-*/*.safetensors``), checkpoint folders included; neither: the repo's LoRAs
    by the rules of this module. Raises NotFound / UnsafeFile when nothing can be taken.
    """
    marker = marker or {}
    paths = sorted(src.files)
    ch = Choice()
    where = f"{src.repo}@{src.commit[:12]}"
    if file is not None:
        src.require(file)
        if file.lower().endswith(PICKLE_SUFFIXES):
            raise _pickle_refusal(src.repo, src.commit, [file])
        if not file.lower().endswith(".safetensors"):
            raise LorahubError(f"pull: {file}: only .safetensors files are pulled (pickles are never loaded)")
        stages = [[file]]
    elif include:
        from huggingface_hub.utils import filter_repo_objects

        matched = list(filter_repo_objects(paths, allow_patterns=list(include)))
        stages = [[p for p in matched if p.lower().endswith(".safetensors")]]
        if not stages[0]:
            pick = [p for p in matched if is_pickle(p)]
            if pick:
                raise _pickle_refusal(src.repo, src.commit, pick)
            have = ", ".join(p for p in paths if is_candidate(p))[:300] or "none"
            raise NotFound(f"pull: no .safetensors file of {where} matches {', '.join(include)} "
                           f"(safetensors files: {have})")
    else:
        cands = [p for p in paths if is_candidate(p)]
        top = [p for p in cands if "/" not in p]
        sub = [p for p in cands if "/" in p and not in_checkpoint_dir(p)]
        ckpt = [p for p in cands if in_checkpoint_dir(p)]
        stages = [top, sub]
        for p in ckpt:
            ch.skipped.append({"file": p, "why": "an intermediate training checkpoint (take it by file name or "
                                                 "include pattern)"})
    for i, stage in enumerate(stages):
        for p in stage:
            ch.detections[p] = src.header(p)
        usable = [p for p in stage if ch.detections[p].kind != "checkpoint"]
        for p in stage:
            if p not in usable:
                if file is not None:
                    raise LorahubError(f"pull: {file} is a full checkpoint, not a LoRA or embedding")
                ch.skipped.append({"file": p, "why": "a full checkpoint, not a LoRA"})
        if usable:
            ch.chosen = usable
            for later in stages[i + 1:]:
                for p in later:
                    ch.skipped.append({"file": p, "why": "in a subfolder; the repo's top level holds its LoRA"})
            break
    if not ch.chosen:
        ckpts = sorted({folder_label(s["file"]) for s in ch.skipped if in_checkpoint_dir(s["file"])})
        if ckpts:
            raise NotFound(f"pull: {where} holds only intermediate training checkpoints ({', '.join(ckpts[:6])}); "
                           "choose one by file name or include pattern")
        pick = [p for p in paths if is_pickle(p) and not in_checkpoint_dir(p)]
        if pick:
            raise _pickle_refusal(src.repo, src.commit, pick)
        if any(s["why"].startswith("a full checkpoint") for s in ch.skipped):
            raise NotFound(f"pull: {where} has no LoRA or embedding file (only checkpoints)")
        raise NotFound(f"pull: {where} has no LoRA or embedding .safetensors file")
    ch.marked = {p: marker[p] for p in ch.chosen if p in marker}
    _apply_marker(src, ch, marker)
    ch.pairs = _same_shape_pairs(ch)
    return ch


def _apply_marker(src, ch: Choice, marker: dict) -> None:
    """Leave out the files a lorahub card records as converted copies of another chosen file."""
    by_sha = {src.files[p].sha256: p for p in ch.chosen if src.files[p].sha256}
    for p in list(ch.chosen):
        m = marker.get(p)
        if m is None or m.role != "converted":
            continue
        orig = by_sha.get(m.from_sha256)
        holds = m.sha256 is None or m.sha256 == src.files[p].sha256   # None: a card of an earlier version
        if orig is not None and orig != p and holds:
            ch.skip(p, f"a copy of {orig} converted by lorahub ({m.dialect or 'another'} key names), per the card")


def _same_shape_pairs(ch: Choice) -> list[tuple[str, str]]:
    """Pairs of chosen LoRAs that could be one LoRA in two dialects (same kind, layers, ranks)."""
    def sig(p):
        d = ch.detections[p]
        return (d.kind, d.n_layers, d.rank_min, d.rank_max, tuple(sorted(d.parts)))

    loras = [p for p in ch.chosen if ch.detections[p].kind != "textual-inversion"]
    return [(a, b) for i, a in enumerate(loras) for b in loras[i + 1:] if sig(a) == sig(b)]


def delta_difference(a, b) -> float | None:
    """‖ΔW_a − ΔW_b‖_F / max(‖ΔW_a‖_F, ‖ΔW_b‖_F) over all layers of two LoraModels, from the
    factors where both layers are plain LoRA (‖A−B‖² = ‖A‖² + ‖B‖² − 2⟨A, B⟩, r×r products);
    None when they adapt different layers or shapes."""
    import torch

    from lorahub.linalg import lowrank
    from lorahub.ops.inspect import as_factors

    if set(a.layers) != set(b.layers) or not a.layers:
        return None
    na2 = nb2 = ab = 0.0
    for key, la in a.layers.items():
        lb = b.layers[key]
        fa, fb = as_factors(la), as_factors(lb)
        try:
            if fa is not None and fb is not None:
                ua, da = lowrank.as_matrices(fa[0].to(torch.float64), fa[1].to(torch.float64))
                ub, db = lowrank.as_matrices(fb[0].to(torch.float64), fb[1].to(torch.float64))
                na2 += lowrank.frobenius_norm(ua, da, fa[2], dtype=torch.float64) ** 2
                nb2 += lowrank.frobenius_norm(ub, db, fb[2], dtype=torch.float64) ** 2
                ab += lowrank.inner_product(ua, da, ub, db, fa[2], fb[2], dtype=torch.float64)
            else:
                x = la.delta(torch.float64).reshape(-1)
                y = lb.delta(torch.float64).reshape(-1)
                if x.shape != y.shape:
                    return None
                na2 += float(x @ x)
                nb2 += float(y @ y)
                ab += float(x @ y)
        except (ValueError, RuntimeError, KeyError):
            return None
    scale = max(na2, nb2)
    if scale == 0.0:
        return 0.0
    return max(0.0, na2 + nb2 - 2.0 * ab) ** 0.5 / scale ** 0.5


def _keep_first(a: str, b: str, ch: Choice) -> bool:
    """Of two files with the same ΔW, whether ``a`` is the one to register: the card's original, else
    the one carrying training metadata, else the one not named like diffusers' output."""
    def rank(p):
        m = ch.marked.get(p)
        meta = ch.detections[p].metadata
        trained = any(k.startswith(("ss_", "modelspec.")) for k in meta)
        return (m is not None and m.role == "original", trained, PurePosixPath(p).name != DIFFUSERS_NAME)

    return rank(a) >= rank(b)


def resolve_pairs(ch: Choice, load) -> None:
    """Compare every candidate pair by ΔW (``load(path)`` gives its LoraModel) and leave out the
    second of each pair that holds the same weights."""
    cache: dict = {}

    def model(p):
        if p not in cache:
            cache[p] = load(p)
        return cache[p]

    for a, b in ch.pairs:
        if a not in ch.chosen or b not in ch.chosen:
            continue
        try:
            rel = delta_difference(model(a), model(b))
        except LorahubError:
            rel = None
        if rel is not None and rel < SAME_DELTA_TOL:
            keep, drop = (a, b) if _keep_first(a, b, ch) else (b, a)
            ch.skip(drop, f"the same LoRA as {keep} in another dialect (ΔW differs by {rel:.1e})")


def entry_name(repo: str, path: str, det, n_embeddings: int) -> str | None:
    """The registry name for a pulled file, when its file name says nothing: diffusers' output
    (``pytorch_lora_weights``) and textual-inversion output (``learned_embeds``) are named after the
    repo (and the folder they lie in); None keeps the file's own name."""
    stem = PurePosixPath(path).name.rsplit(".", 1)[0]
    generic = stem == DIFFUSERS_NAME.rsplit(".", 1)[0] or (
        det.kind == "textual-inversion" and re.fullmatch(r"learned_embeds(?:[-_].*)?", stem) is not None)
    if not generic:
        return None
    name = repo.split("/")[1]
    folder = folder_label(path)
    if folder:
        name = f"{name}-{folder}"
    if det.kind == "textual-inversion" and n_embeddings > 1 and stem != "learned_embeds":
        name = f"{name}-{stem}"
    return name
