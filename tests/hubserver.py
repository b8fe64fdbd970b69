"""A small Hugging Face Hub-compatible HTTP server for offline tests (127.0.0.1 only, stdlib only).

It implements the model-repo endpoints the real ``huggingface_hub`` client calls for a push and a pull,
following the Hub's public HTTP API and the client's observable behaviour:

* ``POST /api/repos/create``                         -> 200 {url}, 409 when the repo exists
* ``POST /api/validate-yaml``                        -> README front matter check (400 + errors)
* ``POST /api/models/{repo}/branch/{branch}``        -> create a branch (409 when it exists)
* ``POST /api/models/{repo}/preupload/{rev}``        -> uploadMode regular|lfs, remote oid, shouldIgnore
* ``POST /{repo}.git/info/lfs/objects/batch``        -> basic-transfer upload actions (none when present)
* ``PUT  /lfs-upload/{oid}``                         -> LFS object body (Content-Length or chunked)
* ``POST /api/models/{repo}/commit/{rev}``           -> ndjson: header, file (base64), lfsFile, deletedFile
* ``GET  /api/models/{repo}[/revision/{rev}]``       -> model info (sha, siblings, cardData, tags)
* ``GET  /api/models/{repo}/tree/{rev}[/{path}]``    -> file listing with oid/size/lfs
* ``HEAD/GET /{repo}/resolve/{rev}/{path}``          -> X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size
* ``GET  /api/models?search=&filter=&author=``       -> model search (filters match tags)

Regular files have the git blob SHA-1 as ETag/oid; LFS files the sha256 of their content. Every object
and the repo state are persisted under ``root`` so a fresh client cache can pull what was pushed.
Tests can seed repos directly (``seed``) with content the client would refuse to produce (hostile names,
files announced smaller than they are) and read ``requests`` / ``auth_headers`` to check what was sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".png", ".jpg", ".jpeg", ".webp", ".gif")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def front_matter(text: str):
    """(yaml dict | None, error | None) of a README's front matter."""
    if not text.startswith("---"):
        return None, None
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None, "unterminated YAML front matter"
    try:
        import yaml

        data = yaml.safe_load(m.group(1))
    except Exception as exc:  # yaml.YAMLError and friends
        return None, f"invalid YAML: {exc}"
    if data is not None and not isinstance(data, dict):
        return None, "YAML front matter is not a mapping"
    return data or {}, None


class HubState:
    """Repos, commits and objects, persisted as JSON + blob files under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "state.json"
        self.lock = threading.RLock()
        if self.state_file.exists():
            self.repos = json.loads(self.state_file.read_text())
        else:
            self.repos = {}

    def save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.repos))
        tmp.replace(self.state_file)

    # objects are keyed by sha256 of their content
    def put_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        p = self.objects / sha
        if not p.exists():
            p.write_bytes(data)
        return sha

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        p = self.objects / sha256
        return p.exists() and (size is None or p.stat().st_size == size)

    def file_record(self, data: bytes, path: str, lfs: bool | None = None) -> dict:
        sha = self.put_object(data)
        if lfs is None:
            lfs = path.lower().endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        rec = {"sha256": sha, "size": len(data), "lfs": bool(lfs)}
        rec["oid"] = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
        return rec

    def create_repo(self, repo_id: str, private: bool = False) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            files = {".gitattributes": self.file_record(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                                                         ".gitattributes", lfs=False)}
            repo = {"private": private, "branches": {}, "commits": {}, "created": time.time()}
            self.repos[repo_id] = repo
            sha = self._add_commit(repo, None, files, "initial commit")
            repo["branches"]["main"] = sha
            self.save()
            return True

    @staticmethod
    def _add_commit(repo: dict, parent: str | None, files: dict, message: str) -> str:
        body = json.dumps({"parent": parent, "files": files, "message": message, "n": len(repo["commits"])},
                          sort_keys=True).encode()
        sha = hashlib.sha1(body).hexdigest()
        repo["commits"][sha] = {"parent": parent, "files": files, "message": message, "date": time.time()}
        return sha

    def commit(self, repo_id: str, branch: str, files: dict, message: str) -> str:
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo["branches"][branch]
            sha = self._add_commit(repo, parent, files, message)
            repo["branches"][branch] = sha
            self.save()
            return sha

    def resolve_rev(self, repo_id: str, rev: str) -> str | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        if rev in repo["branches"]:
            return repo["branches"][rev]
        if rev in repo["commits"]:
            return rev
        hits = [c for c in repo["commits"] if len(rev) >= 7 and c.startswith(rev)]
        return hits[0] if len(hits) == 1 else None

    def seed(self, repo_id: str, files: dict[str, bytes], *, announce: dict[str, int] | None = None,
             message: str = "seeded", lfs: dict[str, bool] | None = None) -> str:
        """Commit ``files`` straight into ``repo_id`` (created if missing), bypassing every check.

        ``announce`` maps a path to the size the server will *claim* for it (tree, model info, HEAD)
        while still serving the real bytes: a hostile "huge file announced small".
        """
        self.create_repo(repo_id)
        with self.lock:
            repo = self.repos[repo_id]
            tree = dict(repo["commits"][repo["branches"]["main"]]["files"])
            for path, data in files.items():
                rec = self.file_record(data, path, lfs=(lfs or {}).get(path))
                if announce and path in announce:
                    rec["announced"] = announce[path]
                tree[path] = rec
            return self.commit(repo_id, "main", tree, message)


class _Handler(BaseHTTPRequestHandler):
    server_version = "hubserver/1.0"
    protocol_version = "HTTP/1.1"

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def hub(self) -> "HubServer":
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = self.rfile.readline().strip()
                n = int(line.split(b";")[0], 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                out += self.rfile.read(n)
                self.rfile.readline()
            return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None, extra: dict | None = None) -> None:
        h = {"X-Error-Message": message}
        if code:
            h["X-Error-Code"] = code
        h.update(extra or {})
        self._json(status, {"error": message}, h)

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        raw = url.path
        self.hub.requests.append((method, raw))
        auth = self.headers.get("Authorization")
        if auth:
            self.hub.auth_headers.append(auth)
        parts = raw.strip("/").split("/")
        try:
            self._dispatch(method, raw, parts)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # a server bug: answer 500 so the client fails loudly
            self._error(500, f"server error: {type(exc).__name__}: {exc}")

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    # -- auth -------------------------------------------------------------------------------------
    def _write_allowed(self) -> bool:
        want = self.hub.token
        if want is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {want}":
            return True
        self._error(401, "Invalid credentials in Authorization header")
        return False

    def _read_allowed(self, repo_id: str) -> bool:
        repo = self.hub.state.repos.get(repo_id)
        if repo and repo.get("private") and self.hub.token is not None \
                and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            self._error(401, "Repository not found", "RepoNotFound")
            return False
        return True

    # -- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self, method: str, raw: str, parts: list[str]) -> None:
        st = self.hub.state
        if method == "POST" and raw == "/api/repos/create":
            return self._create_repo()
        if method == "POST" and raw == "/api/validate-yaml":
            return self._validate_yaml()
        if method == "GET" and raw.rstrip("/") == "/api/models":
            return self._search()
        if method == "PUT" and len(parts) == 2 and parts[0] == "lfs-upload":
            return self._lfs_put(parts[1])
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models":
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            if repo_id not in st.repos:
                return self._error(404, "Repository not found", "RepoNotFound")
            if not self._read_allowed(repo_id):
                return
            action, rest = parts[4], parts[5:]
            if method == "POST" and action == "preupload" and rest:
                return self._preupload(repo_id, unquote(rest[0]))
            if method == "POST" and action == "commit" and rest:
                return self._commit(repo_id, unquote(rest[0]))
            if method == "POST" and action == "branch" and rest:
                return self._branch(repo_id, unquote("/".join(rest)))
            if method == "GET" and action == "revision" and rest:
                return self._model_info(repo_id, unquote(rest[0]))
            if method == "GET" and action == "tree" and rest:
                return self._tree(repo_id, unquote(rest[0]), unquote("/".join(rest[1:])))
            return self._error(404, f"no route {method} {raw}")
        if len(parts) == 4 and parts[0] == "api" and parts[1] == "models" and method == "GET":
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            if repo_id not in st.repos:
                return self._error(404, "Repository not found", "RepoNotFound")
            if not self._read_allowed(repo_id):
                return
            return self._model_info(repo_id, "main")
        if len(parts) == 4 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs"]:
            pass
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs",
                                                                                                   "objects", "batch"]:
            return self._lfs_batch(f"{unquote(parts[0])}/{unquote(parts[1][:-4])}")
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
            return self._resolve(repo_id, unquote(parts[3]), unquote("/".join(parts[4:])))
        return self._error(404, f"no route {method} {raw}")

    # -- endpoints --------------------------------------------------------------------------------
    def _create_repo(self):
        if not self._write_allowed():
            return
        body = json.loads(self._read_body() or b"{}")
        if body.get("type") not in (None, "model"):
            return self._error(400, "only model repos are supported by this test server")
        name = body.get("name") or ""
        org = body.get("organization") or self.hub.user
        repo_id = f"{org}/{name}"
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            return self._error(400, f"invalid repo name {repo_id!r}")
        private = body.get("private") or body.get("visibility") == "private"
        url = f"{self.hub.url}/{repo_id}"
        if not self.hub.state.create_repo(repo_id, private=bool(private)):
            return self._json(409, {"error": "You already created this model repo", "url": url})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self):
        body = json.loads(self._read_body() or b"{}")
        data, err = front_matter(body.get("content") or "")
        if err:
            return self._json(400, {"errors": [{"message": err}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _branch(self, repo_id: str, branch: str):
        if not self._write_allowed():
            return
        st = self.hub.state
        body = json.loads(self._read_body() or b"{}")
        with st.lock:
            repo = st.repos[repo_id]
            if branch in repo["branches"]:
                return self._error(409, f"branch {branch} already exists")
            start = st.resolve_rev(repo_id, body.get("startingPoint") or "main")
            if start is None:
                return self._error(404, "Invalid rev id", "RevisionNotFound")
            repo["branches"][branch] = start
            st.save()
        self._json(200, {})

    def _tree_at(self, repo_id: str, rev: str):
        sha = self.hub.state.resolve_rev(repo_id, rev)
        if sha is None:
            return None, None
        return sha, self.hub.state.repos[repo_id]["commits"][sha]["files"]

    def _preupload(self, repo_id: str, rev: str):
        if not self._write_allowed():
            return
        body = json.loads(self._read_body() or b"{}")
        sha, tree = self._tree_at(repo_id, rev)
        tree = tree or {}
        out = []
        for f in body.get("files", []):
            path, size = f["path"], int(f.get("size") or 0)
            sample = base64.b64decode(f.get("sample") or "")
            lfs = path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample
            rec = tree.get(path)
            oid = None
            if rec is not None:
                oid = rec["sha256"] if rec["lfs"] else rec["oid"]
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": out, "commitOid": sha})

    def _lfs_batch(self, repo_id: str):
        if repo_id not in self.hub.state.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        if not self._write_allowed():
            return
        body = json.loads(self._read_body() or b"{}")
        objs = []
        for o in body.get("objects", []):
            oid, size = o["oid"], int(o["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.state.has_object(oid, size):
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{oid}",
                                               "header": {}, "expires_in": 3600}}
            objs.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objs, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str):
        data = self._read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "uploaded content does not match its oid")
        self.hub.state.put_object(data)
        self.hub.lfs_uploads.append(oid)
        self._json(200, {})

    def _commit(self, repo_id: str, rev: str):
        if not self._write_allowed():
            return
        st = self.hub.state
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        repo = st.repos[repo_id]
        if rev not in repo["branches"]:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        _, tree = self._tree_at(repo_id, rev)
        tree = dict(tree)
        summary = "commit"
        for item in lines:
            key, val = item.get("key"), item.get("value") or {}
            if key == "header":
                summary = val.get("summary") or summary
                parent = val.get("parentCommit")
                if parent and parent != repo["branches"][rev]:
                    return self._error(412, "parent commit is not the head of the branch")
            elif key == "file":
                data = base64.b64decode(val["content"])
                tree[val["path"]] = st.file_record(data, val["path"], lfs=False)
            elif key == "lfsFile":
                oid, size = val["oid"], val.get("size")
                if not st.has_object(oid, size):
                    return self._error(422, f"LFS object {oid} of {val['path']} was not uploaded")
                data = st.object_path(oid).read_bytes()
                tree[val["path"]] = st.file_record(data, val["path"], lfs=True)
            elif key == "deletedFile":
                tree.pop(val["path"], None)
            elif key == "deletedFolder":
                pre = val["path"].rstrip("/") + "/"
                for p in [p for p in tree if p.startswith(pre)]:
                    del tree[p]
            else:
                return self._error(400, f"unknown commit operation {key!r}")
        sha = st.commit(repo_id, rev, tree, summary)
        self.hub.commits.append((repo_id, rev, sha, summary))
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}",
                         "hookOutput": ""})

    def _card(self, tree: dict) -> dict | None:
        rec = tree.get("README.md")
        if rec is None:
            return None
        text = self.hub.state.object_path(rec["sha256"]).read_bytes().decode("utf-8", "replace")
        data, err = front_matter(text)
        return data if not err else None

    def _info_dict(self, repo_id: str, sha: str, tree: dict, blobs: bool) -> dict:
        card = self._card(tree) or {}
        tags = card.get("tags") or []
        tags = [str(t) for t in tags] if isinstance(tags, list) else [str(tags)]
        if card.get("library_name"):
            tags.append(str(card["library_name"]))
        if card.get("base_model"):
            tags.append(f"base_model:{card['base_model']}")
        repo = self.hub.state.repos[repo_id]
        siblings = []
        for path, rec in sorted(tree.items()):
            s = {"rfilename": path}
            if blobs:
                size = rec.get("announced", rec["size"])
                s.update({"size": size, "blobId": rec["oid"]})
                if rec["lfs"]:
                    s["lfs"] = {"size": size, "sha256": rec["sha256"], "pointerSize": 134}
            siblings.append(s)
        return {"_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo_id.split("/")[0], "sha": sha, "private": bool(repo.get("private")),
                "disabled": False, "gated": False, "downloads": 0, "likes": 0,
                "library_name": card.get("library_name"), "tags": sorted(set(tags)),
                "pipeline_tag": card.get("pipeline_tag"),
                "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo["commits"][sha]["date"])),
                "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo["created"])),
                "cardData": card or None, "siblings": siblings}

    def _model_info(self, repo_id: str, rev: str):
        sha, tree = self._tree_at(repo_id, rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        self._json(200, self._info_dict(repo_id, sha, tree, blobs))

    def _tree(self, repo_id: str, rev: str, sub: str):
        sha, tree = self._tree_at(repo_id, rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        files, dirs = [], set()
        for path, rec in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                segs = rest.split("/")[:-1]
                for i in range(len(segs)):
                    dirs.add(prefix + "/".join(segs[:i + 1]))
            size = rec.get("announced", rec["size"])
            f = {"type": "file", "oid": rec["oid"], "size": size, "path": path}
            if rec["lfs"]:
                f["lfs"] = {"oid": rec["sha256"], "size": size, "pointerSize": 134}
            files.append(f)
        out = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)] + files
        self._json(200, out)

    def _resolve(self, repo_id: str, rev: str, path: str):
        st = self.hub.state
        if repo_id not in st.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        if not self._read_allowed(repo_id):
            return
        sha, tree = self._tree_at(repo_id, rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        rec = tree.get(path)
        if rec is None:
            return self._error(404, f"{path} does not exist", "EntryNotFound", {"X-Repo-Commit": sha})
        data = st.object_path(rec["sha256"]).read_bytes()
        announced = rec.get("announced", rec["size"])
        h = {"X-Repo-Commit": sha, "Accept-Ranges": "none"}
        if rec["lfs"]:
            h["X-Linked-Etag"] = f'"{rec["sha256"]}"'
            h["X-Linked-Size"] = str(announced)
            h["ETag"] = f'"{rec["oid"]}"'
        else:
            h["ETag"] = f'"{rec["oid"]}"'
        self.hub.downloads.append((self.command, repo_id, path))
        ctype = "application/octet-stream"
        if self.command == "HEAD":
            return self._send(200, b"", h, ctype, length=announced)
        self._send(200, data, h, ctype)

    def _search(self):
        q = self.query
        search = (q.get("search") or [""])[0].lower()
        filters = q.get("filter") or []
        author = (q.get("author") or [None])[0]
        limit = int((q.get("limit") or ["1000"])[0])
        out = []
        st = self.hub.state
        for repo_id in sorted(st.repos):
            repo = st.repos[repo_id]
            if repo.get("private"):
                continue
            sha = repo["branches"]["main"]
            info = self._info_dict(repo_id, sha, repo["commits"][sha]["files"], False)
            if search and search not in repo_id.lower():
                continue
            if author and repo_id.split("/")[0] != author:
                continue
            tags = set(info["tags"])
            if any(f not in tags and f.replace("library=", "") not in tags for f in filters):
                continue
            if "cardData" not in q and "full" not in q:
                info.pop("cardData", None)
            info.pop("siblings", None)
            out.append(info)
        self._json(200, out[:limit])


class HubServer:
    """``with HubServer(tmpdir) as hub: hub.url`` — a threaded server on 127.0.0.1:<free port>."""

    def __init__(self, root: Path, *, token: str | None = None, user: str = "tester"):
        self.state = HubState(root)
        self.token = token
        self.user = user
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self.lfs_uploads: list[str] = []
        self.commits: list[tuple[str, str, str, str]] = []
        self.downloads: list[tuple[str, str, str]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def seed(self, repo_id: str, files: dict[str, bytes], **kw) -> str:
        return self.state.seed(repo_id, files, **kw)

    # (yaml dict | None, error | None) of a README's front matter, parsed the way the server validates it
    front_matter = staticmethod(front_matter)

    def file_bytes(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        sha = self.state.resolve_rev(repo_id, rev)
        rec = self.state.repos[repo_id]["commits"][sha]["files"][path]
        return self.state.object_path(rec["sha256"]).read_bytes()

    def files(self, repo_id: str, rev: str = "main") -> dict:
        sha = self.state.resolve_rev(repo_id, rev)
        return self.state.repos[repo_id]["commits"][sha]["files"]

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.state.repos[repo_id]["branches"][branch]


__all__ = ["HubServer", "HubState", "git_blob_sha1", "front_matter", "quote"]
