"""Hostile input through the CLI (issue #13 items 6, 7, 10, 11; #19 item 2).

Every crafted file or argument gives one ``error:`` line and exit code 2 (never "internal error" or a
traceback), or is taken with a note when only a sidecar/preview is bad; `scan` reports a bad file and
registers the rest; names and metadata print as text (no Rich markup, no terminal escapes); no number
option takes NaN or an infinity; the LoRA type is filled from the evidence the files carry.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import struct
import typing
from pathlib import Path

import pytest

from lorahub.tiny_loras import kohya_file, kohya_tensors, save_tensors, SD1_CROSS_K


def _split(path: Path) -> tuple[dict, bytes]:
    b = path.read_bytes()
    n = int.from_bytes(b[:8], "little")
    return json.loads(b[8:8 + n]), b[8 + n:]


def _write(path: Path, header: dict | str | bytes, data: bytes) -> Path:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _with_meta(path: Path, meta: dict[str, str]) -> Path:
    """A valid kohya file at ``path`` whose metadata is replaced by ``meta`` (written as is)."""
    kohya_file(path)
    h, data = _split(path)
    h["__metadata__"] = meta
    return _write(path, h, data)


def _one_error(code: int, out: str, err: str) -> str:
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


DEEP_OBJ = '{"a":' * 100_000 + "1" + "}" * 100_000
DEEP_LIST = "[" * 100_000 + "]" * 100_000


def _hostile_files(d: Path) -> dict[str, tuple[Path, str]]:
    """label -> (file, a word the error must contain)."""
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, str]] = {}

    def meta_case(label, meta, word):
        out[label] = (_with_meta(d / f"{label}.safetensors", meta), word)

    meta_case("deep_tag_frequency", {"ss_tag_frequency": DEEP_OBJ}, "nested")
    meta_case("deep_cover_images", {"ssmd_cover_images": DEEP_LIST}, "nested")
    meta_case("deep_lorahub", {"lorahub": DEEP_OBJ}, "nested")
    meta_case("tag_infinity", {"ss_tag_frequency": '{"1_x": {"a": Infinity, "b": 1}}'}, "non-finite")
    meta_case("tag_nan", {"ss_tag_frequency": '{"1_x": {"a": NaN}}'}, "non-finite")
    meta_case("tag_4000_digits", {"ss_tag_frequency": '{"1_x": {"a": 1' + "0" * 4000 + "}}"}, "digits")
    meta_case("tag_float_overflow", {"ss_tag_frequency": '{"1_x": {"a": 1e999}}'}, "range")

    kohya_file(d / "src.safetensors")
    h, data = _split(d / "src.safetensors")
    (d / "src.safetensors").unlink()
    key = next(k for k in h if k != "__metadata__")
    bad = json.loads(json.dumps(h))
    bad[key]["dtype"] = ["F32"]
    out["dtype_list"] = (_write(d / "dtype_list.safetensors", bad, data), "dtype")
    out["trailing_bytes"] = (_write(d / "trailing.safetensors", h, data + b"\0" * 16), "trailing")
    # a gap: the first tensor moved 4 bytes on (the file grows by 4, every other tensor keeps its place)
    gap = json.loads(json.dumps(h))
    for k in gap:
        if k != "__metadata__":
            gap[k]["data_offsets"] = [o + 4 for o in gap[k]["data_offsets"]]
    out["gap"] = (_write(d / "gap.safetensors", gap, b"\0" * 4 + data), "belong to no tensor")
    # duplicate key: an out-of-bounds copy first, the valid description last (json keeps the last one)
    raw = json.dumps(h)
    oob = json.dumps({key: {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 4 * 10**6]}})[1:-1]
    out["duplicate_key"] = (_write(d / "dup.safetensors", "{" + oob + ", " + raw[1:], data), "duplicate")
    # a lone surrogate smuggled in by a JSON escape
    out["surrogate"] = (_write(d / "surrogate.safetensors", raw[:-1] + ', "__metadata__": {"x": "\\ud800"}}', data),
                        "unicode")
    many = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(100_001)}
    out["too_many_tensors"] = (_write(d / "many.safetensors", many, b""), "100000 tensors")
    out["metadata_too_large"] = (_with_meta(d / "bigmeta.safetensors", {"x": "a" * (17 * 1024 * 1024)}), "metadata")
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return _hostile_files(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("label", ["deep_tag_frequency", "deep_cover_images", "deep_lorahub", "tag_infinity",
                                   "tag_nan", "tag_4000_digits", "tag_float_overflow", "dtype_list",
                                   "trailing_bytes", "gap", "duplicate_key", "surrogate", "too_many_tensors",
                                   "metadata_too_large"])
def test_hostile_file_is_refused_with_one_error_line(run, home, hostile, label):
    path, word = hostile[label]
    for args in (("add", path), ("inspect", path), ("convert", path, "--to", "diffusers", "--out",
                                                    path.with_suffix(".out.safetensors"))):
        line = _one_error(*run(*args))
        assert word.lower() in line.lower(), (args[0], line)
    assert not path.with_suffix(".out.safetensors").exists()
    assert not (home / "objects").exists() or not [p for p in (home / "objects").rglob("*") if p.is_file()]


def test_safetensors_itself_refuses_what_lorahub_refuses(hostile):
    """The structural refusals are safetensors' own rules (lorahub must not add what it cannot load)."""
    import safetensors

    for label in ("trailing_bytes", "gap", "surrogate", "dtype_list"):
        with pytest.raises(Exception):
            safetensors.deserialize(hostile[label][0].read_bytes())


def test_zip_magic_is_the_four_bytes_torch_checks(run, home, tmp_path):
    """A safetensors file saved with a pickle suffix whose header length happens to start with the bytes
    "PK" (0x4B50 = 19280) is not a zip archive: torch.load would not take it as one, and neither do detect,
    load_lora nor add (they read it as safetensors)."""
    from lorahub.formats.detect import detect
    from lorahub.formats.io import load_lora

    src = kohya_file(tmp_path / "src.safetensors")
    h, data = _split(src)
    raw = json.dumps(h).encode()
    raw += b" " * (0x4B50 - len(raw))  # safetensors pads headers with spaces
    p = _write(tmp_path / "padded.pt", raw, data)
    assert p.read_bytes()[:4] == b"PK\0\0"
    assert detect(p).format == "kohya"
    assert sorted(load_lora(p).layers) == sorted(load_lora(src).layers)
    assert run("add", p, "--name", "padded")[0] == 0


def test_zero_size_tensor_is_accepted(run, home, tmp_path):
    t = kohya_tensors({SD1_CROSS_K: (320, 768)}, rank=4, alpha=2.0)
    import numpy as np

    t["lora_unet_extra.zero"] = np.zeros((8, 0), np.float32)
    t["lora_unet_extra.empty"] = np.zeros((0,), np.float16)
    p = save_tensors(tmp_path / "zero.safetensors", t)
    code, out, err = run("add", p, "--json")
    assert code == 0, err
    entry = json.loads(out)[0]
    assert entry["created"] and entry["format"] == "kohya"


# ------------------------------------------------------------------------------------- sidecars, images
def _bomb_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bad_sidecars_and_image_bombs_are_ignored_with_a_note(run, home, tmp_path, png_bytes):
    d = tmp_path / "lib"
    bomb = _bomb_png()
    assert len(bomb) < 200_000  # small on disk, 900 megapixels when decoded
    kohya_file(d / "deep_json.safetensors", seed=1)
    (d / "deep_json.json").write_text('{"activation text": ' + DEEP_LIST + "}")
    kohya_file(d / "deep_civitai.safetensors", seed=2)
    (d / "deep_civitai.civitai.info").write_text('{"model": ' + DEEP_OBJ + "}")
    kohya_file(d / "nan_civitai.safetensors", seed=3)
    (d / "nan_civitai.civitai.info").write_text('{"trainedWords": ["x"], "modelId": NaN}')
    kohya_file(d / "preview_bomb.safetensors", seed=4)
    (d / "preview_bomb.preview.png").write_bytes(bomb)
    _with_meta(d / "cover_bomb.safetensors", {"ssmd_cover_images": json.dumps(
        [base64.b64encode(bomb).decode(), base64.b64encode(png_bytes()).decode()])})
    for p in sorted(d.glob("*.safetensors")):
        code, out, err = run("add", p, "--json")
        assert code == 0, (p.name, err)
        e = json.loads(run("show", json.loads(out)[0]["id"], "--json")[1])
        notes = " ".join(e["extra"].get("notes_detect", []))
        if p.stem == "cover_bomb":  # the bomb is left out (the note says why), the good cover kept
            assert "cover preview ignored: image" in notes and "pixel limit" in notes, notes
            assert [pv["width"] for pv in e["previews"]] == [8]
        elif p.stem == "preview_bomb":
            assert "sidecar preview ignored: image" in notes and "pixel limit" in notes and e["previews"] == []
        else:
            assert "ignored" in notes, (p.name, notes)
            assert e["triggers"] == []


def test_read_image_refuses_bombs_and_non_images(png_bytes):
    from lorahub.errors import LorahubError
    from lorahub.metadata import MAX_IMAGE_PIXELS, read_image

    img = read_image(png_bytes(size=(5, 3)))
    assert (img.ext, img.width, img.height) == ("png", 5, 3)
    with pytest.raises(LorahubError, match="pixel"):
        read_image(_bomb_png())
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1  # just over the limit, under PIL's own bomb limit
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    with pytest.raises(LorahubError, match="pixel"):
        read_image(buf.getvalue())
    for junk in (b"", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"%!PS-Adobe-3.0 EPSF-3.0\n"):
        with pytest.raises(LorahubError, match="image"):
            read_image(junk)


# ------------------------------------------------------------------------------------- scan
def test_scan_reports_bad_files_and_registers_the_rest(run, home, hostile, tmp_path, png_bytes):
    d = tmp_path / "mixed"
    d.mkdir()
    for label in ("deep_tag_frequency", "tag_infinity", "dtype_list", "trailing_bytes", "duplicate_key"):
        os.link(hostile[label][0], d / hostile[label][0].name)
    good = [kohya_file(d / f"good{i}.safetensors", seed=10 + i) for i in range(3)]
    (d / "good0.preview.png").write_bytes(_bomb_png())
    (d / "good1.json").write_text(DEEP_LIST)
    code, out, err = run("scan", d, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert sorted(Path(e["name"]).name for e in res["added"]) == ["good0", "good1", "good2"]
    skipped = {Path(s["path"]).name: s["error"] for s in res["skipped"]}
    assert sorted(skipped) == sorted(hostile[lb][0].name for lb in
                                     ("deep_tag_frequency", "tag_infinity", "dtype_list", "trailing_bytes",
                                      "duplicate_key"))
    assert all("\n" not in why and why for why in skipped.values())
    assert not list(home.rglob(".lorahub-tmp-*"))
    assert len(json.loads(run("list", "--json")[1])) == len(good)


def test_scan_skips_a_file_name_that_is_not_utf8(run, home, tmp_path):
    d = tmp_path / "names"
    kohya_file(d / "fine.safetensors", seed=1)
    kohya_file(d / "x.safetensors", seed=2)
    os.rename(d / "x.safetensors", os.fsencode(d) + b"/bad\xff.safetensors")
    code, out, err = run("scan", d, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [e["name"] for e in res["added"]] == ["fine"]
    assert len(res["skipped"]) == 1 and "UTF-8" in res["skipped"][0]["error"]


def test_add_refuses_a_file_name_that_is_not_utf8(run, home, tmp_path):
    kohya_file(tmp_path / "x.safetensors")
    bad = os.fsencode(tmp_path) + b"/bad\xff\xfe.safetensors"
    os.rename(tmp_path / "x.safetensors", bad)
    line = _one_error(*run("add", os.fsdecode(bad)))
    assert "UTF-8" in line and "bad\\xff\\xfe.safetensors" in line


# ------------------------------------------------------------------------------------- registry states
def test_damaged_database_is_an_error_not_a_crash(run, home, tmp_path):
    for i in range(40):  # enough rows for several pages
        kohya_file(tmp_path / f"f{i}.safetensors", seed=i, meta={"ssmd_description": "x" * 2000})
    assert run("scan", tmp_path)[0] == 0
    db = home / "lorahub.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    raw = bytearray(db.read_bytes())
    page = 4096
    assert len(raw) > 8 * page
    n = len(raw) // page  # damage the middle third: the schema opens, the entries and FTS pages are garbage
    raw[n // 3 * page: 2 * n // 3 * page] = b"\x5a" * ((2 * n // 3 - n // 3) * page)
    db.write_bytes(bytes(raw))
    failed = 0
    for args in (("show", "f1"), ("search", "x"), ("list",), ("add", tmp_path / "f0.safetensors")):
        code, out, err = run(*args)
        if code != 0:  # a command that reads no damaged page may still work
            assert "damaged" in _one_error(code, out, err)
            failed += 1
    assert failed >= 3


def test_export_onto_a_folder_and_restore_of_a_tar_are_errors(run, home, tmp_path):
    import tarfile

    p = kohya_file(tmp_path / "k.safetensors")
    assert run("add", p, "--name", "kay")[0] == 0
    dest = tmp_path / "out"
    (dest / "k.safetensors").mkdir(parents=True)  # export names the file after its stem
    for force in ((), ("--force",)):  # not even --force replaces a folder by a file (and says so)
        line = _one_error(*run("export", "kay", dest, *force))
        assert "k.safetensors: is a folder, not a file" in line and "--force" not in line, line
    assert (dest / "k.safetensors").is_dir()
    tar = tmp_path / "backup.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(p, arcname="k.safetensors")
    line = _one_error(*run("restore", tar, "--home", tmp_path / "newhome"))
    assert "backup.tar: not a lorahub backup: a file, and a backup is a folder with manifest.json" in line, line
    assert "(no such folder)" in _one_error(*run("restore", tmp_path / "nothing", "--home", tmp_path / "nh"))
    assert not (tmp_path / "newhome").exists() and not (tmp_path / "nh").exists()


def test_out_of_range_integers_are_refused(run, home):
    line = _one_error(*run("search", "--rank-max", "99999999999999999999"))
    assert "--rank-max" in line and "range" in line


@pytest.mark.parametrize("kwargs, words", [
    ({"rank_max": 10**20}, "rank_max: 100000000000000000000 is out of range"),
    ({"rank_min": -10**20}, "rank_min: -100000000000000000000 is out of range"),
    ({"rank_max": "8"}, "rank_max: '8' is not an integer"),
    ({"rank_min": 4.5}, "rank_min: 4.5 is not an integer"),
    ({"rank_max": True}, "rank_max: True is not an integer"),
    ({"limit": -1}, "limit: -1 is below 0"),
    ({"offset": 2**64}, "offset: 18446744073709551616 is out of range"),
    ({"tags": "style"}, "tags: 'style' is not a list of strings"),
    ({"tags": ["a", 3]}, "tags: ['a', 3] is not a list of strings"),
    ({"type": 5}, "type: 5 is not text"),
])
def test_library_search_checks_its_arguments(home, tmp_path, kwargs, words):
    """Registry.search / search_count refuse what the CLI refuses, with one LorahubError (never an
    OverflowError or a wrong answer)."""
    from lorahub.errors import LorahubError
    from lorahub.registry import Registry

    with Registry.open(home) as reg:
        reg.add_file(kohya_file(tmp_path / "k.safetensors", rank=8))
        with pytest.raises(LorahubError, match=words.replace("[", r"\[").replace("(", r"\(")):
            reg.search(**kwargs)
        if not {"limit", "offset"} & set(kwargs):
            with pytest.raises(LorahubError, match=words.replace("[", r"\[")):
                reg.search_count(**kwargs)
        assert [e["rank"] for e in reg.search(rank_max=8, tags=iter(()))] == [8]  # an iterable of tags is fine


# ------------------------------------------------------------------------------------- numbers
def _option_params(annotation_wanted):
    """(command name, option flag) of every option of every command whose type is ``annotation_wanted``
    (plain, Optional or a List of it), found by introspecting the typer app."""
    import typer

    from lorahub.cli.app import _load_commands, app

    _load_commands()
    command = typer.main.get_command(app)
    found = []
    for info in app.registered_commands:
        name = info.name or info.callback.__name__.replace("_", "-")
        hints = typing.get_type_hints(info.callback, include_extras=True)
        params = {p.name: p for p in command.commands[name].params}
        for pname, hint in hints.items():
            if pname == "return":
                continue
            base = hint.__origin__ if typing.get_origin(hint) is typing.Annotated else hint
            args = set(typing.get_args(base)) | {base}
            args |= {a for x in list(args) for a in typing.get_args(x)}
            if annotation_wanted in args and pname in params and params[pname].opts[0].startswith("-"):
                found.append((name, max(params[pname].opts, key=len)))
    return found


def test_every_float_option_refuses_nan_and_infinity(run, home):
    opts = _option_params(float)
    assert len(opts) >= 10 and ("resize", "--sv-ratio") in opts, opts
    for name, flag in opts:
        for bad in ("nan", "-inf", "1e999"):
            code, out, err = run(name, flag, bad)
            line = _one_error(code, out, err) if code == 2 and err.startswith("error:") else err
            assert code == 2 and flag in line and ("finite" in line or "Invalid value" in line), (name, flag, bad, err)


def test_every_int_option_refuses_values_beyond_64_bits(run, home):
    opts = _option_params(int)
    assert len(opts) >= 10 and ("search", "--rank-max") in opts, opts
    for name, flag in opts:
        code, out, err = run(name, flag, str(2**64))
        assert code == 2 and flag in err and "internal error" not in err, (name, flag, err)


@pytest.mark.parametrize("setting", ["lr = nan", "prior_loss_weight = inf", "rank = -inf", "alpha = +nan"])
def test_train_config_refuses_nan_and_infinity(run, home, tmp_path, setting):
    """TOML has nan/inf literals: a train.toml carrying one is refused with one error naming the setting."""
    from lorahub.errors import LorahubError
    from lorahub.train.config import TrainConfig, build_config

    (tmp_path / "data").mkdir()
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'data_dir = "data"\n{setting}\n')
    key = setting.split()[0]
    with pytest.raises(LorahubError, match=f"'{key}'.*not a finite number"):
        build_config(cfg)
    line = _one_error(*run("train", "--config", cfg, "--no-register"))
    assert key in line and "finite" in line
    with pytest.raises(LorahubError, match="'weight_decay'.*not a finite number"):
        TrainConfig(data_dir="x", weight_decay=float("inf")).validate()


def test_numbers_inside_the_range_still_work(run, home, tmp_path):
    p = kohya_file(tmp_path / "k.safetensors", rank=8)
    assert run("add", p)[0] == 0
    code, out, err = run("search", "--rank-max", "8", "--rank-min", "-5", "--json")
    assert code == 0 and len(json.loads(out)) == 1, err
    out_file = tmp_path / "r.safetensors"
    code, out, err = run("resize", str(p), "--sv-ratio", "1e3", "--out", str(out_file), "--json")
    assert code == 0 and out_file.exists(), err


# ------------------------------------------------------------------------------------- printing
EVIL = ("[link=file:///etc/passwd]pw[/link] [red]RED[/red] [color(123)]C[/] \x1b[31mESC\x1b[0m "
        "\x1b]8;;http://evil.example\x07hl\x1b]8;;\x07 \u202eRTL \x9b31m :smile:")
# what the data would put on a terminal if it were markup or raw: hyperlinks, its colours, blink, a C1 CSI,
# a bidi override, a bell, an emoji code
FORBIDDEN = ("\x1b]8;", "\x1b[38;5;123m", "\x1b[5m", "\x9b", "\u202e", "\x07", "\U0001f604")
FORBIDDEN_STDOUT = FORBIDDEN + ("\x1b[31m", "\x1b[32m", "\x1b[34m")  # the progress bar (stderr) uses colours


def test_names_and_metadata_print_as_text(run, home, tmp_path, monkeypatch):
    meta = {"ssmd_display_name": EVIL, "ssmd_keywords": "[bold]trig[/bold], \x1b[5mblink",
            "ssmd_tags": "[green]tag[/green]", "ssmd_description": EVIL, "ssmd_author": EVIL,
            "ss_tag_frequency": json.dumps({"1_x": {"[blue]t[/blue]": 3, "\x1b[34mq": 3}}),
            "ss_training_comment": EVIL, "modelspec.title": EVIL}
    a = kohya_file(tmp_path / "evil.safetensors", meta=meta)
    b = kohya_file(tmp_path / "evil2.safetensors", meta=meta, seed=3)
    ids = [json.loads(run("add", p, "--json")[1])[0]["id"] for p in (a, b)]
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: force_terminal, colours on
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("NO_COLOR", raising=False)
    outputs = {}
    for args in (("list",), ("search", "trig"), ("show", ids[0]), ("inspect", ids[0]), ("inspect", a),
                 ("diff", ids[0], ids[1]), ("tag", ids[0], "+[red]x[/red]"), ("dupes",)):
        code, out, err = run(*args)
        assert code == 0, (args, err)
        outputs[args[0]] = out
        for bad in FORBIDDEN_STDOUT:
            assert bad not in out, (args, repr(bad), out[:2000])
        for bad in FORBIDDEN:
            assert bad not in err, (args, repr(bad), err[:2000])
    assert "\x1b[1m" in outputs["show"]  # the terminal is really forced: lorahub's own bold is there
    assert "[link=file:///etc/passwd]pw[/link] [red]RED[/red] [color(123)]C[/]" in outputs["show"]
    assert "[bold]trig[/bold]" in outputs["list"] and "\\x1b[5mblink" in outputs["show"]
    assert "\\u202eRTL" in outputs["inspect"] and ":smile:" in outputs["inspect"]
    assert "[blue]t[/blue]" in outputs["inspect"]


def test_json_output_escapes_terminal_controls_but_keeps_the_data(run, home, tmp_path):
    p = kohya_file(tmp_path / "e.safetensors", meta={"ssmd_description": EVIL})
    code, out, err = run("add", p, "--json")
    code, out, err = run("show", json.loads(out)[0]["id"], "--json")
    assert code == 0
    assert not any(bad in out for bad in FORBIDDEN)
    assert json.loads(out)["description"] == EVIL


def test_progress_and_errors_escape_controls(run, home, tmp_path):
    line = _one_error(*run("add", tmp_path / "no\x1b[31mpe\u202e.safetensors"))
    assert "\x1b" not in line and "\\x1b[31m" in line and "\\u202e" in line


# ------------------------------------------------------------------------------------- type from evidence
def _webui_folder(root: Path, folder: str, stem: str, *, civitai=None, webui=None, meta=None, seed=0) -> Path:
    p = kohya_file(root / "models" / "Lora" / folder / f"{stem}.safetensors", seed=seed, meta=meta)
    if civitai is not None:
        p.with_name(f"{stem}.civitai.info").write_text(json.dumps(civitai))
    if webui is not None:
        p.with_name(f"{stem}.json").write_text(json.dumps(webui))
    return p


def test_type_comes_from_civitai_tags_and_show_says_so(run, home, tmp_path, png_bytes):
    p = _webui_folder(tmp_path, "chars", "aqua_v2", civitai={
        "id": 22, "modelId": 11, "trainedWords": ["aqua"], "baseModel": "SD 1.5",
        "model": {"name": "Aqua - KonoSuba", "type": "LORA", "tags": ["anime", "character", "konosuba"]}},
        webui={"activation text": "aqua", "preferred weight": 0.7, "description": "the goddess"})
    p.with_name("aqua_v2.preview.png").write_bytes(png_bytes())
    code, out, err = run("add", p, "--json")
    assert code == 0, err
    e = json.loads(run("show", json.loads(out)[0]["id"], "--json")[1])
    assert e["type"] == "character"
    assert e["extra"]["type_source"] == {"type": "character", "from": "Civitai tag 'character'"}
    code, out, err = run("show", e["id"])
    assert "character (from Civitai tag 'character')" in out
    # the user's word wins, and a later edit is not attributed to the evidence
    assert run("edit", e["id"], "--type", "style")[0] == 0
    out = run("show", e["id"])[1]
    assert "style" in out and "from Civitai" not in out


def test_type_given_explicitly_is_not_attributed(run, home, tmp_path):
    p = _webui_folder(tmp_path, "styles", "x", civitai={"model": {"tags": ["character"]}})
    code, out, err = run("add", p, "--type", "object", "--json")
    e = json.loads(run("show", json.loads(out)[0]["id"], "--json")[1])
    assert e["type"] == "object" and "type_source" not in e["extra"]


@pytest.mark.parametrize("kwargs, folder, want, source", [
    ({"civitai": {"model": {"tags": ["Style", "anime"]}}}, "misc", "style", "Civitai tag 'Style'"),
    ({"civitai": {"tags": [{"name": "poses"}]}}, "misc", "pose", "Civitai tag 'poses'"),
    ({"civitai": {"model": {"tags": ["objects"]}}}, "misc", "object", "Civitai tag 'objects'"),
    ({"webui": {"description": "A clothing LoRA for maid outfits"}}, "misc", "clothing", "webui .json description"),
    ({"webui": {"notes": "concept-lora, use at 0.6"}}, "misc", "concept", "webui .json notes"),
    ({"meta": {"ss_training_comment": "style LoRA trained on 40 paintings"}}, "misc", "style", "ss_training_comment"),
    ({"meta": {"ss_tag_frequency": json.dumps({"10_aqua character": {"aqua": 20}})}}, "misc", "character",
     "kohya dataset folder '10_aqua character'"),
    ({"meta": {"ss_dataset_dirs": json.dumps({"img/5_sks outfit": {"n_repeats": 5}})}}, "misc", "clothing",
     "kohya dataset folder 'img/5_sks outfit'"),
    ({}, "Characters", "character", "folder 'Characters'"),
    ({}, "poses", "pose", "folder 'poses'"),
    ({"webui": {"description": "in the style of nobody"}}, "misc", None, None),
    ({"meta": {"ss_tag_frequency": json.dumps({"10_aqua": {"aqua": 20}})}}, "loras", None, None),
])
def test_type_evidence(tmp_path, kwargs, folder, want, source):
    from lorahub.formats.header import read_header
    from lorahub.metadata import collect

    p = _webui_folder(tmp_path, folder, "f", **kwargs)
    imp = collect(p, read_header(p).metadata)
    assert (imp.type, imp.type_source) == (want, source)
    from lorahub.vocab import LORA_TYPES

    assert want is None or want in LORA_TYPES


def test_stronger_evidence_wins(tmp_path):
    from lorahub.formats.header import read_header
    from lorahub.metadata import collect

    p = _webui_folder(tmp_path, "styles", "f", civitai={"model": {"tags": ["concept"]}},
                      webui={"description": "a character LoRA"},
                      meta={"ss_training_comment": "pose lora"})
    imp = collect(p, read_header(p).metadata)
    assert (imp.type, imp.type_source) == ("concept", "Civitai tag 'concept'")


# ------------------------------------------------------------------------------------- type-confused metadata
@pytest.mark.parametrize("key, value", [
    pytest.param("lorahub", '{"stash": [1]}', id="lorahub"),
    pytest.param("lorahub", '{"stash": {"a": 1}}', id="lorahub-nonstring"),
    pytest.param("ss_datasets", '[1, {"subsets": 5}]', id="ss_datasets"),
    pytest.param("ss_tag_frequency", '{"a": [1], "b": {"t": "x"}}', id="ss_tag_frequency"),
    pytest.param("ssmd_cover_images", '{"a": 1}', id="ssmd_cover_images"),
    pytest.param("lora_adapter_metadata", "[1]", id="lora_adapter_metadata"),
])
def test_type_confused_metadata(run, home, tmp_path, key, value):
    """Valid JSON of the wrong shape in a metadata field: add, inspect and convert refuse or ignore it."""
    p = kohya_file(tmp_path / "m.safetensors", meta={key: value})
    for args in (("add", p), ("inspect", p), ("convert", p, "--to", "diffusers", "--out", tmp_path / "o.safetensors")):
        code, out, err = run(*args)
        if code != 0:
            _one_error(code, out, err)
        assert "internal error" not in err, (args[0], err)
