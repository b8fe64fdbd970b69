"""`lorahub push` and `lorahub pull`: share registry entries on a Hugging Face Hub (or a self-hosted one)."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from lorahub.cli.app import app
from lorahub.cli.common import HomeOpt, JsonOpt, console, print_json, progress

EndpointOpt = Annotated[Optional[str], typer.Option(
    "--endpoint", help="Hub URL (default $HF_ENDPOINT, else https://huggingface.co); self-hosted hubs work too.")]
TokenEnvOpt = Annotated[Optional[str], typer.Option(
    "--token-env", metavar="VAR",
    help="Read the access token from this environment variable (default: HF_TOKEN or `hf auth login`). "
         "The token is never stored or printed.")]


@app.command()
def push(
    refs: Annotated[List[str], typer.Argument(help="Registry entries (id, name or hash prefix): the LoRA first, "
                                                   "then embeddings or more LoRAs.")],
    repo: Annotated[str, typer.Option("--repo", help="Target model repo, user/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private; an existing public "
                                                            "repo is made private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (default main; "
                                                                        "created from main if missing).")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request against the branch instead "
                                                                "of committing to it (the repo must exist).")] = False,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="Hub id of the base model for the card (default: the one the entry came with, "
                             "else the family's reference model).")] = None,
    alpha: Annotated[Optional[float], typer.Option(
        "--alpha", help="Recommended strength to state on the card (default: what a sweep recorded, else the "
                        "entry's preferred weight).")] = None,
    endpoint: EndpointOpt = None,
    token_env: TokenEnvOpt = None,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Upload entries to a Hub model repo in one commit, with a model card (README.md).

    Uploads the LoRA in diffusers form (pytorch_lora_weights.safetensors), the webui (kohya) file under
    its own name, embeddings, sweep preview images, and a card with trigger words, recommended strength,
    loading instructions, lineage, hashes and every entry's fields (so a pull gives the same entries).
    Only files that differ from the branch's are sent; when none does, nothing is committed.
    """
    from lorahub.hub.push import push as do_push

    with progress() as bar:
        task = bar.add_task("pushing", total=None)
        res = do_push(refs, repo=repo, registry=home, private=private, revision=revision, message=message,
                      endpoint=endpoint, token_env=token_env, base_model=base_model, alpha=alpha,
                      create_pr=create_pr)
        bar.update(task, total=1, completed=1)
    report = res.to_dict()
    if json_out:
        print_json(report)
        return
    c = console()
    names = ", ".join(e["name"] for e in report["entries"])
    if report["pr_url"]:
        c.print(f"opened a pull request on {report['repo']} with {names} ({report['revision']}, commit "
                f"{report['commit'][:12]}): {len(report['sent'])} file(s) sent", markup=False)
    elif report["uploaded"]:
        c.print(f"pushed {names} to {report['repo']}@{report['revision']} (commit {report['commit'][:12]}): "
                f"{len(report['sent'])} of {len(report['files'])} file(s) sent", markup=False)
    else:
        c.print(f"{report['repo']}@{report['revision']} is up to date (commit {report['commit'][:12]}); "
                "nothing uploaded", markup=False)
    for f in report["files"]:
        c.print(f"  {'sent ' if f in report['sent'] else 'same '} {f}", markup=False)
    for f in report["removed"]:
        c.print(f"  removed {f}", markup=False)
    for n in report["notes"]:
        c.print(f"note: {n}", markup=False)
    c.print(report["pr_url"] or report["url"], markup=False)


@app.command()
def pull(
    spec: Annotated[Optional[str], typer.Argument(metavar="REPO[@REV]", help="Hub model repo, user/name[@rev].")] = None,
    file: Annotated[Optional[str], typer.Option("--file", help="Pull only this file of the repo.")] = None,
    include: Annotated[Optional[List[str]], typer.Option(
        "--include", metavar="PATTERN", help="Pull the files matching this glob (repeatable; '*' crosses folders, "
                                             "e.g. 'checkpoint-*/*.safetensors').")] = None,
    list_only: Annotated[bool, typer.Option("--list", help="Show what the repo holds and what would be "
                                                           "registered, without downloading weights.")] = False,
    type: Annotated[Optional[str], typer.Option("--type", help="Registry type of the pulled entries "
                                                               "(character, style, pose, clothing, object, concept).")] = None,
    tag: Annotated[Optional[List[str]], typer.Option("--tag", help="Extra tag (repeatable).")] = None,
    previews: Annotated[bool, typer.Option("--previews/--no-previews",
                                           help="Import the repo's images as previews.")] = True,
    search: Annotated[Optional[str], typer.Option("--search", help="List Hub LoRAs and textual inversions "
                                                                   "matching this text instead of pulling.")] = None,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="With --search: only LoRAs of this "
                                                                           "base model (Hub id).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="With --search: at most this many results.")] = 20,
    max_size: Annotated[float, typer.Option("--max-size", metavar="MB",
                                            help="Refuse files larger than this many MiB.")] = 2048,
    endpoint: EndpointOpt = None,
    token_env: TokenEnvOpt = None,
    json_out: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Download a Hub repo's LoRA/embedding files and register them with the card's metadata.

    The repo's LoRAs are its top-level files (subfolders only when the top level has none;
    checkpoint-* folders only with --file or --include); a converted copy of another file (per a
    lorahub card, or equal weights) is registered once. A card written by lorahub gives the entries
    back whole; other cards give base_model, instance_prompt (trigger words), tags and license. Files
    go through huggingface_hub's cache (HF_HOME respected; with HF_HUB_OFFLINE=1 the pull works from
    it); the source is recorded as repo@commit. Pulling the same commit again registers nothing new.
    With --search, lists Hub LoRAs instead; with --list, shows the plan.
    """
    from lorahub.errors import LorahubError

    if search is not None or (spec is None and base_model):
        if spec is not None:
            raise LorahubError("give either REPO or --search, not both")
        from lorahub.hub.pull import search as do_search

        rows = [r.to_dict() for r in do_search(search, endpoint=endpoint, token_env=token_env, limit=limit,
                                               base_model=base_model)]
        if json_out:
            print_json(rows)
            return
        from rich.table import Table
        from rich.text import Text

        t = Table(title=f"Hub LoRAs matching {search!r}" if search else "Hub LoRAs")
        t.add_column("repo", no_wrap=True)
        for col in ("kind", "base model", "downloads", "likes", "updated", "tags"):
            t.add_column(col)
        for r in rows:
            t.add_row(*[Text(x) for x in (
                r["repo"], r["kind"], r["base_model"] or "-", str(r["downloads"] if r["downloads"] is not None else "-"),
                str(r["likes"] if r["likes"] is not None else "-"), r["updated"] or "-", ", ".join(r["tags"]))])
        c = console()
        c.print(t) if rows else c.print("no Hub LoRAs found")
        return
    if spec is None:
        raise LorahubError("give a repo (user/name[@rev]) or --search TEXT")
    if list_only:
        from lorahub.hub.pull import list_repo

        listing = list_repo(spec, file=file, include=include or None, endpoint=endpoint, token_env=token_env)
        report = listing.to_dict()
        if json_out:
            print_json(report)
            return
        c = console()
        c.print(f"{report['repo']}@{report['commit'][:12]}" + (" (from the cache, offline)" if report["offline"] else "")
                + f": {len(report['files'])} files, {len(report['register'])} would be registered", markup=False)
        for f in report["files"]:
            size = f"{f['size'] / 1024:.1f} KB" if isinstance(f["size"], int) else "?"
            what = f" {f['kind']} {f['format']} {f['base']}" if f.get("kind") else ""
            act = f["action"] + (f" as {f['name']}" if f.get("name") else "") + (f": {f['why']}" if f.get("why") else "")
            c.print(f"  {f['path']}  ({size}{what})  {act}", markup=False)
        return
    from lorahub.hub.pull import pull as do_pull

    with progress() as bar:
        task = bar.add_task("pulling", total=None)
        report = do_pull(spec, registry=home, file=file, include=include or None, type=type, tags=tag or [],
                         endpoint=endpoint, token_env=token_env, max_size_mb=max_size, previews=previews,
                         progress=lambda: bar.advance(task)).to_dict()
    if json_out:
        print_json(report)
        return
    c = console()
    new = [e for e in report["entries"] if e["created"]]
    c.print(f"{report['repo']}@{report['commit'][:12]}" + (" (from the cache, offline)" if report["offline"] else "")
            + f": {len(new)} new, {len(report['entries']) - len(new)} already registered", markup=False)
    for e in report["entries"]:
        c.print(f"  {'added' if e['created'] else 'exists'}  {e['id']}  {e['name']}  ({e['file']}, {e['kind']}, "
                f"{e['base']}" + (f", {e['type']}" if e["type"] else "") + ")", markup=False)
    if report["previews"]:
        c.print(f"  {len({p['file'] for p in report['previews']})} preview image(s) imported", markup=False)
    for s in report["skipped"]:
        c.print(f"  skipped {s['file']}: {s['why']}", markup=False)
