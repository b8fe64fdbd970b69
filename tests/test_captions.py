"""`lorahub captions lint`: the caption advice as checks, on generated datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lorahub.errors import LorahubError
from lorahub.train.captions import contains_trigger, lint, style_words, tag_frequency


def img(path: Path, size=(64, 64), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def codes(rep, level=None):
    return sorted((f.code, f.file) for f in rep.findings if level is None or f.level == level)


def test_character_every_caption_needs_trigger(tmp_path):
    img(tmp_path / "a.png", seed=1)
    (tmp_path / "a.txt").write_text("ohwx girl, teal eyes, long teal hair")
    img(tmp_path / "b.jpg", seed=2)
    (tmp_path / "b.txt").write_text("a girl with teal eyes, white skirt")
    img(tmp_path / "c.webp", seed=3)
    (tmp_path / "c.txt").write_text("OHWX, flying through the air")
    img(tmp_path / "d.png", seed=4)
    (tmp_path / "d.txt").write_text("ohwxgirl sitting")   # not the whole word
    rep = lint(tmp_path, type="character", trigger="ohwx", min_size=32)
    assert rep.images == 4 and rep.captioned == 4
    assert codes(rep, "error") == [("missing-trigger", "b.jpg"), ("missing-trigger", "d.png")]
    # other types: the same finding is only a warning; style: not checked at all
    rep = lint(tmp_path, type="clothing", trigger="ohwx", min_size=32)
    assert codes(rep, "error") == [] and len(codes(rep, "warning")) == 2
    assert codes(lint(tmp_path, type="style", trigger="ohwx", min_size=32)) == []


def test_style_words_warned_for_style_loras(tmp_path):
    img(tmp_path / "a.png", seed=1)
    (tmp_path / "a.txt").write_text("An illustration of a castle on a hill, sunset")
    img(tmp_path / "b.png", seed=2)
    (tmp_path / "b.txt").write_text("a photo of a dog, oil painting")
    img(tmp_path / "c.png", seed=3)
    (tmp_path / "c.txt").write_text("a woman with a short hairstyle, red coat, street")  # 'style' inside a word
    rep = lint(tmp_path, type="style", min_size=32)
    found = {f.file: f.message for f in rep.findings if f.code == "style-word"}
    assert set(found) == {"a.png", "b.png"}
    assert "an illustration of" in found["a.png"]
    assert "a photo of" in found["b.png"] and "oil painting" in found["b.png"]
    assert not rep.errors
    # the same captions are fine for a character LoRA (no style-word check)
    assert "style-word" not in {c for c, _ in codes(lint(tmp_path, type="character", min_size=32))}
    assert style_words("Painting of flowers") == ["painting"]
    assert style_words("a painted fence") == []


def test_missing_empty_duplicates_unreadable_small_orphans(tmp_path):
    img(tmp_path / "a.png", seed=1)
    (tmp_path / "a.txt").write_text("sks, red")
    img(tmp_path / "b.png", seed=1)              # same pixels as a.png
    (tmp_path / "b.txt").write_text("   \n")      # empty
    img(tmp_path / "c.png", seed=2)              # no caption
    img(tmp_path / "d.png", size=(20, 40), seed=3)
    (tmp_path / "d.txt").write_text("SKS,  red")  # same caption as a (case/space-insensitive)
    (tmp_path / "e.png").write_bytes(b"not an image at all")
    (tmp_path / "e.txt").write_text("sks")
    (tmp_path / "orphan.txt").write_text("sks")
    rep = lint(tmp_path, type="object", trigger="sks", min_size=32)
    assert codes(rep, "error") == [("unreadable-image", "e.png")]
    assert codes(rep, "warning") == sorted([
        ("duplicate-caption", "d.png"), ("duplicate-image", "b.png"), ("empty-caption", "b.png"),
        ("missing-caption", "c.png"), ("orphan-caption", "orphan.txt"), ("too-small", "d.png")])
    assert rep.images == 5 and rep.captioned == 2


def test_empty_folder_and_bad_input(tmp_path):
    rep = lint(tmp_path)
    assert codes(rep, "error") == [("no-images", None)]
    with pytest.raises(LorahubError, match="not a folder"):
        lint(tmp_path / "nope")
    with pytest.raises(LorahubError, match="unknown type"):
        lint(tmp_path, type="weapon")


def test_helpers():
    assert contains_trigger("a photo of <s1> toy", "<s1>")
    assert not contains_trigger("a photo of <s12> toy", "<s1>")
    assert contains_trigger("Arcane Style, 1girl", "arcane style|arcane")
    assert tag_frequency(["a, b", "b , c", ""]) == {"b": 2, "a": 1, "c": 1}


def test_cli_lint_json_and_exit_codes(tmp_path, cli):
    img(tmp_path / "a.png", seed=1)
    (tmp_path / "a.txt").write_text("a girl")
    r = cli("captions", "lint", str(tmp_path), "--type", "character", "--trigger", "ohwx", "--json",
            "--min-size", "32")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert rep["errors"] == 1 and rep["findings"][0]["code"] == "missing-trigger"
    (tmp_path / "a.txt").write_text("ohwx, a girl")
    r = cli("captions", "lint", str(tmp_path), "--type", "character", "--trigger", "ohwx")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "too-small" in r.stdout and "1 image(s), 1 captioned: 0 error(s), 1 warning(s)" in r.stdout
    r = cli("captions", "lint", str(tmp_path), "--trigger", "ohwx", "--min-size", "32", "--strict")
    assert r.returncode == 0
    r = cli("captions", "lint", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not a folder" in r.stderr and "Traceback" not in r.stderr
