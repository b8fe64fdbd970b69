"""Pickled files: read with torch.load(weights_only=True) only; anything that is not plain tensors is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorahub.errors import UnsafeFile
from lorahub.formats import names
from lorahub.formats.detect import detect
from lorahub.formats.io import load_lora, save_lora


def test_cloneofsimo_pt_list(tmp_path):
    a = names.get_arch("tiny-sd1")
    order = names.cloneofsimo_order(a, "unet")
    g = torch.Generator().manual_seed(0)
    flat = []
    for n in order:
        out, inn = a.modules[n]
        flat += [torch.randn(out, 2, generator=g), torch.randn(2, inn, generator=g)]
    p = tmp_path / "lora.pt"
    torch.save(flat, p)
    d = detect(p)
    assert (d.format, d.rank, d.n_layers) == ("cloneofsimo", 2, len(order))
    m = load_lora(p)
    assert m.arch == "tiny-sd1" and list(m.layers) == order
    assert torch.equal(m.layers[order[3]].up, flat[6]) and torch.equal(m.layers[order[3]].down, flat[7])
    back = load_lora(save_lora(m, tmp_path / "k.safetensors", "kohya"))
    assert all(torch.equal(back.layers[n].up, m.layers[n].up) for n in order)


def test_webui_pt_embedding(tmp_path):
    emb = torch.randn(3, 768)
    p = tmp_path / "mytoken.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": emb},
                "name": "mytoken", "step": 500}, p)
    d = detect(p)
    assert (d.kind, d.base, d.tokens) == ("textual-inversion", "sd1", ["mytoken"])
    m = load_lora(p)
    assert list(m.embeddings) == ["mytoken"] and torch.equal(m.embeddings["mytoken"]["clip_l"], emb)
    out = save_lora(m, tmp_path / "e.safetensors", "diffusers")
    assert torch.equal(load_lora(out).embeddings["mytoken"]["clip_l"], emb)


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    p = tmp_path / "evil.pt"
    torch.save({"unet:0:up": torch.zeros(1), "x": Evil()}, p)
    with pytest.raises(UnsafeFile):
        detect(p)
    with pytest.raises(UnsafeFile):
        load_lora(p)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- hostile pickles
def _rezip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return path


def _members(path: Path) -> list[tuple[str, bytes]]:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return [(n, z.read(n)) for n in z.namelist()]


def _memo_bomb(levels: int, leaf) -> object:
    """A list whose every level holds the level below twice: 2**levels paths, a few bytes per level
    once pickled (the pickle memo references the one object)."""
    x = [leaf]
    for _ in range(levels):
        x = [x, x]
    return x


def _one_error_line(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    return lines[0]


def test_a_few_hundred_byte_memo_bomb_is_refused_at_once(tmp_path, cli, home):
    import pickle

    # no torch needed: a zip with archive/data.pkl whose 60 levels reference one list 2**60 times
    raw = pickle.dumps({"x": _memo_bomb(60, "leaf")}, protocol=2)
    p = _rezip(tmp_path / "bomb.pt", [("archive/data.pkl", raw), ("archive/version", b"3\n")])
    assert p.stat().st_size < 1000
    torch_bomb = tmp_path / "bomb_tensors.pt"
    torch.save({"lora_unet_x.lora_up.weight": _memo_bomb(40, torch.zeros(2, 2))}, torch_bomb)
    # add, scan, inspect and convert all read a pickle through detect(): add (no torch) and inspect show it
    for args in (("add", p), ("add", torch_bomb), ("inspect", torch_bomb)):
        line = _one_error_line(cli(*args, home=home, timeout=60))
        assert "pickle" in line, line


@pytest.mark.parametrize("leaf, words", [(torch.zeros(1), "several places"), ("text", "no tensors")])
def test_memo_bomb_within_the_depth_limit(tmp_path, cli, home, leaf, words):
    """30 levels (under MAX_PICKLE_DEPTH): the walk must be memo-aware, not visit 2**30 paths."""
    p = tmp_path / "b.pt"
    torch.save({"w": _memo_bomb(30, leaf)}, p)
    line = _one_error_line(cli("add", p, home=home, timeout=60))
    assert words in line, line


def test_shared_containers_without_tensors_are_fine(tmp_path):
    """An optimizer's param groups share their ``betas`` tuple: a memo reference, no tensors inside."""
    from lorahub.formats.pickle_safe import read_pickle_shapes

    betas = (0.9, 0.999)
    groups = [{"betas": betas, "lr": 1e-4}, {"betas": betas, "lr": 1e-5}]
    t = torch.zeros(3, 4)
    p = tmp_path / "ckpt.pt"
    torch.save({"string_to_param": {"*": t}, "tied": t, "optimizer": {"param_groups": groups}, "name": "tok"}, p)
    stubs, strings = read_pickle_shapes(p)
    assert {k: s.shape for k, s in stubs.items()} == {"string_to_param.*": (3, 4), "tied": (3, 4)}
    assert strings == {"name": "tok"}


def test_pickle_check_reads_exactly_what_torch_loads(tmp_path):
    from lorahub.formats.pickle_safe import read_pickle_shapes

    sd = {"a.lora_up.weight": torch.zeros(4, 2), "a.lora_down.weight": torch.zeros(2, 8), "n": "x"}
    p = tmp_path / "ok.pt"
    torch.save(sd, p)
    stubs, _ = read_pickle_shapes(p)
    loaded = torch.load(p, weights_only=True)
    assert {k: s.shape for k, s in stubs.items()} == {k: tuple(v.shape) for k, v in loaded.items()
                                                      if isinstance(v, torch.Tensor)}


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_archives_with_more_than_one_candidate_pickle_are_refused(tmp_path):
    import pickle

    from lorahub.errors import FormatError
    from lorahub.formats.pickle_safe import read_pickle_shapes

    good = tmp_path / "good.pt"
    torch.save({"x.lora_up.weight": torch.zeros(2, 2)}, good)
    members = _members(good)
    folder = members[0][0].split("/")[0]
    benign = pickle.dumps({"nothing": "here"}, protocol=2)
    cases = {
        # a decoy sorted first, named like the old check's "*data.pkl"; torch loads <folder>/data.pkl
        "decoy": [(f"{folder}/xdata.pkl", benign)] + members,
        # the same member name twice: zip readers disagree on which one wins
        "duplicate": members + [(f"{folder}/data.pkl", benign)],
        "duplicate_first": [(f"{folder}/data.pkl", benign)] + members,
        # TorchScript: torch.load(weights_only=True) refuses it, and so does lorahub
        "torchscript": members + [(f"{folder}/constants.pkl", benign)],
    }
    for label, entries in cases.items():
        p = _rezip(tmp_path / f"{label}.pt", entries)
        with pytest.raises(UnsafeFile):
            read_pickle_shapes(p)
        with pytest.raises(UnsafeFile):
            detect(p)
    # members outside the archive folder, or data.pkl in another folder: torch refuses these, lorahub too
    for label, entries in {"outside": members + [("other/data.pkl", benign)],
                           "no_folder": [(n.split("/", 1)[1], d) for n, d in members]}.items():
        p = _rezip(tmp_path / f"{label}.pt", entries)
        with pytest.raises(FormatError):
            read_pickle_shapes(p)
        with pytest.raises(Exception):
            torch.load(p, weights_only=True)


def test_zip_that_torch_treats_as_a_legacy_pickle_is_refused(tmp_path):
    """torch.load decides "zip" from the first four bytes; zipfile finds an archive anywhere. A file that
    starts otherwise is a legacy pickle to torch, whatever zip it carries at the end."""
    good = tmp_path / "good.pt"
    torch.save({"x.lora_up.weight": torch.zeros(2, 2)}, good)
    p = tmp_path / "prefixed.pt"
    p.write_bytes(b"\x80\x02}q\x00." + good.read_bytes())
    import zipfile

    assert zipfile.is_zipfile(p)
    from lorahub.formats.pickle_safe import read_pickle_shapes

    with pytest.raises(UnsafeFile, match="legacy"):
        read_pickle_shapes(p)
    with pytest.raises(UnsafeFile, match="legacy"):
        detect(p)
