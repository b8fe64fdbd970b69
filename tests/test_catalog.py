"""The catalogue commands, run as real child processes (exit codes, stderr) or in-process via main()."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


from lorahub.tiny_loras import kohya_file


def jrun(run, *args):
    code, out, err = run(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_add_duplicate_and_bad_input_exit_codes(cli, home, tmp_path, bad_files, store_files):
    f = kohya_file(tmp_path / "a.safetensors")
    r = cli("add", f, "--type", "style", "--trigger", "zkz", "--tag", "t1", home=home)
    assert r.returncode == 0, r.stderr
    assert "added a (" in r.stdout
    r = cli("add", f, home=home)
    assert r.returncode == 0 and "already in the registry" in r.stdout
    for label, path in bad_files.items():
        r = cli("add", path, home=home)
        assert r.returncode == 2, (label, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (label, r.stderr)
        assert "Traceback" not in r.stderr
    r = cli("add", f, bad_files["not_json"], home=home)  # one bad file: nothing from the batch
    assert r.returncode == 2
    r = cli("list", "--json", home=home)
    assert [e["name"] for e in json.loads(r.stdout)] == ["a"]
    assert len(store_files(home)) == 1
    r = cli("add", f, "--type", "landscape", home=home)
    assert r.returncode == 2 and "unknown type" in r.stderr


def test_scan_recursive_idempotent_without_rehashing(run, home, tmp_path, monkeypatch):
    root = tmp_path / "loras"
    for i in range(5):
        kohya_file(root / f"sub{i % 2}" / f"l{i}.safetensors", seed=i)
    (root / "notes.txt").write_text("ignore me")
    (root / "sub0" / "broken.safetensors").write_bytes(b"\x05\0\0\0\0\0\0\0{bad}")
    res = jrun(run, "scan", root)
    assert len(res["added"]) == 5 and res["already"] == 0
    assert [Path(s["path"]).name for s in res["skipped"]] == ["broken.safetensors"]
    import lorahub.hashing as hashing

    calls = []
    for fn in ("hash_stream", "hash_bytes"):  # files are hashed as they are read, or from memory
        monkeypatch.setattr(hashing, fn, lambda *a, real=getattr(hashing, fn), **k: calls.append(a) or real(*a, **k))
    res = jrun(run, "scan", root)
    assert res["added"] == [] and res["already"] == 5 and calls == []
    os.utime(root / "sub1" / "l1.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: re-hashed
    res = jrun(run, "scan", root)
    assert res["added"] == [] and res["already"] == 5 and len(calls) == 1
    assert len(jrun(run, "list")) == 5
    kohya_file(root / "sub1" / "deep" / "new.safetensors", seed=77)
    res = jrun(run, "scan", root, "--link")
    assert [e["name"] for e in res["added"]] == ["new"]
    new = root / "sub1" / "deep" / "new.safetensors"
    blob = home / "objects" / res["added"][0]["sha256"][:2] / res["added"][0]["sha256"]
    assert blob.read_bytes() == new.read_bytes() and blob.stat().st_ino == new.stat().st_ino


def test_list_search_show_tag_edit(run, home, tmp_path):
    pa = kohya_file(tmp_path / "anime_girl.safetensors", seed=1, rank=8)
    pb = kohya_file(tmp_path / "watercolor.safetensors", seed=2, rank=4, width=1024)
    assert run("add", pa, "--type", "character", "--trigger", "sks girl", "--tag", "anime")[0] == 0
    assert run("add", pb, "--type", "style", "--tag", "paint", "--description", "soft washes")[0] == 0
    names = lambda rows: [r["name"] for r in rows]  # noqa: E731
    assert names(jrun(run, "list")) == ["anime_girl", "watercolor"]
    assert names(jrun(run, "list", "--base", "sd2")) == ["watercolor"]
    assert names(jrun(run, "search", "sks")) == ["anime_girl"]
    assert names(jrun(run, "search", "wash")) == ["watercolor"]
    assert names(jrun(run, "search", "--type", "style")) == ["watercolor"]
    assert names(jrun(run, "search", "--tag", "anime", "--rank-min", "8")) == ["anime_girl"]
    assert names(jrun(run, "search", "--rank-max", "4")) == ["watercolor"]
    assert names(jrun(run, "search", "--kind", "lora", "--base", "sd1")) == ["anime_girl"]
    code, out, _ = run("search", "nomatchatall")
    assert code == 0 and "no entries match" in out

    sha = hashlib.sha256(pa.read_bytes()).hexdigest()
    for ref in ("anime_girl", sha[:10].upper(), sha):
        assert jrun(run, "show", ref)["sha256"] == sha
    code, out, _ = run("show", sha[:10].upper())
    assert code == 0 and sha.upper() in out and "AutoV3" in out and "BLAKE3" in out and "sks girl" in out
    code, _, err = run("show", "doesnotexist")
    assert code == 2 and "no registry entry" in err

    code, out, err = run("tag", "anime_girl", "+cute", "-anime", "+Blue")
    assert code == 0, err
    assert jrun(run, "show", "anime_girl")["tags"] == ["cute", "Blue"]
    assert names(jrun(run, "search", "--tag", "blue")) == ["anime_girl"]

    code, _, err = run("edit", "anime_girl", "--name", "girl2", "--type", "pose", "--trigger", "t1", "--trigger", "t2")
    assert code == 0, err
    e = jrun(run, "show", "girl2")
    assert (e["type"], e["triggers"]) == ("pose", ["t1", "t2"])
    code, _, err = run("edit", "girl2", "--name", "watercolor")
    assert code == 2 and "taken" in err
    code, _, err = run("edit", "girl2")
    assert code == 2


def test_show_lineage_previews_remotes(run, home, tmp_path, png_bytes):
    from lorahub.registry import Registry

    reg = Registry.open(home)
    p, _ = reg.add_file(kohya_file(tmp_path / "base_lora.safetensors", seed=1))
    c, _ = reg.add_file(kohya_file(tmp_path / "conv.safetensors", seed=2),
                        lineage=[{"relation": "converted-from", "parent": p["id"], "detail": {"dialect": "peft"}}])
    g, _ = reg.add_file(kohya_file(tmp_path / "grand.safetensors", seed=3),
                        lineage=[{"relation": "resized-from", "parent": c["sha256"], "detail": {"rank": 2}}])
    img = tmp_path / "g.png"
    img.write_bytes(png_bytes())
    reg.add_preview(g["id"], img, params={"seed": 7})
    reg.set_remote(g["id"], repo="me/grand", revision="main", commit="abc123")
    reg.close()
    code, out, err = run("show", "grand")
    assert code == 0, err
    assert "resized-from conv" in out and "converted-from base_lora" in out and "dialect=peft" in out
    assert "me/grand@main commit abc123" in out and "seed=7" in out
    js = jrun(run, "show", "grand")
    assert js["lineage"][0]["parent_id"] == c["id"]
    assert js["lineage"][0]["parents"][0]["parent_id"] == p["id"]
    assert js["previews"][0]["params"] == {"seed": 7} and js["remotes"][0]["commit"] == "abc123"
    assert jrun(run, "show", "base_lora")["children"][0]["entry_id"] == c["id"]


def test_rm_gc_verify(run, home, tmp_path):
    fa = kohya_file(tmp_path / "a.safetensors", seed=1)
    fb = kohya_file(tmp_path / "b.safetensors", seed=2)
    run("add", fa, fb)
    assert jrun(run, "verify") == {"checked": 2, "problems": [], "remaining": 0, "recovered": []}
    sha_a = hashlib.sha256(fa.read_bytes()).hexdigest()
    blob_a = home / "objects" / sha_a[:2] / sha_a
    assert run("rm", "a")[0] == 0
    assert blob_a.is_file()
    res = jrun(run, "gc")
    assert res["blobs"] == [sha_a] and not blob_a.exists()
    # corrupt b's blob, then delete it
    sha_b = hashlib.sha256(fb.read_bytes()).hexdigest()
    blob_b = home / "objects" / sha_b[:2] / sha_b
    os.chmod(blob_b, 0o644)
    data = bytearray(blob_b.read_bytes())
    data[-1] ^= 0xFF
    blob_b.write_bytes(bytes(data))
    code, out, _ = run("verify", "--json")
    assert code == 1 and json.loads(out)["problems"][0]["problem"] == "corrupt"
    blob_b.unlink()
    code, out, _ = run("verify")
    assert code == 1 and "missing" in out


def test_export_original_name_sidecar_preview_inside_dest(run, home, tmp_path, png_bytes):
    f = kohya_file(tmp_path / "x.safetensors")
    (tmp_path / "x.preview.png").write_bytes(png_bytes((1, 2, 3)))
    assert run("add", f, "--trigger", "zkz", "--trigger", "blue hair", "--base", "sd1")[0] == 0
    code, _, err = run("edit", "x", "--name", "../../evil/My LoRA: v2")
    assert code == 2 and "path separators" in err
    assert run("edit", "x", "--name", "My LoRA: v2", "--description", "desc")[0] == 0
    dest = tmp_path / "out"
    res = jrun(run, "export", "My LoRA: v2", dest)
    written = [Path(p) for p in res["written"]]
    assert all(p.parent == dest for p in written), written
    lora = next(p for p in written if p.suffix == ".safetensors")
    assert lora.name == "x.safetensors"  # the original file name: the LoRA's handle in prompts
    assert lora.read_bytes() == f.read_bytes() and lora.stat().st_mode & 0o200
    side = json.loads((dest / "x.json").read_text())
    assert side["activation text"] == "zkz, blue hair" and side["sd version"] == "SD1" and side["description"] == "desc"
    assert (dest / "x.preview.png").read_bytes() == (tmp_path / "x.preview.png").read_bytes()
    # --stem chooses the name, made safe: nothing lands outside the destination
    res2 = jrun(run, "export", "x", dest, "--stem", "../../evil/My LoRA: v2")
    assert [Path(p).parent for p in res2["written"]] == [dest] * 3 and not (tmp_path / "evil").exists()
    # again: same content is fine; other content needs --force
    assert run("export", res["id"], dest)[0] == 0
    os.chmod(lora, 0o644)
    lora.write_bytes(b"other")
    code, _, err = run("export", res["id"], dest)
    assert code == 2 and "--force" in err
    assert run("export", res["id"], dest, "--force")[0] == 0
    assert lora.read_bytes() == f.read_bytes()


def test_dupes(run, home, tmp_path):
    kohya_file(tmp_path / "a.safetensors", seed=3, meta={"ss_output_name": "a"})
    kohya_file(tmp_path / "b.safetensors", seed=3, meta={"ss_output_name": "b, renamed"})
    kohya_file(tmp_path / "c.safetensors", seed=4)
    run("scan", tmp_path)
    groups = jrun(run, "dupes")
    assert len(groups) == 1 and sorted(e["name"] for e in groups[0]["entries"]) == ["a", "b"]


def test_catalog_read_path_imports_nothing_heavy(home, tmp_path):
    code = (
        "import sys\n"
        "from lorahub.cli.app import main\n"
        "try:\n    main(['search', 'x', '--json'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('torch', 'numpy', 'sqlite_utils', 'diffusers', 'transformers', 'safetensors', 'PIL')"
        " if m in sys.modules]\n"
        "sys.stderr.write('HEAVY:' + ','.join(bad) + '\\n')\n")
    env = dict(os.environ, LORAHUB_HOME=str(home))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "HEAVY:\n" in r.stderr, r.stderr


def test_demo_runs(cli, tmp_path):
    h = tmp_path / "demo-home"
    r = cli("demo", "--home", h, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lorahub search" in r.stdout and "AutoV2" in r.stdout
    from lorahub.registry import Registry

    reg = Registry.open(h)
    assert reg.count() >= 3
    kinds = {e["kind"] for e in reg.entries()}
    assert "lora" in kinds
    assert reg.verify() == []


def test_two_processes_scanning_one_home_at_once(home, tmp_path, store_files):
    root = tmp_path / "shared"
    for i in range(12):
        kohya_file(root / f"p{i}.safetensors", seed=300 + i)
    env = dict(os.environ, LORAHUB_HOME=str(home))
    procs = [subprocess.Popen([sys.executable, "-m", "lorahub", "scan", str(root), "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert all(r["skipped"] == [] for r in results)
    assert sum(len(r["added"]) for r in results) == 12  # each file added exactly once
    from lorahub.registry import Registry

    reg = Registry.open(home)
    assert reg.count() == 12 and reg.verify() == [] and len(store_files(home)) == 12


def test_sql_command_prints_json_csv_table_and_refuses_writes(run, home, tmp_path):
    import csv
    import io

    pa = kohya_file(tmp_path / "one.safetensors", seed=1, rank=8)
    pb = kohya_file(tmp_path / "two.safetensors", seed=2, width=1024)
    assert run("add", pa, pb, "--tag", "t")[0] == 0
    q = "SELECT name, base, rank FROM entries ORDER BY name"
    rows = jrun(run, "sql", q)
    assert rows == [{"name": "one", "base": "sd1", "rank": 8}, {"name": "two", "base": "sd2", "rank": 4}]
    code, out, err = run("sql", q, "--csv")
    assert code == 0, err
    assert list(csv.reader(io.StringIO(out))) == [["name", "base", "rank"], ["one", "sd1", "8"], ["two", "sd2", "4"]]
    code, out, _ = run("sql", q)
    assert code == 0 and "one" in out and "sd2" in out and "2 row(s)" in out
    for bad in ("DELETE FROM entries", "DROP TABLE lineage", "UPDATE entries SET name = 'x'", "VACUUM"):
        code, out, err = run("sql", bad)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "read-only" in err, (bad, err)
    assert [e["name"] for e in jrun(run, "list")] == ["one", "two"]
    code, _, err = run("sql", "SELECT * FROM nope")
    assert code == 2 and "no such table" in err


# ---------------------------------------------------------------------------------------- list output
def test_list_and_search_print_tab_separated_lines_when_not_a_terminal(run, home, tmp_path):
    """Piped (not a terminal), list and search print like `ls`: a header line, then one line per entry
    with tab-separated fields, nothing cut, escapes applied; the same entries --json gives."""
    kohya_file(tmp_path / "one.safetensors", seed=1)
    kohya_file(tmp_path / "two.safetensors", seed=2)
    long_tags = [f"tag{i:02d}_{'x' * 10}" for i in range(8)]  # joined: longer than a table cell's 60
    assert run("add", tmp_path / "one.safetensors", "--trigger", "zq\tperson", "--type", "style")[0] == 0
    assert run("add", tmp_path / "two.safetensors", *[a for t in long_tags for a in ("--tag", t)])[0] == 0
    code, out, _ = run("list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split("\t") == ["id", "name", "kind", "base", "rank", "type", "triggers", "tags"]
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 8 for r in rows)
    by_name = {r[1]: r for r in rows}
    want = {e["name"]: e for e in jrun(run, "list")}
    assert set(by_name) == set(want) == {"one", "two"}
    for name, r in by_name.items():
        e = want[name]
        assert (r[0], r[2], r[4], r[5]) == (e["id"], e["kind"], str(e["rank"]), e["type"] or "")
    assert by_name["one"][6] == "zq person" and by_name["two"][7] == ", ".join(long_tags)
    code, out, _ = run("search", "zq")
    assert [line.split("\t")[1] for line in out.splitlines()[1:]] == ["one"]


def test_terminal_table_fits_the_width_and_escapes(monkeypatch, capsys):
    """On a terminal the rows are aligned columns, fitted to its width with '…' where a value is cut;
    wide characters count two cells; control characters are shown escaped."""
    import io
    import sys

    from lorahub.cli.common import _cell_width, print_rows

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("NO_COLOR", "1")
    print_rows(["id", "name", "tags"], [["a1", "日本語の名前", "x" * 50], ["b2", "\x1b[31mred", "short"]])
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["id", "name", "tags"]
    assert all(_cell_width(line) <= 40 for line in lines), lines
    assert lines[1].startswith("a1  日本語の名前") and lines[1].endswith("…")
    assert "\\x1b[31mred" in lines[2] and "\x1b" not in out.getvalue()
    # the columns line up: every row's third field starts at the same cell
    starts = {_cell_width(line[: line.index(field)]) for line, field in ((lines[1], "x"), (lines[2], "short"))}
    assert len(starts) == 1
