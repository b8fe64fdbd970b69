"""detect_bytes (detection from a file's bytes) and the caches behind it: the same results as detect(path),
cold or warm, fresh objects every time, and every hostile header still refused with the same words."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorahub import tiny_loras
from lorahub.errors import FormatError, UnsafeFile
from lorahub.formats import detect as det
from lorahub.formats.detect import detect, detect_bytes
from lorahub.formats.header import (MAX_METADATA_BYTES, SectionCache, header_from_bytes, parse_header_bytes,
                                    read_header)
from lorahub.tiny_loras import kohya_tensors, save_tensors

REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "real-loras"
SD1_MODULES = [f"lora_unet_down_blocks_{b}_attentions_{a}_transformer_blocks_0_{m}"
               for b in range(3) for a in range(2) for m in ("attn1_to_q", "attn1_to_k", "attn2_to_k", "attn2_to_v")]


def _outcome(fn, *args):
    """What ``fn(*args)`` gives: ("ok", the Detection as a dict) or (the error's type, its message)."""
    try:
        return "ok", dataclasses.asdict(fn(*args))
    except FormatError as exc:
        return type(exc).__name__, str(exc)


def _both_ways(path: Path) -> tuple:
    """detect(path), detect_bytes cold, detect_bytes warm (and from a memoryview): all must agree."""
    data = path.read_bytes()
    det.clear_cache()
    cold = _outcome(detect_bytes, data, path)
    warm = _outcome(detect_bytes, memoryview(data), path)
    by_path = _outcome(detect, path)
    det.clear_cache()
    by_path_cold = _outcome(detect, path)
    assert cold == warm == by_path == by_path_cold, path.name
    return cold


def _blob(header: dict | str, data: bytes = b"") -> bytes:
    raw = (json.dumps(header) if isinstance(header, dict) else header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


def _write(tmp_path: Path, blob: bytes, name: str = "x.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def _scan_like_files(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Small kohya LoRAs by the scan benchmark's recipe (benchmarks/registry.py make_files)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rank = int(rng.choice([2, 4, 8, 16]))
        mods = {m: (320, 768 if "attn2" in m else 320) for m in SD1_MODULES[: 4 + i % 20]}
        out.append(save_tensors(folder / f"d{i % 10}" / f"lora_{i:04d}.safetensors",
                                kohya_tensors(mods, rank=rank, alpha=rank / 2, seed=rng),
                                {"ss_network_dim": str(rank), "ss_output_name": f"lora_{i:04d}",
                                 "ss_tag_frequency": '{"5_x": {"zkz%d": 5, "tag": 2}}' % i}))
    return out


# ------------------------------------------------------------------------------------------------
# the same Detection as detect(path)

def test_every_fixture_lora_detects_the_same_from_bytes():
    files = tiny_loras.ensure()
    formats = {}
    for name, p in files.items():
        kind, d = _both_ways(p)
        assert kind == "ok", (name, d)
        formats[name] = d["format"]
    # the fixtures span the dialects, so every branch of the analysis was compared
    assert {"kohya", "lycoris", "diffusers", "peft", "cloneofsimo", "embedding"} <= set(formats.values())


@pytest.mark.skipif(not REAL.exists(), reason="shared/real-loras not present")
def test_every_real_lora_detects_the_same_from_bytes():
    files = sorted(REAL.glob("*.safetensors"))
    assert files
    for p in files:
        kind, d = _both_ways(p)
        assert kind == "ok" and d["format"] == "cloneofsimo", (p.name, d)


def test_dit_and_checkpoint_layouts_detect_the_same_from_bytes(tmp_path):
    """Flux LoRAs (kohya and ComfyUI keys), a bare DiT state dict and an SD checkpoint's keys."""
    flux = tiny_loras.flux_kohya_modules(double=2, single=2)
    small = {k: (8, 8) for k in flux}
    p1 = save_tensors(tmp_path / "flux_kohya.safetensors", kohya_tensors(small, rank=2))
    bfl = {f"diffusion_model.double_blocks.{i}.img_attn.qkv.lora_{ab}.weight": np.zeros((2, 2), np.float16)
           for i in range(2) for ab in "AB"}
    p2 = save_tensors(tmp_path / "flux_comfy.safetensors", bfl)
    ckpt = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
            np.zeros((4, 768), np.float16), "cond_stage_model.x.weight": np.zeros((2, 2), np.float16)}
    p3 = save_tensors(tmp_path / "ckpt.safetensors", ckpt, {"modelspec.architecture": "stable-diffusion-v1"})
    outcomes = [_both_ways(p) for p in (p1, p2, p3)]
    assert [o[0] for o in outcomes] == ["ok"] * 3
    assert outcomes[1][1]["format"] == "comfyui" and outcomes[2][1]["format"] == "checkpoint"


def test_scan_benchmark_files_detect_the_same_from_bytes(tmp_path):
    files = _scan_like_files(tmp_path, 44)
    det.clear_cache()
    cold = {p: dataclasses.asdict(detect_bytes(p.read_bytes(), p)) for p in files}
    warm = {p: dataclasses.asdict(detect_bytes(p.read_bytes(), p)) for p in files}
    by_path = {p: dataclasses.asdict(detect(p)) for p in files}
    assert cold == warm == by_path
    # ranks 2..16, alpha rank/2, sd1 from the shapes, 4..23 layers: read from each file, not from a neighbour
    for p, d in by_path.items():
        assert d["format"] == "kohya" and d["base"] == "sd1"
        assert d["alpha"] == d["rank"] / 2 and d["metadata"]["ss_network_dim"] == str(d["rank"])
        assert d["n_layers"] == 4 + int(p.stem.split("_")[1]) % 20
    # files with one structure share one header section: the cache served the repeats
    sections = {header_from_bytes(p.read_bytes()).section for p in files}
    assert None not in sections and len(sections) < len(files)


def test_pickle_suffixes_detect_the_same_from_bytes(tmp_path):
    kohya = tiny_loras.ensure()["sd1-kohya"].read_bytes()
    p = _write(tmp_path, kohya, "renamed.ckpt")  # a safetensors file under a pickle suffix
    assert _both_ways(p)[0] == "ok"
    legacy = _write(tmp_path, b"\x80\x02}q\x00." + b"\0" * 64, "old.pt")  # a legacy (non-zip) pickle
    for fn, arg in ((detect, legacy), (lambda q: detect_bytes(q.read_bytes(), q), legacy)):
        with pytest.raises(UnsafeFile, match="legacy pickle file"):
            fn(arg)


# ------------------------------------------------------------------------------------------------
# per-file values stay per file; no shared state between results

def test_same_structure_different_alpha_and_metadata(tmp_path):
    mods = {SD1_MODULES[2]: (320, 768), SD1_MODULES[0]: (320, 320), SD1_MODULES[1]: (320, 320)}
    a = save_tensors(tmp_path / "a.safetensors", kohya_tensors(mods, rank=4, alpha=2.0, seed=1),
                     {"ss_base_model_version": "sd_v1"})
    b_tensors = kohya_tensors(mods, rank=4, alpha=1.0, seed=2)
    b_tensors[f"{SD1_MODULES[0]}.alpha"] = np.array(3.0, np.float16)  # one layer of three differs
    b = save_tensors(tmp_path / "b.safetensors", b_tensors,
                     {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_network_alpha": "9"})
    c = save_tensors(tmp_path / "c.safetensors", kohya_tensors(mods, rank=4, alpha=5.0, seed=3))
    assert len({header_from_bytes(p.read_bytes()).section for p in (a, b, c)}) == 1  # one structure
    det.clear_cache()
    da, db, dc = (detect_bytes(p.read_bytes(), p) for p in (a, b, c))
    assert (da.alpha, db.alpha, dc.alpha) == (2.0, 1.0, 5.0)
    assert db.notes[0] == "alpha varies by layer (1..3)" and not any("varies" in n for n in da.notes + dc.notes)
    assert da.base == dc.base == db.base == "sd1"  # the shapes win...
    assert any("shapes say sd1 but modelspec.architecture says sdxl" in n for n in db.notes)  # ...with a note
    assert [e.source for e in da.evidence] == ["shapes", "ss_base_model_version"]
    assert [e.source for e in dc.evidence] == ["shapes"]
    assert (da.metadata, db.metadata["ss_network_alpha"], dc.metadata) == ({"ss_base_model_version": "sd_v1"}, "9", {})
    for p, d in zip((a, b, c), (da, db, dc)):
        assert d == detect(p)


def test_results_share_no_mutable_state(tmp_path):
    p = tiny_loras.ensure()["sd1-kohya"]
    data = p.read_bytes()
    det.clear_cache()
    first = detect_bytes(data, p)
    expected = dataclasses.asdict(first)
    first.parts.append("x")
    first.tokens.append("x")
    first.notes.append("x")
    first.evidence.clear()
    first.metadata["x"] = "y"
    first.alpha = -1.0
    second = detect_bytes(data, p)
    assert dataclasses.asdict(second) == expected
    for field in ("parts", "tokens", "notes", "evidence", "metadata"):
        assert getattr(first, field) is not getattr(second, field)
    h1 = header_from_bytes(data)
    h1.tensors.clear()
    h1.metadata.clear()
    h2 = header_from_bytes(data)
    assert h2.tensors and h2.metadata and h2 == read_header(p)


def test_section_cache_is_bounded():
    c = SectionCache(entries=3, chars=40)
    for i in range(5):
        c.put((f"s{i}", 0), i)
    assert [c.get((f"s{i}", 0)) for i in range(5)] == [c.MISSING, c.MISSING, 2, 3, 4]
    c.get(("s2", 0))  # used: s3 is now the oldest
    c.put(("s5", 0), 5)
    assert c.get(("s3", 0)) is c.MISSING and c.get(("s2", 0)) == 2
    c.put(("x" * 11, 0), "too long")  # longer than a quarter of the characters: never kept
    assert c.get(("x" * 11, 0)) is c.MISSING
    c.clear()
    for i in range(4):
        c.put((str(i) * 10, 0), i)  # 4 x 10 characters > 40 - 1: the oldest goes
    assert c.get(("0" * 10, 0)) is c.MISSING and c.get(("3" * 10, 0)) == 3


# ------------------------------------------------------------------------------------------------
# hostile headers: the same words from bytes as from the file, whether the tensor section is cached or not
T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
TS = '"a": ' + json.dumps(T)
HOSTILE = [
    b"",
    b"\x01\x02",
    struct.pack("<Q", 2**63) + b"{}",
    struct.pack("<Q", 1000) + b"{}",
    struct.pack("<Q", 1),
    struct.pack("<Q", 0) + b"\0" * 8,
    _blob("not json"),
    _blob("[1]"),
    _blob({}),
    _blob('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}', b"\0" * 4),
    _blob("{" + TS + ", " + TS + "}", b"\0" * 8),
    _blob({"a": T}, b"\0" * 12),
    _blob({"zz": T}, b"\0" * 8),
    _blob({"__metadata__": {"k": 1}, "a": T}, b"\0" * 8),
]
# the tensor section of a valid file, behind metadata that is wrong in every way the metadata can be
BAD_META = [
    '{"k": "1", "k": "2"}',
    '{"k": NaN}',
    '{"k": "\\udfff"}',
    '{"\\ud800": "v"}',
    '{"k": 1}',
    '[]',
    '"text"',
    '{"ss_tag_frequency": "' + "[" * 65 + "]" * 65 + '"}',
    '{"ss_tag_frequency": "{\\"d\\": {\\"t\\": Infinity}}"}',
    '{"ss_seed": "[' + "9" * 41 + ']"}',
    '{"x": "' + "a" * (MAX_METADATA_BYTES + 1) + '"}',
    '{"k": "v"} , ',
    '{"k": "v"',
    '{"a": ' * 3000 + "1" + "}" * 3000,
]


def _meta_first(meta_text: str, tail: str = TS) -> bytes:
    return _blob('{"__metadata__": ' + meta_text + (", " + tail if tail else "") + "}", b"\0" * 8)


HOSTILE += [_meta_first(m) for m in BAD_META]
HOSTILE += [
    _meta_first('{"k": "v"}', TS + ', "__metadata__": {}'),  # a second __metadata__ behind the tensors
    _meta_first('{"k": "v"}', TS + ', "__metadata__": ' + json.dumps(T)),
    _meta_first('{"k": "v"}', ""),  # metadata alone, no tensors: "holds no tensors"
    _blob('{"__metadata__": {"k": "v"}, }', b"\0" * 8),  # a trailing comma
    _blob('{"__metadata__": {"k": "v"}} x', b"\0" * 8),
    _blob('{"__metadata__": null, ' + TS + "}", b"\0" * 8),
]


@pytest.mark.parametrize("blob", HOSTILE, ids=[f"h{i}" for i in range(len(HOSTILE))])
def test_hostile_headers_give_the_same_error_from_bytes(tmp_path, blob):
    p = _write(tmp_path, blob)
    detections, headers = [], []
    for primed in (False, True):
        det.clear_cache()
        if primed:  # the valid file with the same tensor section first: its section is cached
            valid = _write(tmp_path, _meta_first('{"k": "v"}'), "valid.safetensors")
            assert header_from_bytes(valid.read_bytes()).section is not None
        detections += [_outcome(detect_bytes, blob, p), _outcome(detect, p)]
        try:
            headers.append(header_from_bytes(blob, p.name))
        except FormatError as exc:
            headers.append(str(exc))
        try:
            headers.append(read_header(p))
        except FormatError as exc:
            headers.append(str(exc))
    assert all(d == detections[0] for d in detections), detections
    assert all(h == headers[0] for h in headers), headers


def test_bad_metadata_is_refused_though_the_tensors_are_cached(tmp_path):
    valid = _meta_first('{"k": "v"}')
    det.clear_cache()
    header_from_bytes(valid)  # caches the tensor section
    words = ["duplicate", "non-finite", "unicode", "unicode", "not a string", "not an object", "not an object",
             "nested", "non-finite", "digits", "metadata larger", "not valid json", "not valid json", "nested"]
    for meta, w in zip(BAD_META, words):
        with pytest.raises(FormatError) as exc:
            parse_header_bytes(_meta_first(meta), len(_meta_first(meta)))
        assert w in str(exc.value).lower(), (meta[:40], str(exc.value))


# random headers: metadata first or not, right or wrong, read twice (cold, then with a warm cache)
tensor_desc = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F16", "F32", "BF16", "U8", "X"]),
    "shape": st.lists(st.integers(min_value=0, max_value=3), max_size=2),
    "data_offsets": st.lists(st.integers(min_value=0, max_value=12), min_size=2, max_size=2),
})
meta_val = st.one_of(st.text(max_size=6), st.integers(), st.none(),
                     st.sampled_from(['{"a": 1}', "[[[", '{"a": NaN}', "<embed>", "sd_v1", "sdxl"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["a.alpha", "lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight",
                                        "lora_unet_x.alpha", "emb_params", "unet:0:up", "unet:0:down", "t"]),
                       tensor_desc, max_size=4),
       st.one_of(st.none(), st.dictionaries(st.sampled_from(["k", "ss_v2", "name", "t"]), meta_val, max_size=3)),
       st.integers(min_value=0, max_value=24), st.sampled_from([", ", ",", " , \n"]))
def test_random_headers_detect_the_same_cold_and_warm(tmp_path, tensors, meta, data_len, sep):
    body = sep.join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in tensors.items())
    if meta is not None:
        body = '"__metadata__": ' + json.dumps(meta) + (sep + body if body else "")
    blob = _blob("{" + body + "}", bytes(range(data_len)))
    p = _write(tmp_path, blob, "r.safetensors")
    det.clear_cache()
    cold = [_outcome(detect_bytes, blob, p), _outcome(detect, p)]
    warm = [_outcome(detect_bytes, blob, p), _outcome(detect, p)]
    assert cold[0] == cold[1] == warm[0] == warm[1]


@pytest.mark.parametrize("keys", [["emb_params"], ["clip_l", "clip_g"], ["string_to_param.*"]])
def test_scalar_embedding_keys_are_refused_not_crashed(tmp_path, keys):
    """0-d tensors under embedding names used to raise IndexError (a traceback) from detect."""
    header = {k: {"dtype": "F32", "shape": [], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)}
    p = _write(tmp_path, _blob(header, b"\0" * 4 * len(keys)))
    for fn in (detect, lambda q: detect_bytes(q.read_bytes(), q)):
        with pytest.raises(FormatError, match="unknown format"):
            fn(p)


@pytest.mark.parametrize("keys, fmt", [
    (["lora_unet_x.hada_w1_a", "lora_unet_x.hada_w1_b"], "lycoris"),
    (["lora_unet_x.lokr_w1", "lora_unet_x.lokr_w2", "lora_unet_x.lokr_t2"], "lycoris"),
    (["unet:0:down", "unet:0:up", "<s1>"], "cloneofsimo"),
])
def test_scalar_factors_do_not_crash_detection(tmp_path, keys, fmt):
    """0-d factors where a rank or a width is read (hostile files) used to raise IndexError."""
    header = {"__metadata__": {"<s1>": "<embed>"}}
    header |= {k: {"dtype": "F16", "shape": [], "data_offsets": [2 * i, 2 * i + 2]} for i, k in enumerate(keys)}
    p = _write(tmp_path, _blob(header, b"\0" * 2 * len(keys)))
    kind, d = _both_ways(p)
    assert kind == "ok" and d["format"] == fmt and d["rank"] is None and d["base"] == "unknown"
