"""The Python API: the docs/api.md example runs, `import lorahub` stays light, one resolver for
"registry reference or file", the output rules, register_derived, and library errors in API terms."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorahub
from lorahub.errors import LorahubError, NotFound, OutputExists

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "api.md"


def _doc_code() -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S))


def test_docs_example_runs_and_its_results_hold(tmp_path, monkeypatch, home):
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "docs_api_example"}
    exec(compile(_doc_code(), str(DOC), "exec"), scope)
    style, other = lorahub.load_lora("style.safetensors"), lorahub.load_lora("other.safetensors")
    extracted = lorahub.load_lora("extracted.safetensors")
    mix = lorahub.load_lora("mix.safetensors")
    assert set(extracted.layers) == set(style.layers) == set(mix.layers)
    for key, layer in style.layers.items():
        want = layer.delta(torch.float64)
        # bake + extract gave the style LoRA back (rank 4 holds it exactly)
        torch.testing.assert_close(extracted.layers[key].delta(torch.float64), want, rtol=0, atol=1e-4)
        # the merge is the best rank-6 approximation of 0.7·A + 0.3·B
        exact = 0.7 * extracted.layers[key].delta(torch.float64) + 0.3 * other.layers[key].delta(torch.float64)
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        best = (u[:, :6] * s[:6]) @ vh[:6]
        torch.testing.assert_close(mix.layers[key].delta(torch.float64), best, rtol=0, atol=1e-4 * float(s[0]))
    # the example's registry lives where it said, the default home was not touched
    assert (tmp_path / "lorahub-home" / "lorahub.db").is_file() and not home.exists()


def test_readme_python_example_runs(tmp_path, monkeypatch, home, capsys):
    """The README's Python example (extract, merge with lineage, inspect) runs as printed."""
    monkeypatch.chdir(tmp_path)
    code = "\n".join(re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S))
    assert "lorahub.extract(" in code and "lorahub.merge(" in code and "lorahub.inspect(" in code
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "['merged-from', 'merged-from']" in printed
    mix = lorahub.load_lora("mix.safetensors")
    assert max(layer.rank for layer in mix.layers.values()) == 6
    assert (tmp_path / "lorahub-home" / "lorahub.db").is_file() and not home.exists()


def test_import_lorahub_is_light():
    code = ("import sys, lorahub; lorahub.Recipe; lorahub.RankCriteria; lorahub.resolve_lora; "
            "print(sorted(m for m in ('torch', 'numpy', 'pydantic', 'diffusers', 'transformers', 'safetensors') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_every_public_name_resolves_and_the_docs_table_lists_them():
    for name in lorahub.__all__:
        assert getattr(lorahub, name) is not None, name
    with pytest.raises(AttributeError):
        lorahub.no_such_thing  # noqa: B018
    table = {m for m in re.findall(r"^\| `([A-Za-z_]+)", DOC.read_text(encoding="utf-8"), re.M)}
    documented = set(re.findall(r"`([A-Za-z_]+)[`(]", "\n".join(
        line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| `"))))
    assert table and table <= set(lorahub.__all__)
    undocumented = {n for n in lorahub._API if not n.endswith("Result")} - documented
    assert not undocumented, undocumented


def test_lora_references_resolve_once(tmp_path, home, monkeypatch):
    from lorahub.refs import LazyRegistry, resolve_lora, resolve_model

    monkeypatch.chdir(tmp_path)
    f = lorahub.save_lora(_lora(), tmp_path / "a.safetensors")
    # files and path-like references never open (or create) the registry
    with LazyRegistry(home) as regs:
        ref = resolve_lora(str(f), regs)
        assert ref.path == f and ref.entry is None and ref.name == "a" and len(ref.sha256) == 64
        with pytest.raises(NotFound, match="no such file"):
            resolve_lora("missing.safetensors", regs)
        with pytest.raises(NotFound, match="no such file"):
            resolve_lora("sub/missing", regs)
        with pytest.raises(LorahubError, match="is a folder"):
            resolve_lora(str(tmp_path), regs)
        assert not regs.is_open
    assert not home.exists()
    # a name goes to the registry; a registered file is matched to its entry when asked
    with lorahub.open_registry(home) as reg:
        entry, _ = reg.add_file(f, name="alpha", triggers=["zq"])
        by_name = resolve_lora("alpha", reg)
        assert by_name.entry["id"] == entry["id"] and by_name.triggers == ["zq"] and by_name.parent == entry["id"]
        assert by_name.path.read_bytes() == f.read_bytes()
        assert resolve_lora(str(f), reg, match_registered=True).entry["id"] == entry["id"]
        with pytest.raises(NotFound, match="no registry entry"):
            resolve_lora("beta", reg)
        assert resolve_model("tiny-sd1").path.joinpath("model_index.json").is_file()
        with pytest.raises(LorahubError, match="not a checkpoint"):
            resolve_model("alpha", reg)


def test_outputs_are_not_overwritten_without_force(tmp_path, home, run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = lorahub.save_lora(_lora(), tmp_path / "in put.safetensors")
    res = lorahub.convert(src, "diffusers")
    assert res.out == tmp_path / "in put.diffusers.safetensors" and res.dialect == "diffusers"
    first = res.out.read_bytes()
    with pytest.raises(OutputExists, match="already exists"):
        lorahub.convert(src, "diffusers")
    again = lorahub.convert(src, "peft", out=res.out, force=True)
    assert again.out.read_bytes() != first
    with pytest.raises(LorahubError, match="is an input"):
        lorahub.convert(src, "kohya", out=src, force=True)
    # the command names its flag
    code, _, err = run("convert", str(src), "--to", "diffusers")
    assert code == 2 and "--force" in err and err.count("\n") == 1
    code, out, _ = run("convert", str(src), "--to", "diffusers", "--force", "--json")
    assert code == 0 and json.loads(out)["output"] == str(res.out)
    # default names from entry names are made safe: never a raw name in a path
    with lorahub.open_registry(home) as reg:
        evil, _ = reg.add_file(src, name="evil name")
        # names with path separators are refused now; a registry written before may still hold one
        reg.conn.execute("UPDATE entries SET name = '../../evil name' WHERE id = ?", (evil["id"],))
        made = lorahub.resize(evil["id"], rank=1, registry=reg)
        assert made.out.parent == Path(".") and "/" not in made.out.name and made.out.name.endswith("-r1.safetensors")
        assert lorahub.load_lora(made.out).ranks() == [1] * len(_lora().layers)


def test_register_derived_records_lineage_once(tmp_path, home):
    from lorahub.lineage import Parent, register_derived

    a = lorahub.save_lora(_lora(1), tmp_path / "a.safetensors")
    b = lorahub.save_lora(_lora(2), tmp_path / "b.safetensors")
    with lorahub.open_registry(home) as reg:
        pa, _ = reg.add_file(a, name="pa")
        sha = lorahub.resolve_lora(str(b)).sha256
        out = lorahub.save_lora(_lora(3), tmp_path / "c.safetensors")
        entry, created = register_derived(reg, out, relation="merged-from",
                                          parents=[Parent(pa["id"], {"weight": 1}), Parent(sha, {"weight": 2})],
                                          detail={"recipe": "x"}, name="child", base="sd2")
        assert created and entry["name"] == "child" and entry["base"] == "sd2"
        rows = reg.lineage(entry["id"])
        assert {(r["parent_id"], r["parent_sha256"]) for r in rows} == {(pa["id"], pa["sha256"]), (None, sha)}
        assert all(list(r["detail"]) == ["weight", "recipe"] for r in rows)
        # the same file again: nothing new
        again, created = register_derived(reg, out, relation="merged-from", parents=[pa["id"]])
        assert not created and again["id"] == entry["id"] and len(reg.lineage(entry["id"])) == 2
        # a file registered before without this relation gets it
        plain, _ = reg.add_file(b)
        _, created = register_derived(reg, b, relation="converted-from", parents=[pa["id"]], base="not-a-family")
        assert not created and [r["relation"] for r in reg.lineage(plain["id"])] == ["converted-from"]
        with pytest.raises(LorahubError, match="unknown lineage relation"):
            register_derived(reg, out, relation="copied-from", parents=[pa["id"]])


def test_one_unet_layout_map_for_module_and_parameter_paths():
    from diffusers import UNet2DConditionModel

    from lorahub.formats.names import get_arch, to_kohya, unet_from_ldm, unet_to_ldm

    arch = get_arch("sdxl")
    cfg = arch.unet_config
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    lpb = cfg["layers_per_block"]

    def has_attn(i):
        return "CrossAttn" in cfg["up_block_types"][i]

    for name in unet.state_dict():
        ldm = unet_to_ldm(name, lpb, has_attn)
        assert ldm is not None and unet_from_ldm(ldm, lpb) == name, name
    for module in (n for n in arch.modules if n.startswith("unet.")):
        path = module[len("unet."):]
        ldm = unet_to_ldm(path, lpb, has_attn)
        assert unet_to_ldm(path + ".weight", lpb, has_attn) == ldm + ".weight"
        assert to_kohya(module, arch) == "lora_unet_" + ldm.replace(".", "_")
    assert unet_to_ldm("down_blocks.1.attentions.0.proj_in", lpb, has_attn) == "input_blocks.4.1.proj_in"
    assert unet_to_ldm("up_blocks.0.upsamplers.0.conv", lpb, has_attn) == "output_blocks.2.2.conv"
    assert unet_to_ldm("down_blocks.0.downsamplers.0.conv.weight", lpb, has_attn) == "input_blocks.3.0.op.weight"


def test_library_errors_name_no_command_line_flags():
    """Messages raised outside lorahub/cli speak in parameters and concepts, never `--flag`s."""
    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
    bad = []
    for path in (REPO / "lorahub").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(("lorahub/cli/", "lorahub/train/trainer.py", "lorahub/registry/")) or \
                rel in ("lorahub/backup.py", "lorahub/repair.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                text = " ".join(c.value for c in ast.walk(node.exc)
                                if isinstance(c, ast.Constant) and isinstance(c.value, str))
                if flag.search(text):
                    bad.append(f"{rel}:{node.lineno}: {text[:80]}")
    assert not bad, bad


def _lora(seed: int = 0):
    from lorahub.formats.names import get_arch

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (out_f, in_f) in ((n, s) for n, s in get_arch("tiny-sd1").modules.items() if n.endswith("attn1.to_q")):
        layers[name] = lorahub.LoraLayer("lora", {"down": torch.randn(2, in_f, generator=g),
                                                  "up": torch.randn(out_f, 2, generator=g)}, alpha=2.0)
    return lorahub.LoraModel(layers=layers, base="sd1")
