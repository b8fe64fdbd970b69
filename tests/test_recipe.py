"""Recipe parsing and validation: clear one-line errors, round trip, inline form, ref resolution."""

from __future__ import annotations

import pytest

from lorahub.errors import LorahubError
from lorahub.ops.recipe import inline_recipe, load_recipe, parse_inline, parse_recipe, resolve_recipe

GOOD = """
name = "miku-arcane"
base = "sd1"
output = "lora"
rank = 64
method = "svd"
[[lora]]
ref = "miku"
weight = 0.8
[[lora]]
ref = "arcane-style"
weight = -0.6
parts = ["unet"]
"""


def test_parse_good_recipe_and_round_trip():
    r = parse_recipe(GOOD)
    assert (r.name, r.base, r.output, r.rank, r.method) == ("miku-arcane", "sd1", "lora", 64, "svd")
    assert [(x.ref, x.weight, x.parts) for x in r.loras] == [("miku", 0.8, None), ("arcane-style", -0.6, ["unet"])]
    assert r.family == "sd1"
    again = parse_recipe(r.to_toml())
    assert again.to_toml() == r.to_toml()
    assert [(x.ref, x.weight, x.parts) for x in again.loras] == [(x.ref, x.weight, x.parts) for x in r.loras]


def test_method_defaults():
    assert parse_recipe('[[lora]]\nref = "a"\n').method == "concat"
    assert parse_recipe('rank = 8\n[[lora]]\nref = "a"\n').method == "svd"
    assert parse_recipe('[[lora]]\nref = "a"\n').loras[0].weight == 1.0


@pytest.mark.parametrize("text, message", [
    ('nmae = "x"\n[[lora]]\nref = "a"\n', "unknown key 'nmae'"),
    ('colour = 1\nsize = 2\n[[lora]]\nref = "a"\n', "unknown keys 'colour', 'size'"),
    ('[[lora]]\nref = "a"\nwieght = 0.5\n', "lora #1: unknown key 'wieght'"),
    ('[[lora]]\nref = "a"\nweight = "0.8"\n', "weight must be a number, got '0.8'"),
    ('[[lora]]\nref = "a"\nweight = true\n', "weight must be a number"),
    ('[[lora]]\nref = "a"\nweight = nan\n', "finite"),
    ('[[lora]]\nref = "a"\n[[lora]]\nweight = 1\n', "lora #2: 'ref'"),
    ('rank = 64\n', "no [[lora]]"),
    ('method = "avg"\n[[lora]]\nref = "a"\n', "method must be one of svd, concat, sum"),
    ('method = "svd"\n[[lora]]\nref = "a"\n', "needs a rank"),
    ('rank = 0\n[[lora]]\nref = "a"\n', "positive integer"),
    ('rank = 3.5\n[[lora]]\nref = "a"\n', "positive integer"),
    ('output = "ckpt"\n[[lora]]\nref = "a"\n', "output must be one of"),
    ('output = "checkpoint"\n[[lora]]\nref = "a"\n', "needs base"),
    ('[[lora]]\nref = "a"\nparts = [1]\n', "parts"),
    ('rank = = 3', "not valid TOML"),
])
def test_bad_recipes_have_clear_errors(text, message):
    with pytest.raises(LorahubError) as exc:
        parse_recipe(text, source="r.toml")
    msg = str(exc.value)
    assert message in msg and msg.startswith("r.toml") and "\n" not in msg


def test_inline_form():
    assert (parse_inline("miku:0.8").ref, parse_inline("miku:0.8").weight) == ("miku", 0.8)
    assert parse_inline("a/b.safetensors:-1.5").weight == -1.5
    assert parse_inline("miku").weight == 1.0
    with pytest.raises(LorahubError, match="weight 'abc' is not a number"):
        parse_inline("miku:abc")
    r = inline_recipe(["a:0.5", "b:0.25"], rank=16)
    assert r.method == "svd" and r.rank == 16 and [x.weight for x in r.loras] == [0.5, 0.25]
    assert parse_recipe(r.to_toml()).to_toml() == r.to_toml()
    with pytest.raises(LorahubError, match="method must be one of"):
        inline_recipe(["a:1"], method="mean")


def test_refs_resolve_relative_to_the_recipe_and_unresolvable_refs_fail(tmp_path, home):
    (tmp_path / "loras").mkdir()
    f = tmp_path / "loras" / "a.safetensors"
    f.write_bytes(b"not really a lora")
    rec = tmp_path / "r.toml"
    rec.write_text('[[lora]]\nref = "loras/a.safetensors"\nweight = 0.5\n')
    r = load_recipe(rec)
    (res,) = resolve_recipe(r)
    assert res.path == f and len(res.sha256) == 64 and res.parent == res.sha256
    rec.write_text('[[lora]]\nref = "nope"\n')
    with pytest.raises(LorahubError, match="lora #1: ref 'nope' does not resolve"):
        resolve_recipe(load_recipe(rec))
    from lorahub.registry import Registry

    with Registry.open(home) as reg:
        with pytest.raises(LorahubError, match="ref 'nope' does not resolve"):
            resolve_recipe(load_recipe(rec), registry=reg)
    with pytest.raises(LorahubError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.toml")
