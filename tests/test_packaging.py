"""The built wheel carries its runtime data: the model configs (package data) and the migrations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_configs_and_migrations_and_reads_them(tmp_path):
    pytest.importorskip("hatchling")  # the build backend; offline build without isolation
    out = tmp_path / "whl"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = out.glob("lorahub-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    data = REPO / "lorahub" / "data" / "configs"
    for group in ("real", "tiny"):
        expected = sorted(p.name for p in (data / group).glob("*.json"))
        assert expected and {f"lorahub/data/configs/{group}/{n}" for n in expected} <= names
    migrations = sorted(p.name for p in (REPO / "registry" / "migrations").glob("*.sql"))
    assert {f"lorahub/_registry/migrations/{n}" for n in migrations} <= names
    assert not any("_fixtures" in n for n in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = """
import json, sys
import lorahub
from lorahub.resources import migrations_dir, model_config, model_config_files
from lorahub.registry import Registry
reg = Registry.open(sys.argv[1])
print(json.dumps({"pkg": lorahub.__file__, "migrations": str(migrations_dir()),
                  "version": reg.conn.execute("PRAGMA user_version").fetchone()[0],
                  "sd15": model_config("real", "sd15_unet"),
                  "tiny": sorted(model_config_files("tiny"))}))
"""
    env = dict(os.environ, PYTHONPATH=str(site))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "home")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got["pkg"]).is_relative_to(site) and Path(got["migrations"]).is_relative_to(site)
    assert got["version"] == int(migrations[-1].split("_", 1)[0])  # the highest number (gaps allowed)
    assert got["sd15"] == json.loads((data / "real" / "sd15_unet.json").read_text())
    assert got["tiny"] == sorted(p.name for p in (data / "tiny").glob("*.json"))
