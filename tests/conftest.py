"""Shared fixtures. Tests never touch the network or the user's ~/.lorahub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs as `pytest -n 2` on 2 cores: one math thread per worker (and per child process)
# avoids oversubscription, which made torch tests up to 10x slower. Set before any test imports
# torch, so every test module and child process runs single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REAL_LORAS = SHARED / "real-loras"


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty registry home; LORAHUB_HOME points at it for in-process and child calls."""
    h = tmp_path / "home"
    monkeypatch.setenv("LORAHUB_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def tiny_sd1() -> Path:
    """Folder of the tiny SD1-style diffusers pipeline (built once, cached)."""
    from lorahub import tiny

    return tiny.ensure("sd1")


@pytest.fixture(scope="session")
def tiny_sdxl() -> Path:
    from lorahub import tiny

    return tiny.ensure("sdxl")


def run_cli(*args: str, home: Path | None = None, input: str | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m lorahub ARGS` in a child process (a real process: exit codes, stderr, no traceback)."""
    e = dict(os.environ)
    if home is not None:
        e["LORAHUB_HOME"] = str(home)
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "lorahub", *map(str, args)], capture_output=True, text=True,
                          input=input, env=e, timeout=timeout)


@pytest.fixture
def run(home, capsys):
    """`run(*args)` runs `lorahub ARGS` in this process (fast: imports and caches are shared) against
    the test's `home`; returns (exit code, stdout, stderr)."""
    from lorahub.cli.app import main

    def _run(*args):
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


@pytest.fixture
def cli():
    """`cli(*args, home=...)` runs the lorahub command in a child process."""
    return run_cli


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
