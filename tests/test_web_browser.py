"""`lorahub serve` in a real browser: Playwright (Python) driving headless Chromium from Debian's
`chromium` package (/usr/bin/chromium; .ci/run installs it — Playwright's own browser download is
never used). On the demo registry: search as you type, filter by base, open an entry, copy a trigger
and the webui token, scrub the α slider, follow a lineage link, edit tags and see them with
`lorahub show`, a hostile name shown as text; screenshots of the gallery and an entry page.

Skipped only when /usr/bin/chromium is missing, and never where LORAHUB_REQUIRE_BROWSER is set (CI)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lorahub.registry import Registry

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("LORAHUB_REQUIRE_BROWSER"):
            pytest.fail("the browser tests must run here, but /usr/bin/chromium is missing (apt-get install chromium)")
        pytest.skip("no /usr/bin/chromium: the browser tests drive Debian's chromium package "
                    "(apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (own cookies, clipboard allowed) and page; fails the test on any
    JavaScript error or dialog (an alert would mean injected script ran)."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900},
                              permissions=["clipboard-read", "clipboard-write"])
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    pg.set_default_timeout(60_000)
    pg.lorahub_problems = problems  # a test that expects an error response takes it out of this list
    yield pg
    ctx.close()
    assert not problems, problems


@pytest.fixture
def shots(tmp_path):
    """`shots(page, name, height=None)`: a screenshot of the page from its top (the whole page, or its first
    ``height`` pixels) in the test's tmp folder, and in $LORAHUB_SCREENSHOTS (e.g. docs/img) when that is
    set; returns its path."""
    folder = tmp_path / "screenshots"
    folder.mkdir()

    def _shot(pg, name: str, height: int | None = None) -> Path:
        path = folder / f"{name}.png"
        pg.evaluate("window.scrollTo(0, 0)")
        clip = None
        if height is not None:
            clip = {"x": 0, "y": 0, "width": pg.viewport_size["width"],
                    "height": min(height, pg.evaluate("document.documentElement.scrollHeight"))}
        pg.screenshot(path=str(path), full_page=True, clip=clip)
        dest = os.environ.get("LORAHUB_SCREENSHOTS")
        if dest:
            Path(dest).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(dest) / path.name)
        return path
    return _shot


def cards(pg) -> list[str]:
    return pg.locator("article.card").evaluate_all("els => els.map(e => e.dataset.id)")


def registry(home: Path) -> Registry:
    return Registry.open(home)


def test_gallery_search_as_you_type_and_filter_by_base(web_home, gallery_server, page, shots):
    from PIL import Image

    srv = gallery_server(web_home)
    with registry(web_home) as reg:
        everything = reg.search(None)
        by_trigger = [e["id"] for e in reg.search("tinych")]
        sdxl = sorted(e["id"] for e in reg.search(None, base="sdxl"))
        sdxl_lora = sorted(e["id"] for e in reg.search(None, base="sdxl", kind="lora"))
    page.goto(srv.url)
    assert sorted(cards(page)) == sorted(e["id"] for e in everything)
    assert page.locator("#count").inner_text() == str(len(everything))
    page.locator("article.card img").first.wait_for()  # the sweep entry's cover is a thumbnail
    page.evaluate("window.__sameDocument = true")
    # typing updates the results without a page load, and the address follows
    page.locator("input[name=q]").press_sequentially("tinych", delay=60)
    page.wait_for_function("ids => { const got = [...document.querySelectorAll('article.card')].map(e => e.dataset.id);"
                           " return JSON.stringify(got) === JSON.stringify(ids); }", arg=by_trigger)
    assert page.evaluate("window.__sameDocument") is True and page.url.endswith("/?q=tinych")
    # clear the search, filter by base
    page.locator("input[name=q]").fill("")
    page.locator("select[name=base]").select_option("sdxl")
    page.wait_for_function("n => document.querySelectorAll('article.card').length === n", arg=len(sdxl))
    assert sorted(cards(page)) == sdxl and page.url.endswith("/?base=sdxl")
    assert {t for t in page.locator("article.card .badge.base").all_inner_texts()} == {"sdxl"}
    page.locator("select[name=kind]").select_option("lora")
    page.wait_for_function("n => document.querySelectorAll('article.card').length === n", arg=len(sdxl_lora))
    assert sorted(cards(page)) == sdxl_lora and page.evaluate("window.__sameDocument") is True
    # a reload of that address shows the same filtered gallery
    page.reload()
    assert sorted(cards(page)) == sdxl_lora
    assert page.locator("select[name=base]").input_value() == "sdxl"
    page.goto(srv.url)
    shot = shots(page, "gallery")
    with Image.open(shot) as im:
        assert im.size[0] == 1280 and im.size[1] >= 900


def test_entry_page_copy_buttons(web_home, gallery_server, page, shots):
    srv = gallery_server(web_home)
    with registry(web_home) as reg:
        e = reg.resolve("sd1-kohya")
    page.goto(srv.url)
    page.locator("article.card a.name", has_text="sd1-kohya").click()  # open the entry from its card
    page.wait_for_url(f"**/entry/{e['id']}")
    assert page.locator("h1").inner_text() == "sd1-kohya"
    trigger = e["triggers"][0]
    page.locator(f"ul.triggers button[data-copy='{trigger}']").click()
    page.wait_for_function("() => document.querySelector('ul.triggers button.copy').textContent === 'copied'")
    assert page.evaluate("navigator.clipboard.readText()") == trigger
    page.locator("p.loratag button.copy").click()
    page.wait_for_function("() => document.querySelector('p.loratag button.copy').textContent === 'copied'")
    assert page.evaluate("navigator.clipboard.readText()") == "<lora:tiny-sd1-kohya:1>"
    page.locator("table.hashes tr", has_text="AutoV2").locator("button.copy").click()
    page.wait_for_timeout(100)
    assert page.evaluate("navigator.clipboard.readText()") == e["autov2"].upper()
    # the heat map and the per-layer table arrive after the page, computed on demand
    page.locator("svg.heatmap").wait_for()
    assert page.locator("svg.heatmap g.cell[data-value]").count() > 0
    page.locator("details.layers summary").click()
    assert page.locator("details.layers tbody tr").count() == e["n_layers"]
    page.locator("details.layers summary").click()
    page.locator(".scrub img.frame").evaluate("i => i.decode()")
    page.wait_for_function("() => !document.querySelector('button.copy.done')")
    shots(page, "entry", height=1250)
    shots(page, "entry-full")


def test_alpha_slider_scrubs_the_sweep_frames(web_home, gallery_server, page):
    srv = gallery_server(web_home)
    with registry(web_home) as reg:
        e = reg.resolve("sd1-kohya")
        anim = next(p for p in reg.previews(e["id"]) if p["kind"] == "animation")
    alphas = anim["params"]["alphas"]
    page.goto(srv.url + f"entry/{e['id']}")
    frame = page.locator(".scrub img.frame")
    slider = page.locator(".scrub input.alpha")
    label = page.locator(".scrub output.frame-label")
    page.wait_for_function("() => { const i = document.querySelector('.scrub img.frame'); "
                           "return i.complete && i.naturalWidth > 0; }")
    assert label.inner_text() == f"α = {alphas[0]:g}"
    seen = [frame.screenshot()]
    for i in range(1, len(alphas)):
        slider.focus()
        page.keyboard.press("ArrowRight")  # the keyboard moves the slider as a drag does
        page.wait_for_function("i => { const f = document.querySelector('.scrub img.frame'); "
                               "return f.dataset.frame === String(i) && f.complete && f.naturalWidth > 0 "
                               "&& f.currentSrc.endsWith('/frame/' + i); }",
                               arg=i)
        assert label.inner_text() == f"α = {alphas[i]:g}"
        seen.append(frame.screenshot())
    # each α shows another picture
    assert len(set(seen)) == len(alphas)
    slider.fill("0")  # back to the first frame: the first picture again
    page.wait_for_function("() => document.querySelector('.scrub img.frame').dataset.frame === '0'")
    page.wait_for_function("() => { const i = document.querySelector('.scrub img.frame'); return i.complete; }")
    assert frame.screenshot() == seen[0]


def test_lineage_links_lead_to_the_parent_and_children(web_home, gallery_server, page):
    srv = gallery_server(web_home)
    with registry(web_home) as reg:
        kohya = reg.resolve("sd1-kohya")
        merged = reg.resolve("merged")
        parents = {x["parent_id"] for x in reg.lineage(merged["id"])}
    assert kohya["id"] in parents
    page.goto(srv.url + f"entry/{kohya['id']}")
    page.locator(f"svg.graph a[href='/entry/{merged['id']}']").click()
    page.wait_for_url(f"**/entry/{merged['id']}")
    assert page.locator("h1").inner_text() == "merged"
    assert page.locator("svg.graph text.edge-label").all_text_contents().count("merged") == 2
    # and back to a parent through the merged entry's graph
    page.locator(f"svg.graph a[href='/entry/{kohya['id']}']").click()
    page.wait_for_url(f"**/entry/{kohya['id']}")
    assert page.locator("h1").inner_text() == "sd1-kohya"


def test_edit_tags_in_the_page_and_see_them_with_lorahub_show(web_home, gallery_server, page, cli):
    srv = gallery_server(web_home)
    with registry(web_home) as reg:
        e = reg.resolve("sd1-loha")
    page.goto(srv.url + f"entry/{e['id']}")
    page.locator("input[name=add]").fill("portrait, from the browser")
    page.locator("form.tags-form button[type=submit]").click()
    page.wait_for_url(f"**/entry/{e['id']}?saved=tags#tags")
    assert page.locator("p.saved").inner_text() == "tags saved"
    assert page.locator("#tag-list li.tag span").all_inner_texts() == e["tags"] + ["portrait", "from the browser"]
    shown = json.loads(cli("show", e["id"], "--json", home=web_home).stdout)
    assert shown["tags"] == e["tags"] + ["portrait", "from the browser"]
    # remove one with its × button
    page.locator("#tag-list li.tag", has_text="portrait").locator("button.x").click()
    page.wait_for_url("**?saved=tags#tags")
    assert page.locator("#tag-list li.tag span").all_inner_texts() == e["tags"] + ["from the browser"]
    assert json.loads(cli("show", e["id"], "--json", home=web_home).stdout)["tags"] == e["tags"] + ["from the browser"]
    # the type, through the edit form; a bad name is refused with the registry's message
    page.locator("select[name=type]").select_option("style")
    page.locator("form.edit-form button[type=submit]").click()
    page.wait_for_url("**?saved=edit#edit")
    assert page.locator(".facts .badge.type").inner_text() == "style"
    page.locator("form.edit-form input[name=name]").fill("sd1-kohya")
    page.locator("form.edit-form button[type=submit]").click()
    assert "is taken by entry" in page.locator("p.error").inner_text()
    assert page.lorahub_problems == ["console error: Failed to load resource: the server responded with a status of "
                                     "400 (Bad Request)"]  # the refused form comes back as a 400 page
    page.lorahub_problems.clear()
    shown = json.loads(cli("show", e["id"], "--json", home=web_home).stdout)
    assert (shown["name"], shown["type"]) == ("sd1-loha", "style")


def test_a_hostile_name_renders_as_text(web_home, hostile_entry, gallery_server, page):
    srv = gallery_server(web_home)
    page.goto(srv.url + "?tag=hostile")
    assert page.locator("article.card a.name").all_inner_texts() == [hostile_entry["name"]]
    page.locator("article.card a.name").click()
    page.wait_for_url(f"**/entry/{hostile_entry['id']}")
    assert page.locator("h1").inner_text() == hostile_entry["name"]
    assert page.locator("ul.triggers code").first.inner_text() == hostile_entry["trigger"]
    assert page.locator("p.description").inner_text() == hostile_entry["description"]
    # nothing of it became an element: one script (the page's own), no img/iframe/svg from the strings
    assert page.locator("script").count() == 1
    assert page.locator("img[src=x], iframe, svg[onload]").count() == 0
    assert page.locator("a[href^='file:'], a[href^='javascript:']").count() == 0
    page.locator("ul.triggers button.copy").first.click()
    page.wait_for_timeout(100)
    assert page.evaluate("navigator.clipboard.readText()") == hostile_entry["trigger"]
    # (the page fixture fails the test if any alert() ran)


def test_compare_in_the_browser(web_home, gallery_server, page):
    srv = gallery_server(web_home)
    with registry(web_home) as reg:
        a, b = reg.resolve("sd1-kohya"), reg.resolve("sd1-diffusers")
    page.goto(srv.url + "?base=sd1")
    for e in (a, b):
        page.locator(f"article.card[data-id='{e['id']}'] input[type=checkbox]").check()
    page.locator("button.compare-btn").click()
    page.wait_for_url("**/compare?**")
    names = page.locator("table.side-by-side thead th a").all_inner_texts()  # in the gallery's order
    assert sorted(names) == ["sd1-diffusers", "sd1-kohya"]
    import lorahub

    with registry(web_home) as reg:
        verdict = lorahub.diff(names[0], names[1], registry=reg).summary["verdict"]
    page.locator(".verdict").wait_for()
    assert page.locator(".verdict").inner_text() == f"{names[0]} vs {names[1]}: {verdict}"
    page.wait_for_function("() => document.querySelectorAll('svg.heatmap').length === 2")
