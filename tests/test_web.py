"""`lorahub serve` over HTTP (no browser): what the pages list is what the registry holds, search and
paging agree with `lorahub search`, heavy results are computed once and cached by SHA-256, writes need
the session's CSRF token and go through the registry, read-only mode, the host check, images re-encoded
from the store by id, escaping, the CLI writing while the gallery reads, and the `serve` command.

The browser tests (search as you type, copy, the α slider, ...) are in test_web_browser.py."""

from __future__ import annotations

import html
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from markupsafe import escape
from PIL import Image, ImageSequence

from lorahub.errors import LorahubError
from lorahub.registry import Registry, queries
from lorahub.web import views

REPO = Path(__file__).resolve().parent.parent


class Client:
    """A tiny HTTP client with its own cookies (one browser session), that does not follow redirects."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict | list | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        hdrs = {"Host": f"{self.host}:{self.port}", **(headers or {})}
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form, doseq=True).encode()
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        for k, v in r.getheaders():
            if k.lower() == "set-cookie":
                name, _, rest = v.partition("=")
                self.cookies[name] = rest.split(";")[0]
        conn.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def text(self, path: str) -> str:
        status, _, body = self.get(path)
        assert status == 200, (path, status, body[:500])
        return body.decode()

    def csrf(self, path: str) -> str:
        return re.search(r'name="csrf" value="([0-9a-f]{64})"', self.text(path)).group(1)


def card_ids(page: str) -> list[str]:
    return re.findall(r'<article class="card" data-id="([0-9a-f]+)"', page)


def entry_by_name(home: Path, name: str) -> dict:
    with Registry.open(home) as reg:
        return reg.resolve(name)


# ------------------------------------------------------------------------------------------ the gallery
def test_gallery_lists_and_searches_like_lorahub_search(web_home, gallery_server):
    srv = gallery_server(web_home)
    c = Client(srv.url)
    with Registry.open(web_home) as reg:
        everything = reg.search(None)
        cases = [({}, reg.search(None)), ({"q": "tinych"}, reg.search("tinych")),
                 ({"base": "sdxl"}, reg.search(None, base="sdxl")), ({"kind": "loha"}, reg.search(None, kind="loha")),
                 ({"tag": "demo-sd1"}, reg.search(None, tags=["demo-sd1"])),
                 ({"q": "tiny", "base": "sd1"}, reg.search("tiny", base="sd1")),
                 ({"q": everything[0]["autov2"][:8]}, reg.search(everything[0]["autov2"][:8]))]
    assert len(everything) >= 14
    for params, expected in cases:
        page = c.text("/?" + urlencode(params))
        got = card_ids(page)
        assert sorted(got) == sorted(e["id"] for e in expected), params
        if params.get("q"):  # best match first, as `lorahub search` orders them
            assert got == [e["id"] for e in expected], params
        assert f'<span id="count">{len(expected)}</span>' in page or not expected
        # the fragment that search-as-you-type swaps in holds the same cards
        assert card_ids(c.text("/?" + urlencode({**params, "fragment": 1}))) == got
    # the filter menus offer what the registry holds, with counts
    page = c.text("/")
    for base in {e["base"] for e in everything}:
        n = sum(e["base"] == base for e in everything)
        assert f'<option value="{base}">{base} ({n})</option>' in page
    # a query without a word finds nothing (as `lorahub search`), and says so
    assert card_ids(c.text("/?q=%2B%2B%2B")) == [] and "No entry matches" in c.text("/?q=%2B%2B%2B")


@pytest.mark.parametrize("sort", list(views.SORTS))
def test_paging_walks_the_search_order_without_gaps(web_home, gallery_server, monkeypatch, sort):
    monkeypatch.setattr(views, "PAGE_SIZE", 4)
    srv = gallery_server(web_home)
    c = Client(srv.url)
    q = "tiny" if sort == "relevance" else ""
    with Registry.open(web_home) as reg:
        order = None if sort == "relevance" else sort
        expected = [e["id"] for e in queries.search(reg.conn, q or None, order=order)]
        assert queries.search_count(reg.conn, q or None) == len(expected)
    pages = -(-len(expected) // 4)
    got = []
    for n in range(1, pages + 1):
        page = c.text("/?" + urlencode({"q": q, "sort": sort, "page": n}))
        assert f"page {n} of {pages}" in page
        got += card_ids(page)
    assert got == expected
    # a page past the end shows the last page
    assert card_ids(c.text("/?" + urlencode({"q": q, "sort": sort, "page": 999}))) == expected[(pages - 1) * 4:]


def test_filter_menus_count_what_the_filters_find(web_home):
    with Registry.open(web_home) as reg:
        e = reg.search(None)[0]
        reg.change_tags(e["id"], add=["STYLE"])
        reg.change_tags(reg.search(None)[1]["id"], add=["style"])
        reg.update(e["id"], type="style")
        f = views.facets(reg.conn)
        assert [n for _, n in f.bases] == sorted((n for _, n in f.bases), reverse=True)
        for items, arg in ((f.types, "type"), (f.bases, "base"), (f.kinds, "kind")):
            assert sum(n for _, n in items) == reg.count() - (sum(x["type"] is None for x in reg.search(None))
                                                               if arg == "type" else 0)
            for value, n in items:
                assert queries.search_count(reg.conn, None, **{arg: value}) == n, (arg, value)
        assert ("STYLE", 2) in f.tags and not any(t == "style" for t, _ in f.tags)  # one entry, any case
        for tag, n in f.tags:
            assert queries.search_count(reg.conn, None, tags=[tag]) == n, tag


def test_registry_search_pages_and_counts(web_home):
    """The registry's paged search (order/offset) is the full search, sliced; search_count its length."""
    with Registry.open(web_home) as reg:
        for order in (None, *queries.SEARCH_ORDERS):
            for kw in ({}, {"base": "sd1"}, {"query": "tiny"}, {"query": "tiny", "kind": "lora"}):
                full = reg.search(kw.get("query"), base=kw.get("base"), kind=kw.get("kind"))
                if order is not None:
                    full = queries.search(reg.conn, kw.get("query"), base=kw.get("base"), kind=kw.get("kind"),
                                          order=order)
                assert queries.search_count(reg.conn, kw.get("query"), base=kw.get("base"),
                                            kind=kw.get("kind")) == len(full)
                pages = [queries.search(reg.conn, kw.get("query"), base=kw.get("base"), kind=kw.get("kind"),
                                        order=order, limit=3, offset=k) for k in range(0, len(full), 3)]
                assert [e["id"] for p in pages for e in p] == [e["id"] for e in full]
                assert [e for p in pages for e in p] == full  # the same decoded rows
        by = {o: queries.search(reg.conn, None, order=o) for o in queries.SEARCH_ORDERS}
        assert [e["size"] for e in by["size"]] == sorted((e["size"] for e in by["size"]), reverse=True)
        assert [e["added_at"] for e in by["added"]] == sorted((e["added_at"] for e in by["added"]), reverse=True)
        assert [e["name"].casefold() for e in by["name"]] == sorted(e["name"].casefold() for e in by["name"])
        with pytest.raises(LorahubError, match="unknown order"):
            queries.search(reg.conn, None, order="popularity")


def test_entry_page_shows_everything_the_registry_knows(web_home, gallery_server):
    srv = gallery_server(web_home)
    c = Client(srv.url)
    with Registry.open(web_home) as reg:
        reg.set_remote("sd1-kohya", repo="someone/tiny-lora", revision="main", commit="a" * 40,
                       endpoint="https://huggingface.co")
        rec = reg.record("sd1-kohya")
    page = c.text(f"/entry/{rec['id']}")
    # every hash, with a copy button holding it (Civitai's spelling)
    for col in ("sha256", "autov1", "autov2", "autov3", "crc32", "blake3"):
        if rec[col]:
            v = rec[col].upper() if col in ("sha256", "autov1", "autov2", "crc32") else rec[col]
            assert f'data-copy="{v}"' in page, col
    # triggers, and the webui prompt token of the file
    for t in rec["triggers"]:
        assert f'data-copy="{t}"' in page
    assert 'data-copy="&lt;lora:tiny-sd1-kohya:1&gt;"' in page
    # metadata tables: kohya ss_* keys and modelspec.* keys
    meta = rec["metadata"]
    assert "kohya training (ss_*)" in page and "<th>network_dim</th><td>" + meta["ss_network_dim"] in page
    # the sweep: its grid, and the animation with one slider position per frame (= per α)
    kinds = {p["kind"]: p for p in rec["previews"]}
    assert {"grid", "animation"} <= set(kinds)
    with Image.open(kinds["animation"]["path"]) as im:
        frames = im.n_frames
    anim = kinds["animation"]
    assert frames == len(anim["params"]["alphas"]) == 3
    assert f'data-frames="{frames}" data-src="/preview/{anim["id"]}/frame/"' in page
    assert f'max="{frames - 1}"' in page
    for a in anim["params"]["alphas"]:
        assert f'label="α = {a:g}"' in page
    assert f'src="/preview/{kinds["grid"]["id"]}"' in page
    # the lineage: every entry made from it is linked
    assert rec["children"]
    for child in rec["children"]:
        assert f'href="/entry/{child["entry_id"]}"' in page
    # the Hub remote, linked at its commit
    assert 'href="https://huggingface.co/someone/tiny-lora/tree/' + "a" * 40 + '"' in page
    # the heat map is not computed for the page: it is loaded afterwards
    assert f'data-fragment="/entry/{rec["id"]}/analysis?part=heatmap"' in page
    assert srv.app.state.analyses.computed == 0
    # the merged entry's page links both of its parents
    merged = entry_by_name(web_home, "merged")
    with Registry.open(web_home) as reg:
        parents = [x["parent_id"] for x in reg.lineage(merged["id"])]
    page = c.text(f"/entry/{merged['id']}")
    assert len(parents) == 2 and all(f'href="/entry/{p}"' in page for p in parents)
    # an unknown entry is a 404 page
    status, _, body = c.get("/entry/nosuchentry")
    assert status == 404 and b"no registry entry matches" in body


def test_heat_map_and_layers_are_the_inspect_report_computed_once(web_home, gallery_server):
    import lorahub

    srv = gallery_server(web_home)
    c = Client(srv.url)
    e = entry_by_name(web_home, "sd1-kohya")
    c.text("/")
    c.text(f"/entry/{e['id']}")
    cache = web_home / "cache" / "inspect" / f"{e['sha256']}.json"
    assert srv.app.state.analyses.computed == 0 and not cache.exists()  # never for the gallery or the page
    part = c.text(f"/entry/{e['id']}/analysis")
    assert srv.app.state.analyses.computed == 1 and cache.is_file()
    with Registry.open(web_home) as reg:
        report = lorahub.inspect(e["id"], registry=reg).report
    cells = [float(v) for v in re.findall(r'<g class="cell" data-value="([^"]+)"', part)]
    want = [v for row in report["grid"]["values"] for v in row if v is not None]
    assert len(cells) == len(want) > 0
    assert cells == pytest.approx(want, rel=1e-12)
    for row in report["grid"]["rows"]:
        from lorahub.ops.heatmap import row_label

        assert f">{row_label(row)}</text>" in part
    # the per-layer table: every layer, strongest first, with its Frobenius norm
    rows = re.findall(r"<tr><td>([^<]+)</td><td>[^<]*</td><td>[^<]*</td><td>[^<]*</td><td>[^<]*</td><td>[^<]*</td>"
                      r"<td>[^<]*</td><td>([^<]*)</td>", part)
    by_fro = sorted(report["per_layer"], key=lambda s: -s["fro"])
    assert [k for k, _ in rows] == [s["key"] for s in by_fro]
    assert [float(f) for _, f in rows] == pytest.approx([s["fro"] for s in by_fro], rel=1e-3)
    # the training tags as bars, most frequent first
    bars = re.findall(r'<g class="bar" data-tag="([^"]+)" data-count="(\d+)"', part)
    assert [(t, int(n)) for t, n in bars] == [tuple(x) for x in report["metadata"]["tags"][:30]]
    # again: read from the cache (same page, nothing computed); a new server reads the disk cache
    assert c.text(f"/entry/{e['id']}/analysis") == part and srv.app.state.analyses.computed == 1
    srv2 = gallery_server(web_home)
    assert Client(srv2.url).text(f"/entry/{e['id']}/analysis") == part
    assert srv2.app.state.analyses.computed == 0
    assert json.loads(cache.read_text())["result"]["grid"] == json.loads(json.dumps(report["grid"]))


def test_a_slow_analysis_never_blocks_the_gallery(web_home, gallery_server, monkeypatch):
    import threading

    import lorahub.ops.inspect as inspect_mod

    real, started, release = inspect_mod.inspect_lora, threading.Event(), threading.Event()

    def slow_inspect(*args, **kw):
        started.set()
        assert release.wait(60)
        return real(*args, **kw)

    monkeypatch.setattr(inspect_mod, "inspect_lora", slow_inspect)
    srv = gallery_server(web_home)
    e = entry_by_name(web_home, "sd1-kohya")
    results = {}
    waiting = threading.Thread(target=lambda: results.update(part=Client(srv.url).text(f"/entry/{e['id']}/analysis")))
    waiting.start()
    try:
        assert started.wait(60)
        c = Client(srv.url)  # while the heat map is being computed, every other page answers
        assert len(card_ids(c.text("/"))) >= 14 and "sd1-kohya" in c.text(f"/entry/{e['id']}")
        assert card_ids(c.text("/?q=tinych&fragment=1"))
        assert "part" not in results
    finally:
        release.set()
        waiting.join(60)
    assert 'class="cell"' in results["part"] and srv.app.state.analyses.computed == 1


def test_a_file_that_cannot_be_inspected_says_why(web_home, gallery_server, tmp_path):
    from lorahub.tiny_loras import save_tensors

    import numpy as np

    # a kohya file whose factors disagree in rank: `add` takes it (header only), inspect refuses it
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    bad = save_tensors(tmp_path / "bad.safetensors", {f"{key}.lora_down.weight": np.ones((4, 320), np.float16),
                                                      f"{key}.lora_up.weight": np.ones((320, 3), np.float16)})
    with Registry.open(web_home) as reg:
        e, _ = reg.add_file(bad, name="mismatched")
    srv = gallery_server(web_home)
    part = Client(srv.url).text(f"/entry/{e['id']}/analysis")
    assert "Cannot map this file" in part and 'class="cell"' not in part


# ------------------------------------------------------------------------------------------ compare
def test_compare_shows_entries_side_by_side_with_the_diff_verdict(web_home, gallery_server):
    import lorahub

    srv = gallery_server(web_home)
    c = Client(srv.url)
    a, b = entry_by_name(web_home, "sd1-kohya"), entry_by_name(web_home, "sd1-diffusers")
    page = c.text(f"/compare?id={a['id']}&id={b['id']}")
    assert f'href="/entry/{a["id"]}">sd1-kohya</a></th><th><a href="/entry/{b["id"]}">sd1-diffusers</a>' in page
    assert "<th>format</th><td>kohya</td><td>diffusers</td>" in page
    assert f'data-fragment="/diff?a={a["id"]}&amp;b={b["id"]}"' in page
    part = c.text(f"/diff?a={a['id']}&b={b['id']}")
    with Registry.open(web_home) as reg:
        verdict = lorahub.diff(a["id"], b["id"], registry=reg).summary["verdict"]
    assert html.escape(verdict, quote=False) in part
    assert srv.app.state.analyses.computed == 1
    assert (web_home / "cache" / "diff" / f"{a['sha256']}-{b['sha256']}.json").is_file()
    # one entry is not a comparison
    status, _, body = c.get(f"/compare?id={a['id']}&id={a['id']}")
    assert status == 400 and b"two or more different entries" in body


# ------------------------------------------------------------------------------------------ writes
def test_writes_need_the_sessions_csrf_token(web_home, gallery_server, cli):
    srv = gallery_server(web_home)
    e = entry_by_name(web_home, "sd1-kohya")
    alice, mallory = Client(srv.url), Client(srv.url)
    token = alice.csrf(f"/entry/{e['id']}")
    mallory.text("/")  # mallory has a session of her own
    path = f"/entry/{e['id']}/tags"
    refused = [
        (alice, {"add": "x1"}, {}),                                       # no token
        (alice, {"add": "x2", "csrf": "0" * 64}, {}),                     # a wrong token
        (mallory, {"add": "x3", "csrf": token}, {}),                      # another session's token
        (alice, {"add": "x4", "csrf": token}, {"Origin": "http://evil.example"}),   # from another site
        (alice, {"add": "x5", "csrf": token}, {"Sec-Fetch-Site": "cross-site"}),
    ]
    for client, form, headers in refused:
        status, _, body = client.request("POST", path, form=form, headers=headers)
        assert status == 403, (form, headers, status)
    assert entry_by_name(web_home, e["id"])["tags"] == e["tags"]
    # with the token: one write through the registry, then back to the page
    status, hdrs, _ = alice.request("POST", path, form={"add": "portrait, Web Test", "csrf": token},
                                    headers={"Origin": srv.url.rstrip("/")})
    assert status == 303 and hdrs["location"] == f"/entry/{e['id']}?saved=tags#tags"
    assert entry_by_name(web_home, e["id"])["tags"] == e["tags"] + ["portrait", "Web Test"]
    # `lorahub show` (another process) sees it
    r = cli("show", e["id"], "--json", home=web_home)
    assert r.returncode == 0 and json.loads(r.stdout)["tags"] == e["tags"] + ["portrait", "Web Test"]
    status, _, _ = alice.request("POST", path, form={"remove": "web test", "csrf": token})  # case-insensitive
    assert status == 303 and entry_by_name(web_home, e["id"])["tags"] == e["tags"] + ["portrait"]
    assert "tags saved" in alice.text(f"/entry/{e['id']}?saved=tags")


def test_edit_uses_the_registry_rules(web_home, gallery_server):
    srv = gallery_server(web_home)
    c = Client(srv.url)
    e = entry_by_name(web_home, "sd1-kohya")
    token = c.csrf(f"/entry/{e['id']}")
    form = {"csrf": token, "name": e["name"], "type": "", "base": e["base"], "triggers": "\n".join(e["triggers"]),
            "description": ""}
    # refused as `lorahub edit` refuses: a taken name, an unknown type; nothing changes
    for change, message in (({"name": "sd1-diffusers"}, "is taken by entry"), ({"type": "landscape"}, "unknown type"),
                            ({"base": "sd9"}, "unknown base"), ({}, "nothing to change")):
        status, _, body = c.request("POST", f"/entry/{e['id']}/edit", form={**form, **change})
        assert status == 400 and message in html.unescape(body.decode()), change
        assert entry_by_name(web_home, e["id"]) == e
    status, _, _ = c.request("POST", f"/entry/{e['id']}/edit", form={
        **form, "name": "  renamed-kohya ", "type": "style", "triggers": "tinychar\r\nsecond word\n\n",
        "description": "a <b>tiny</b> style"})
    assert status == 303
    after = entry_by_name(web_home, e["id"])
    assert (after["name"], after["type"], after["triggers"], after["description"]) == (
        "renamed-kohya", "style", ["tinychar", "second word"], "a <b>tiny</b> style")
    with Registry.open(web_home) as reg:  # the full-text index follows the edit
        assert [x["id"] for x in reg.search("second word")] == [e["id"]]
    page = c.text(f"/entry/{e['id']}")
    assert "a &lt;b&gt;tiny&lt;/b&gt; style" in page and "<b>tiny</b>" not in page


def test_read_only_offers_no_edit_and_refuses_writes(web_home, gallery_server, tmp_path):
    srv = gallery_server(web_home, read_only=True)
    c = Client(srv.url)
    e = entry_by_name(web_home, "sd1-kohya")
    page = c.text(f"/entry/{e['id']}")
    assert 'method="post"' not in page and "read-only" in page
    # even with a valid token (taken from the server's own secret), every write is refused
    token = srv.app.state.guard.token(c.cookies[srv.app.state.guard.cookie])
    for path, form in ((f"/entry/{e['id']}/tags", {"add": "x"}), (f"/entry/{e['id']}/edit", {"name": "y"})):
        status, _, body = c.request("POST", path, form={**form, "csrf": token})
        assert status == 403 and b"read-only" in body
    assert entry_by_name(web_home, e["id"]) == e
    # the catalogue connection itself cannot write
    reg = srv.app.state.registries.get()
    with pytest.raises(LorahubError):
        reg.change_tags(e["id"], add=["x"])
    # nothing is written to the home: heat maps and thumbnails stay in memory
    db = (web_home / "lorahub.db").read_bytes()
    assert 'class="cell"' in c.text(f"/entry/{e['id']}/analysis")
    preview = next(p for p in reg.previews(e["id"]) if p["kind"] == "grid")
    assert c.get(f"/preview/{preview['id']}/thumb")[0] == 200
    assert not (web_home / "cache").exists() and (web_home / "lorahub.db").read_bytes() == db
    # a read-only gallery never creates a registry
    from lorahub.web.server import GalleryServer

    with pytest.raises(LorahubError, match="no lorahub registry here"):
        GalleryServer.bind(tmp_path / "nothing", port=0, read_only=True)
    assert not (tmp_path / "nothing" / "lorahub.db").exists()


# ------------------------------------------------------------------------------------------ security
def test_host_check_and_security_headers(web_home, gallery_server):
    srv = gallery_server(web_home)
    c = Client(srv.url)
    for host in ("evil.example", f"evil.example:{srv.port}", "127.0.0.2", ""):
        status, _, _ = c.get("/", headers={"Host": host})
        assert status == 421, host
    for host in (f"localhost:{srv.port}", f"127.0.0.1:{srv.port}", "localhost"):
        assert c.get("/", headers={"Host": host})[0] == 200
    status, hdrs, _ = Client(srv.url).get("/")  # a new browser: a new session cookie
    assert hdrs["x-content-type-options"] == "nosniff" and hdrs["x-frame-options"] == "DENY"
    csp = hdrs["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    cookie = hdrs["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert re.fullmatch(r"app;dur=[0-9.]+", hdrs["server-timing"])
    # the page's own scripts are files of the package: no inline script at all
    page = c.text("/")
    from lorahub import __version__

    assert re.findall(r"<script[^>]*>", page) == [f'<script src="/static/app.js?v={__version__}" defer>']


def test_images_are_reencoded_from_the_store_by_id(web_home, gallery_server, png_bytes, tmp_path):
    e = entry_by_name(web_home, "sd1-kohya")
    # a PNG that is also an HTML page (bytes after the image end)
    poly = tmp_path / "poly.png"
    poly.write_bytes(png_bytes((0, 128, 255), (40, 30)) + b"<html><script>alert(1)</script></html>")
    with Registry.open(web_home) as reg:
        reg.add_preview(e["id"], poly, kind="sidecar", params={"seed": 5})
        previews = {p["kind"]: p for p in reg.previews(e["id"])}
    srv = gallery_server(web_home)
    c = Client(srv.url)
    for kind, p in previews.items():
        stored = Path(p["path"])
        status, hdrs, body = c.get(f"/preview/{p['id']}")
        assert status == 200 and hdrs["x-content-type-options"] == "nosniff"
        assert "sandbox" in hdrs["content-security-policy"]
        with Image.open(io.BytesIO(body)) as got, Image.open(stored) as want:
            assert hdrs["content-type"] == ("image/gif" if kind == "animation" else "image/png")
            assert got.format == ("GIF" if kind == "animation" else "PNG")
            if kind != "animation":
                assert got.convert("RGB").tobytes() == want.convert("RGB").tobytes()
            else:
                assert got.n_frames == want.n_frames
        assert body != stored.read_bytes() and b"<script" not in body
    # animation frames, one by one, are the stored frames
    anim = previews["animation"]
    with Image.open(anim["path"]) as want:
        frames = [f.convert("RGB") for f in ImageSequence.Iterator(want)]
    for i, frame in enumerate(frames):
        status, hdrs, body = c.get(f"/preview/{anim['id']}/frame/{i}")
        assert status == 200 and hdrs["content-type"] == "image/png"
        assert Image.open(io.BytesIO(body)).convert("RGB").tobytes() == frame.tobytes()
    assert c.get(f"/preview/{anim['id']}/frame/{len(frames)}")[0] == 404
    # thumbnails are small
    with Image.open(io.BytesIO(c.get(f"/preview/{previews['grid']['id']}/thumb")[2])) as th:
        assert max(th.size) <= 360
    # only ids: no path from the request reaches the file system
    for path in ("/preview/999999", "/preview/abc", "/preview/1/..%2F..%2Florahub.db", "/preview/1/../../lorahub.db",
                 "/static/../lorahub.db", "/static/..%2F..%2Fregistry%2F__init__.py", "/preview/1/x",
                 f"/preview/{anim['id']}/..", "/entry/../lorahub.db"):
        status, _, body = c.get(path)
        assert status in (404, 421), path
        assert b"SQLite format" not in body and b"class Registry" not in body
    # the file download is the stored blob, as an attachment
    status, hdrs, body = c.get(f"/entry/{e['id']}/file")
    assert status == 200 and hdrs["content-type"] == "application/octet-stream"
    assert 'attachment; filename="sd1-kohya.safetensors"' in hdrs["content-disposition"]
    import hashlib

    assert hashlib.sha256(body).hexdigest() == e["sha256"]


def test_hostile_strings_are_escaped_everywhere(web_home, hostile_entry, gallery_server):
    srv = gallery_server(web_home)
    c = Client(srv.url)
    hid = hostile_entry["id"]
    pages = {"gallery": c.text("/"), "search": c.text("/?q=alert&fragment=1"), "entry": c.text(f"/entry/{hid}"),
             "compare": c.text(f"/compare?id={hid}&id=sd1-kohya")}
    assert hid in card_ids(pages["search"])
    for label, page in pages.items():
        # no markup of the attacker's reaches the page as markup
        for needle in ("<script>alert", "<img src=x", "<iframe", "<svg onload", "onerror=alert(2)>"):
            assert needle not in page, (label, needle)
        assert str(escape(hostile_entry["name"])) in page, label
    entry = pages["entry"]
    assert f'<code>{escape(hostile_entry["trigger"])}</code>' in entry
    assert f'data-copy="{escape(hostile_entry["trigger"])}"' in entry  # inside the copy button's attribute
    assert str(escape(hostile_entry["description"])) in entry
    assert str(escape(hostile_entry["title"])) in entry  # metadata table
    # and the name is shown as typed, Rich-markup brackets included
    assert f'<h1 id="entry-name">{escape(hostile_entry["name"])}</h1>' in entry


# ------------------------------------------------------------------------------------------ with the CLI
def test_entries_added_by_the_cli_appear_on_reload(web_home, gallery_server, cli, tmp_path):
    from lorahub.tiny_loras import kohya_file

    srv = gallery_server(web_home)
    c = Client(srv.url)
    before = card_ids(c.text("/"))
    f = kohya_file(tmp_path / "fresh.safetensors", seed=99)
    r = cli("add", f, "--name", "fresh-from-the-cli", "--tag", "new", home=web_home)
    assert r.returncode == 0, r.stderr
    page = c.text("/")  # newest first
    ids = card_ids(page)
    new = entry_by_name(web_home, "fresh-from-the-cli")
    assert ids[0] == new["id"] and sorted(ids[1:]) == sorted(before)
    assert '<option value="new">new (1)</option>' in page  # the filter menus follow
    r = cli("rm", new["id"], home=web_home)
    assert r.returncode == 0 and new["id"] not in card_ids(c.text("/"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(web_home, tmp_path):
    env = dict(os.environ, LORAHUB_HOME=str(web_home), NO_COLOR="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "lorahub", "serve", "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        m = re.search(r"\((\d+) entries\) at (http://127\.0\.0\.1:\d+/)", line)
        assert m, line + p.stderr.read() if p.poll() is not None else line
        with Registry.open(web_home) as reg:
            assert int(m.group(1)) == reg.count()
        c = Client(m.group(2))
        assert len(card_ids(c.text("/"))) == int(m.group(1))
        e = entry_by_name(web_home, "sd1-kohya")
        assert "sd1-kohya" in c.text(f"/entry/{e['id']}")
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "Traceback" not in err
    # a taken port is one error line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "lorahub", "serve", "--port", str(port)], capture_output=True,
                           text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == f"error: cannot listen on 127.0.0.1:{port}: the port is in use"


def test_serving_on_the_network_warns(web_home):
    env = dict(os.environ, LORAHUB_HOME=str(web_home), NO_COLOR="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "lorahub", "serve", "--host", "0.0.0.0", "--port", str(_free_port()),
                          "--read-only"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert "read-only" in line
        url = re.search(r"at (http://\S+)", line).group(1)
        assert 'method="post"' not in Client(url).text("/entry/sd1-kohya")  # serving (then Ctrl+C stops it)
    finally:
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    assert "warning: listening on 0.0.0.0: anyone who can reach this machine can see the registry" in err
    assert p.returncode == 0


def test_gallery_pages_do_not_import_the_ml_stack_and_other_commands_not_the_web_stack(web_home):
    code = f"""
import sys, urllib.request
from lorahub.web.server import GalleryServer
srv = GalleryServer.bind({str(web_home)!r}, port=0).start()
for path in ("/", "/?q=tiny", "/entry/sd1-kohya", "/compare?id=sd1-kohya&id=sd1-diffusers", "/preview/1/thumb"):
    urllib.request.urlopen(srv.url.rstrip("/") + path).read()
srv.stop()
print(sorted(m for m in ("torch", "numpy", "diffusers", "transformers", "safetensors") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    for args in (["list"], ["search", "tiny"], ["show", "sd1-kohya"], ["--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "lorahub", *args, "--home", str(web_home)]
                           if args != ["--help"] else [sys.executable, "-X", "importtime", "-m", "lorahub", "--help"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
        assert not imported & {"starlette", "uvicorn", "jinja2", "anyio"}, (args, imported & {"starlette", "uvicorn"})


@pytest.mark.slow
def test_wheel_ships_the_templates_and_static_files(tmp_path):
    pytest.importorskip("hatchling")
    out = tmp_path / "whl"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = out.glob("lorahub-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    web = REPO / "lorahub" / "web"
    files = sorted(p.relative_to(REPO).as_posix() for p in web.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    assert any(f.endswith(".html") for f in files) and any(f.endswith(".js") for f in files)
    assert set(files) <= names


def test_demo_ends_with_the_command_that_serves_it(demo_registry):
    out = (demo_registry / "demo-complete").read_text().rstrip().splitlines()
    assert out[-1] == f"look at it in a browser: lorahub serve --home {demo_registry}"
