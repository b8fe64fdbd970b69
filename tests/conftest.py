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


@pytest.fixture
def reg(home):
    """The registry at ``home``, open (closed after the test)."""
    from lorahub.registry import Registry

    r = Registry.open(home)
    yield r
    r.close()


# ---------------------------------------------------------------------------------------- files
@pytest.fixture
def store_files():
    """`store_files(home)`: the files in a registry home's content-addressed store, sorted."""
    def _store_files(home: Path) -> list[Path]:
        return sorted(p for p in (home / "objects").rglob("*") if p.is_file())
    return _store_files


@pytest.fixture
def png_bytes():
    """`png_bytes(color=(255, 0, 0), size=(8, 6))`: the bytes of a one-colour PNG."""
    def _png_bytes(color=(255, 0, 0), size=(8, 6)) -> bytes:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", size, color).save(buf, format="PNG")
        return buf.getvalue()
    return _png_bytes


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    """Files `add` must refuse, by label: truncated, header length past the end, header not JSON,
    tensors of no known format, and a path that does not exist."""
    import struct

    import numpy as np

    from lorahub.tiny_loras import kohya_file, save_tensors

    d = tmp_path / "bad"
    good = kohya_file(d / "good.safetensors").read_bytes()
    out = {"truncated": d / "truncated.safetensors", "header_too_long": d / "hdr.safetensors",
           "not_json": d / "notjson.safetensors", "unknown_format": d / "unknown.safetensors",
           "missing": d / "missing.safetensors"}
    out["truncated"].write_bytes(good[: len(good) - 100])
    out["header_too_long"].write_bytes(struct.pack("<Q", 10_000) + b'{"a":1}')
    out["not_json"].write_bytes(struct.pack("<Q", 9) + b"{not json" + b"\0" * 16)
    save_tensors(out["unknown_format"], {"some.random.weight": np.zeros((3, 3), np.float32),
                                         "other.bias": np.zeros((5,), np.float32)})
    return out


# ---------------------------------------------------------------------------------------- models
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
def stress(tmp_path):
    """`stress(name, *args)` runs the stress script ``tests/stress/<name>.py ARGS`` in a child process, with
    its files and registry home under ``tmp_path``, and returns its JSON report (``report["problems"]``)."""
    import json

    def _stress(name: str, *args, timeout: float = 900) -> dict:
        script = REPO / "tests" / "stress" / f"{name}.py"
        p = subprocess.run([sys.executable, str(script), *map(str, args), "--workdir", str(tmp_path / name)],
                           capture_output=True, text=True, timeout=timeout)
        assert p.returncode in (0, 1) and p.stdout.strip(), f"exit {p.returncode}\n{p.stderr[-3000:]}"
        return json.loads(p.stdout)
    return _stress


@pytest.fixture
def cli():
    """`cli(*args, home=...)` runs the lorahub command in a child process."""
    return run_cli


# ---------------------------------------------------------------------------------------- test Hub
HUB_TOKEN = "hf_lorahubTestToken0123456789"


@pytest.fixture
def ok():
    """``ok(result)``: a CLI run (a CompletedProcess) that exited 0; returns it."""
    def _ok(res):
        assert res.returncode == 0, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
        return res
    return _ok


@pytest.fixture
def fail():
    """``fail(result, *needles)``: a CLI run refused the way every command refuses bad input -- exit 2,
    one ``error:`` line holding each needle (case-insensitive), no traceback; returns the line."""
    def _fail(res, *needles):
        assert res.returncode == 2, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
        err = res.stderr.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in res.stderr, err
        for n in needles:
            assert n.lower() in err.lower(), err
        return err
    return _fail


@pytest.fixture
def hub(tmp_path):
    """A Hugging Face Hub-compatible server on 127.0.0.1 (tests/hubserver.py), running for the test.
    Writes and private repos need ``hub.token``; ``hub.seed``, ``hub.files``, ``hub.front_matter`` … inspect it."""
    from hubserver import HubServer

    with HubServer(tmp_path / "hubsrv", token=HUB_TOKEN) as h:
        yield h


@pytest.fixture
def henv(hub, tmp_path):
    """`henv(name="hf")`: the environment of a CLI child process that talks to the test hub with a fresh
    HF cache (``tmp_path/name``); the hub's token is in LORAHUB_TEST_TOKEN, HF_TOKEN is empty."""
    def make(name: str = "hf") -> dict:
        return {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / name),
                "HF_ENDPOINT": hub.url, "HF_TOKEN": "", "LORAHUB_TEST_TOKEN": hub.token,
                "HF_HUB_DISABLE_TELEMETRY": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    return make


@pytest.fixture
def hub_online(hub, tmp_path, monkeypatch):
    """In-process library calls (``lorahub.push`` / ``lorahub.pull``) against the test hub: the real
    huggingface_hub client switched online with Xet off (what HF_HUB_OFFLINE=0 HF_HUB_DISABLE_XET=1 give
    a child process) and a fresh HF cache (``.cache``). Pass ``endpoint=h.endpoint, token_env=h.token_env``."""
    from types import SimpleNamespace

    from huggingface_hub import constants

    cache = tmp_path / "hf-inproc" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("LORAHUB_TEST_TOKEN", hub.token)
    return SimpleNamespace(endpoint=hub.url, token_env="LORAHUB_TEST_TOKEN", cache=cache, hub=hub)


# ---------------------------------------------------------------------------------------- web gallery
# A name, trigger and metadata an attacker could put in a LoRA file (no "/" in the name: names are
# file-name-like; the slashes go in the other fields).
HOSTILE = {
    "name": "<script>alert(1)<img src=x onerror=alert(2)>[link=x]y[bold]z",
    "trigger": "\"><script>alert(3)</script>",
    "description": "[link=file:///etc/passwd]click[/link] <iframe src=javascript:alert(4)>",
    "title": "<svg onload=alert(5)>",
}


@pytest.fixture(scope="session")
def demo_registry(tmp_path_factory) -> Path:
    """The registry home `lorahub demo` builds (tiny LoRAs of every dialect, a conversion and a merge
    with their lineage, an α sweep grid and animation as previews). Built once per test session and
    shared by the xdist workers; never change it: copy it (``web_home``)."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # one folder per session
    home = root / "demo-registry"
    with open(root / "demo-registry.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "demo-complete").is_file():
            shutil.rmtree(home, ignore_errors=True)
            r = run_cli("demo", "--home", str(home), timeout=900, env={"NO_COLOR": "1"})
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
            (home / "demo-complete").write_text(r.stdout)
    return home


@pytest.fixture
def web_home(demo_registry, tmp_path) -> Path:
    """A copy of the demo registry for one test (no cached heat maps or thumbnails)."""
    import shutil

    home = tmp_path / "gallery-home"
    shutil.copytree(demo_registry, home, ignore=shutil.ignore_patterns("demo-outputs", "demo-complete", "cache"))
    return home


@pytest.fixture
def hostile_entry(web_home, tmp_path) -> dict:
    """An entry of ``web_home`` whose name, trigger, description and metadata are markup (see HOSTILE)."""
    from lorahub.registry import Registry
    from lorahub.tiny_loras import kohya_file

    f = kohya_file(tmp_path / "hostile.safetensors", seed=7,
                   meta={"modelspec.title": HOSTILE["title"], "ss_training_comment": HOSTILE["description"]})
    with Registry.open(web_home) as reg:
        entry, created = reg.add_file(f, name=HOSTILE["name"], triggers=[HOSTILE["trigger"]],
                                      description=HOSTILE["description"], tags=["hostile"])
    assert created and entry["name"] == HOSTILE["name"]
    return {**HOSTILE, "id": entry["id"]}


@pytest.fixture
def gallery_server():
    """`gallery_server(home, read_only=False)`: a `lorahub serve` of ``home`` running in this process on a
    free port (``.url``, ``.app``); stopped after the test."""
    from lorahub.web.server import GalleryServer

    started = []

    def _start(home: Path, **kw):
        srv = GalleryServer.bind(home, port=0, **kw).start()
        started.append(srv)
        return srv

    yield _start
    for srv in started:
        srv.stop()


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
