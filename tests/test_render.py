"""Grids, animations, and the `lorahub sweep / render / previews` commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lorahub.ops.grid import MIN_CELL, format_alpha, make_animation, make_grid, save_animation, save_image

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 200, 40), (40, 200, 220), (200, 40, 200)]


def _cells(rows=2, cols=3, size=64):
    return [[Image.new("RGB", (size, size), COLOURS[r * cols + c]) for c in range(cols)] for r in range(rows)]


def _count(img, colour):
    a = np.asarray(img.convert("RGB"))
    return int(np.all(a == np.array(colour), axis=-1).sum())


def test_grid_places_every_image_and_writes_labels(tmp_path):
    cells = _cells()
    grid = make_grid(cells, ["α=0", "α=0.5", "α=1"], ["a cat\nseed 1", "a dog\nseed 2"], title="my-lora on tiny-sd1",
                     col_axis="my-lora  α", row_axis="prompt · seed")
    # every 64 px cell is upscaled to a readable cell size, whole and unmixed
    for r in range(2):
        for c in range(3):
            assert _count(grid, COLOURS[r * 3 + c]) == MIN_CELL * MIN_CELL
    a = np.asarray(grid.convert("L"))
    dark = a < 100
    # the band above the images holds the title and the α labels: text pixels there
    top = grid.height - 2 * MIN_CELL - 3 * 12
    assert dark[:top].sum() > 200
    # left of the first image column: row labels
    assert dark[top:, :MIN_CELL].sum() > 100
    # the parameters travel in the PNG
    out = save_image(grid, tmp_path / "g.png", {"alphas": [0, 0.5, 1]})
    with Image.open(out) as im:
        assert im.size == grid.size and json.loads(im.text["lorahub"]) == {"alphas": [0, 0.5, 1]}
    # labels differ -> pixels differ
    other = make_grid(cells, ["α=9", "α=9", "α=9"], ["a cat\nseed 1", "a dog\nseed 2"], title="my-lora on tiny-sd1",
                      col_axis="my-lora  α", row_axis="prompt · seed")
    assert other.size == grid.size and not np.array_equal(np.asarray(other), np.asarray(grid))


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animation_cycles_alpha(tmp_path, suffix):
    cells = _cells(rows=2, cols=3)
    frames = make_animation(cells, ["α=0", "α=0.5", "α=1"], ["r1", "r2"], title="x")
    dest = save_animation(frames, tmp_path / f"a{suffix}")
    with Image.open(dest) as im:
        assert im.n_frames == 3 and im.is_animated
        for j in range(3):
            im.seek(j)
            fr = im.convert("RGB")
            # frame j shows column j of every row (GIF palettes keep these exact colours)
            for r in range(2):
                assert _count(fr, COLOURS[r * 3 + j]) == MIN_CELL * MIN_CELL


def test_format_alpha():
    assert [format_alpha(a) for a in (0, -0.0, 0.25, 1, 0.3333333, -1.5)] == ["0", "0", "0.25", "1", "0.333", "-1.5"]


# ------------------------------------------------------------------------------------------- CLI

FAST = ["--size", "64", "--steps", "2"]



@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    from lorahub import tiny_loras

    return tiny_loras.write_all(tmp_path_factory.mktemp("loras"))


def test_cli_sweep_grid_gif_and_previews(run, home, tmp_path, lora_files, tiny_sd1):
    from lorahub.registry import Registry

    reg = Registry.open(home)
    entry, _ = reg.add_file(lora_files["sd1-kohya"], name="tinychar-lora", triggers=["tinychar"])
    grid, gif = tmp_path / "grid.png", tmp_path / "sweep.gif"
    code, out, err = run("sweep", "tinychar-lora", "--base", "tiny-sd1", "--prompt", "a portrait", "--prompt",
                         "a house", "--alphas", "0,0.5,1", "--seeds", "1,2", *FAST, "--out", grid, "--gif", gif,
                         "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["images"] == 12 and rep["rows"] == 4 and rep["columns"] == 3
    assert rep["layers_applied"] == [60] and rep["layers_skipped"] == [0]
    with Image.open(grid) as im:
        params = json.loads(im.text["lorahub"])
        assert im.width > 3 * MIN_CELL and im.height > 4 * MIN_CELL
    assert params["prompts"] == ["tinychar, a portrait", "tinychar, a house"]  # trigger prepended
    assert params["alphas"] == [0.0, 0.5, 1.0] and params["seeds"] == [1, 2] and params["steps"] == 2
    with Image.open(gif) as im:
        assert im.n_frames == 3
    # stored as previews of the entry
    pv = Registry.open(home).previews(entry["id"])
    assert sorted(p["kind"] for p in pv) == ["animation", "grid"]
    assert next(p for p in pv if p["kind"] == "grid")["params"]["alphas"] == [0.0, 0.5, 1.0]
    # lorahub previews: list and export; exported bytes are the grid's bytes
    out_dir = tmp_path / "exported"
    code, out, err = run("previews", entry["id"], "--export", out_dir, "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert len(listed["previews"]) == 2 and len(listed["exported"]) == 2
    exported_grid = next(p for p in listed["exported"] if p.endswith("-grid.png"))
    assert open(exported_grid, "rb").read() == grid.read_bytes()
    code, out, _ = run("previews", "tinychar-lora")
    assert code == 0 and "grid" in out and "animation" in out
    # --no-trigger leaves the prompt alone
    code, out, err = run("sweep", "tinychar-lora", "--base", "tiny-sd1", "--prompt", "a portrait", "--alphas", "1",
                         "--seeds", "1", *FAST, "--out", tmp_path / "n.png", "--no-trigger", "--no-preview", "--json")
    assert code == 0, err
    assert json.loads(out)["params"]["prompts"] == ["a portrait"] and json.loads(out)["previews"] == []
    assert len(Registry.open(home).previews(entry["id"])) == 2


def test_cli_render_matches_diffusers(run, tmp_path, lora_files, tiny_sd1):
    """`lorahub render FILE:0.7` gives the image diffusers gives with load_lora_weights + set_adapters(0.7)."""
    import torch
    from diffusers import StableDiffusionPipeline

    path = lora_files["sd1-diffusers"]
    out = tmp_path / "r.png"
    code, stdout, err = run("render", f"{path}:0.7", "--base", "tiny-sd1", "--prompt", "a cat", "--seeds", "3",
                            *FAST, "--guidance", "6", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["files"][0]["file"] == str(out)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=64, width=64, guidance_scale=6.0)
    base = np.asarray(pipe("a cat", generator=torch.Generator("cpu").manual_seed(3), **kw).images[0], dtype=int)
    pipe.load_lora_weights(str(path), adapter_name="d")
    pipe.set_adapters(["d"], adapter_weights=[0.7])
    ref = np.asarray(pipe("a cat", generator=torch.Generator("cpu").manual_seed(3), **kw).images[0], dtype=int)
    got = np.asarray(Image.open(out).convert("RGB"), dtype=int)
    assert np.abs(got - ref).max() <= 1  # uint8 rounding
    assert np.abs(got - base).max() > 5  # and the LoRA did something


def test_cli_two_lora_grid_and_errors(run, cli, home, tmp_path, lora_files, tiny_sd1):
    grid = tmp_path / "g2.png"
    code, out, err = run("sweep", lora_files["sd1-kohya"], lora_files["sd1-loha"], "--base", "tiny-sd1", "--prompt",
                         "x", "--alphas", "0,1", "--alphas2", "0,0.5,1", "--seeds", "4", *FAST, "--guidance", "1",
                         "--out", grid, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["rows"] == 3 and rep["columns"] == 2 and rep["images"] == 6
    assert rep["previews"] == []  # files, not registry entries: nothing to attach previews to
    for args, msg in [
        (["sweep", lora_files["sd1-kohya"], "--base", "tiny-sd1", "--prompt", "x", "--alphas", "0,abc"], "--alphas"),
        (["sweep", lora_files["sd1-kohya"], "--base", "tiny-sd1", "--prompt", "x", "--size", "60"], "multiple of 8"),
        (["sweep", lora_files["sd1-kohya"], "--base", "tiny-sd1", "--prompt", "x", "--image", grid], "both an image and a mask"),
        (["sweep", lora_files["sd1-ti-diffusers"], "--base", "tiny-sd1", "--prompt", "x", *FAST], "render"),
        (["sweep", tmp_path / "missing.safetensors", "--base", "tiny-sd1", "--prompt", "x"], "no such file"),
        (["previews", "nosuchentry"], "no lorahub registry here yet"),  # opened without creating one
    ]:
        code, _, err = run(*args)
        assert code == 2 and msg in err, (args, err)
    # a real process: wrong base model -> exit 2, one line, no traceback
    r = cli("sweep", lora_files["sdxl-kohya"], "--base", "tiny-sd1", "--prompt", "x", *FAST, home=home)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "another base model" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_cli_sdxl_inpaint_and_embedding(run, tmp_path, lora_files, tiny_sd1, tiny_sdxl):
    # SDXL sweep with a kohya (SGM-named) LoRA on the tiny SDXL pipeline
    code, out, err = run("sweep", lora_files["sdxl-kohya"], "--base", "tiny-sdxl", "--prompt", "x", "--alphas", "0,1",
                         "--seeds", "1", *FAST, "--out", tmp_path / "xl.png", "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["images"] == 2 and rep["layers_applied"] == [112] and rep["layers_skipped"] == [0]
    # inpainting: --image and --mask switch to the inpainting pipeline
    Image.new("RGB", (64, 64), (90, 120, 200)).save(tmp_path / "init.png")
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(tmp_path / "mask.png")
    code, out, err = run("sweep", lora_files["sd1-kohya"], "--base", "tiny-sd1", "--prompt", "x", "--alphas", "0,1",
                         "--seeds", "1", *FAST, "--image", tmp_path / "init.png", "--mask", tmp_path / "mask.png",
                         "--out", tmp_path / "inp.png", "--json")
    assert code == 0, err
    assert json.loads(out)["params"]["inpaint"] is True
    # a textual-inversion file: render puts its token in the prompt; --no-trigger leaves the prompt plain
    outs = {}
    for flag in ([], ["--no-trigger"]):
        dest = tmp_path / f"ti{len(flag)}.png"
        code, out, err = run("render", lora_files["sd1-ti-diffusers"], "--base", "tiny-sd1", "--prompt", "a cat",
                             *FAST, "--out", dest, "--json", *flag)
        assert code == 0, err
        outs[len(flag)] = (json.loads(out)["files"][0]["prompt"], np.asarray(Image.open(dest), dtype=int))
    assert outs[0][0] == "<tinytok>, a cat" and outs[1][0] == "a cat"
    assert np.abs(outs[0][1] - outs[1][1]).max() > 5
