"""`lorahub verify --repair`: missing/corrupt blobs come back from the recorded source or Hub remote."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lorahub.tiny_loras import kohya_file


def _blob(home: Path, sha: str) -> Path:
    return home / "objects" / sha[:2] / sha


def _corrupt(p: Path) -> None:
    os.chmod(p, 0o644)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


def test_repair_from_local_source(tmp_path, cli):
    home = tmp_path / "home"
    a = kohya_file(tmp_path / "a.safetensors", seed=1)
    b = kohya_file(tmp_path / "b.safetensors", seed=2)
    c = kohya_file(tmp_path / "c.safetensors", seed=3)
    assert cli("add", a, b, c, home=home).returncode == 0
    entries = {e["file_name"]: e for e in json.loads(cli("list", "--json", home=home).stdout)}
    _blob(home, entries["a.safetensors"]["sha256"]).unlink()
    _corrupt(_blob(home, entries["b.safetensors"]["sha256"]))
    c.write_bytes(b"changed since it was added")  # its source no longer matches: cannot repair
    _blob(home, entries["c.safetensors"]["sha256"]).unlink()

    r = cli("verify", "--json", home=home)
    assert r.returncode == 1 and len(json.loads(r.stdout)["problems"]) == 3

    r = cli("verify", "--repair", "--json", home=home)
    assert r.returncode == 1, r.stderr  # c is still missing
    out = json.loads(r.stdout)
    by_sha = {p["sha256"]: p for p in out["problems"]}
    assert by_sha[entries["a.safetensors"]["sha256"]]["repaired"] is True
    assert by_sha[entries["b.safetensors"]["sha256"]]["repaired"] is True
    assert by_sha[entries["c.safetensors"]["sha256"]]["repaired"] is False
    assert out["remaining"] == 1
    for name in ("a.safetensors", "b.safetensors"):
        blob = _blob(home, entries[name]["sha256"])
        assert blob.read_bytes() == (tmp_path / name).read_bytes()
        assert blob.stat().st_mode & 0o222 == 0  # read-only again

    cli("rm", entries["c.safetensors"]["id"], home=home)
    assert cli("verify", home=home).returncode == 0


def test_repair_from_hub_remote(tmp_path, cli, hub, henv):
    home = tmp_path / "home"
    data = kohya_file(tmp_path / "hub.safetensors", seed=7).read_bytes()
    hub.seed("someone/style-lora", {"style.safetensors": data,
                                    "README.md": b"---\nbase_model: runwayml/stable-diffusion-v1-5\n---\n"})
    env = henv()
    r = cli("pull", "someone/style-lora", home=home, env=env)
    assert r.returncode == 0, r.stderr
    entry = json.loads(cli("list", "--json", home=home).stdout)[0]
    _blob(home, entry["sha256"]).unlink()
    # offline: the Hub source is skipped, the blob stays missing
    r = cli("verify", "--repair", home=home, env=env | {"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "no source could restore it" in r.stdout
    # online, with a fresh cache so the bytes really come over HTTP again
    r = cli("verify", "--repair", home=home, env=henv("hf2"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "repaired from someone/style-lora@" in r.stdout
    assert _blob(home, entry["sha256"]).read_bytes() == data
