"""Embedding tokens found in a file become its trigger words when nothing else names them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "real-loras" / "lora_disney.safetensors"


@pytest.mark.skipif(not REAL.exists(), reason="shared/real-loras not present")
def test_pivotal_file_tokens_become_triggers(tmp_path):
    from lorahub.registry import Registry

    reg = Registry.open(tmp_path / "home")
    entry, created = reg.add_file(REAL)
    assert created and entry["triggers"] == ["<s1>", "<s2>"]
    # explicit triggers win
    f = tmp_path / "copy.safetensors"
    shutil.copyfile(REAL, f)
    reg2 = Registry.open(tmp_path / "home2")
    entry2, _ = reg2.add_file(f, triggers=["disney style"])
    assert entry2["triggers"] == ["disney style"]


def test_embedding_token_trigger_is_searchable(tmp_path):
    from lorahub import tiny_loras
    from lorahub.registry import Registry

    files = tiny_loras.write_all(tmp_path / "files")
    reg = Registry.open(tmp_path / "home")
    entry, _ = reg.add_file(files["sd1-ti-webui"])
    assert entry["kind"] == "textual-inversion" and entry["triggers"] == ["tinytok"]
    assert [e["id"] for e in reg.search("tinytok")] == [entry["id"]]
