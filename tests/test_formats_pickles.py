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
