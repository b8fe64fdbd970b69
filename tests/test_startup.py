"""Catalogue commands never import the ML stack or pydantic at start-up (COMMON rule; issue #18 item 1).

Each command runs in a fresh child interpreter (as ``python -m lorahub`` would) against a registry with
one entry; afterwards the child lists which of the forbidden top-level packages are in ``sys.modules``.
typer 0.29 imports pydantic while it parses any argument (typer/_adapters.py), which is why pyproject
pins typer 0.28.0: this test fails when a typer that does so is installed, or when a catalogue module
imports torch/numpy/diffusers/transformers at module level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorahub.tiny_loras import kohya_file

FORBIDDEN = ("pydantic", "pydantic_core", "torch", "numpy", "diffusers", "transformers", "peft", "safetensors")

CHILD = r"""
import json, runpy, sys
out, args = sys.argv[1], sys.argv[2:]
sys.argv = ["lorahub", *args]
code = 0
try:
    runpy.run_module("lorahub", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
tops = sorted({m.split(".")[0] for m in sys.modules})
with open(out, "w") as f:
    json.dump({"code": code, "modules": tops}, f)
"""


@pytest.fixture(scope="module")
def catalogue_home(tmp_path_factory) -> Path:
    from lorahub.registry import Registry

    home = tmp_path_factory.mktemp("startup-home")
    f = kohya_file(tmp_path_factory.mktemp("startup-src") / "startup_probe.safetensors", meta={"ss_network_dim": "4"})
    reg = Registry.open(home)
    try:
        reg.add_file(f, tags=["probe"])
    finally:
        reg.close()
    return home


def _imports(args: list[str], home: Path, tmp_path: Path) -> dict:
    out = tmp_path / "mods.json"
    env = {**os.environ, "LORAHUB_HOME": str(home), "COLUMNS": "120"}
    r = subprocess.run([sys.executable, "-c", CHILD, str(out), *args], capture_output=True, text=True, env=env,
                       timeout=120)
    assert out.exists(), r.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("args", [
    ["list"], ["list", "--json"], ["search", "startup"], ["search", "startup", "--json"],
    ["show", "startup_probe"], ["show", "startup_probe", "--json"], ["tag", "startup_probe", "+x"],
    ["--version"], ["search", "--help"],
])
def test_catalogue_command_imports_no_ml_stack(args, catalogue_home, tmp_path):
    got = _imports(args, catalogue_home, tmp_path)
    assert got["code"] == 0, got
    assert "lorahub" in got["modules"]  # the child really ran lorahub
    assert sorted(set(FORBIDDEN) & set(got["modules"])) == []


@pytest.mark.parametrize("args", [["list"], ["search", "startup"], ["list", "--json"]])
def test_listing_commands_print_without_rich(args, catalogue_home, tmp_path):
    """list and search print their rows as plain text (a rich table costs ~1 ms a row: 0.3 s for 300
    entries), so their processes never import rich."""
    got = _imports(args, catalogue_home, tmp_path)
    assert got["code"] == 0 and "lorahub" in got["modules"], got
    assert "rich" not in got["modules"]


def test_the_check_sees_a_heavy_import(catalogue_home, tmp_path):
    # the probe itself can fail: a command that needs torch shows it in the child's modules
    f = kohya_file(tmp_path / "probe.safetensors")
    got = _imports(["inspect", str(f), "--json"], catalogue_home, tmp_path)
    assert got["code"] == 0 and "torch" in got["modules"]


def test_scan_into_a_pipe_imports_neither_rich_nor_the_ml_stack(catalogue_home, tmp_path):
    """With stderr not a terminal no progress bar is shown, and rich is not even imported for it (~25 ms of
    a scan's start); the per-file lines are plain text."""
    lib = tmp_path / "lib"
    kohya_file(lib / "one.safetensors", seed=5)
    got = _imports(["scan", str(lib), "--home", str(tmp_path / "home")], catalogue_home, tmp_path)
    assert got["code"] == 0 and "lorahub" in got["modules"], got
    assert sorted(({"rich"} | set(FORBIDDEN)) & set(got["modules"])) == []
