"""A small Hugging Face Hub-compatible HTTP server for offline tests (127.0.0.1 only, stdlib only).

It implements the model-repo endpoints the real ``huggingface_hub`` client calls for a push and a pull,
following the Hub's public HTTP API and the client's observable behaviour:

* ``POST /api/repos/create``                         -> 200 {url}, 409 when the repo exists
* ``DELETE /api/repos/delete``                       -> delete a repo (its owner only)
* ``PUT  /api/models/{repo}/settings``               -> visibility / gating
* ``POST /api/validate-yaml``                        -> README front matter check (400 + errors)
* ``POST /api/models/{repo}/branch/{branch}``        -> create a branch (409 when it exists)
* ``POST /api/models/{repo}/preupload/{rev}``        -> uploadMode regular|lfs, remote oid, shouldIgnore
* ``GET  /api/models/{repo}/xet-write-token/{rev}``  -> 404: this hub has no Xet storage (the client must
                                                        fall back to LFS or fail clearly)
* ``POST /{repo}.git/info/lfs/objects/batch``        -> basic-transfer upload actions (none when the repo has it)
* ``PUT  /lfs-upload/{repo}/{oid}``                  -> LFS object body (Content-Length or chunked)
* ``POST /api/models/{repo}/commit/{rev}[?create_pr=1]`` -> ndjson: header, file (base64), lfsFile, deletedFile
* ``GET  /api/models/{repo}[/revision/{rev}]``       -> model info (sha, siblings, cardData, tags, gated)
* ``GET  /api/models/{repo}/tree/{rev}[/{path}]``    -> file listing with oid/size/lfs, paginated (Link header)
* ``HEAD/GET /{repo}/resolve/{rev}/{path}``          -> X-Repo-Commit, ETag / X-Linked-Etag, X-Linked-Size, Range
* ``GET  /api/models?search=&filter=&author=``       -> model search (filters match tags)

Fidelity, so that tests cannot hide bugs the real Hub would show:

* tokens map to users (``add_user``); a request with an unknown token is refused with 401 "Invalid
  credentials in Authorization header" even for public reads; writes outside the token's own namespace
  are refused with 403, except pull requests (``create_pr``) on public repos, which anyone with a token
  may open;
* LFS objects belong to a repo: an object uploaded to one repo is not "already present" in another;
* private repos are invisible (404 RepoNotFound) to anyone but their owner; gated repos list their files
  but serve them only to users granted access (``grant``): 401 GatedRepo anonymous, 403 GatedRepo else;
* tree listings are paginated (``tree_page_size``) with a ``Link: <…>; rel="next"`` header;
* the front matter is validated as the Hub does for the keys lorahub writes (``license: other`` needs
  ``license_name``; no null values).

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
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".png", ".jpg", ".jpeg", ".webp", ".gif")
LFS_MIN_SIZE = 10 * 1024 * 1024
# licenses the Hub knows (a subset); anything else must be `other` with a `license_name`
KNOWN_LICENSES = {"apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
                  "cc-by-4.0", "cc-by-nc-4.0", "cc-by-sa-4.0", "cc0-1.0", "gpl-3.0", "llama2", "other", "unknown"}


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


def metadata_errors(data: dict) -> list[str]:
    """What the Hub's metadata validation reports for the keys a LoRA card uses."""
    errs = []
    for key in ("license", "license_name", "license_link", "base_model", "instance_prompt", "library_name",
                "pipeline_tag", "tags", "widget"):
        if key in data and data[key] is None:
            errs.append(f'"{key}" must not be null')
    lic = data.get("license")
    if lic is not None:
        if not isinstance(lic, str):
            errs.append('"license" must be a string')
        elif lic not in KNOWN_LICENSES:
            errs.append(f'"license" must be one of the Hub\'s license ids or "other" (got {lic!r})')
        elif lic == "other" and not isinstance(data.get("license_name"), str):
            errs.append('"license_name" is required when "license" is "other"')
    bm = data.get("base_model")
    if bm is not None:
        items = bm if isinstance(bm, list) else [bm]
        if not all(isinstance(b, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", b) for b in items):
            errs.append('"base_model" must be a model id or a list of model ids')
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, (str, int, float)) for t in tags)):
        errs.append('"tags" must be a list of strings')
    return errs


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

    # objects are stored once by the sha256 of their content; each repo owns the LFS oids uploaded to it
    def put_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        p = self.objects / sha
        if not p.exists():
            p.write_bytes(data)
        return sha

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256

    def has_object(self, repo_id: str, sha256: str, size: int | None = None) -> bool:
        """The LFS object ``sha256`` was uploaded to (or committed in) ``repo_id``."""
        repo = self.repos.get(repo_id)
        p = self.objects / sha256
        return repo is not None and sha256 in repo["lfs"] and p.exists() and (size is None or p.stat().st_size == size)

    def own_object(self, repo_id: str, sha256: str) -> None:
        with self.lock:
            lfs = self.repos[repo_id]["lfs"]
            if sha256 not in lfs:
                lfs.append(sha256)
                self.save()

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
            repo = {"private": private, "gated": False, "access": [], "branches": {}, "commits": {}, "lfs": [],
                    "prs": 0, "created": time.time()}
            self.repos[repo_id] = repo
            sha = self._add_commit(repo, None, files, "initial commit")
            repo["branches"]["main"] = sha
            self.save()
            return True

    def delete_repo(self, repo_id: str) -> bool:
        with self.lock:
            if self.repos.pop(repo_id, None) is None:
                return False
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
            for rec in files.values():
                if rec["lfs"] and rec["sha256"] not in repo["lfs"]:
                    repo["lfs"].append(rec["sha256"])
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
             message: str = "seeded", lfs: dict[str, bool] | None = None, delete: list[str] = (),
             branch: str = "main") -> str:
        """Commit ``files`` straight into ``repo_id`` (created if missing), bypassing every check;
        ``delete`` removes paths in the same commit.

        ``announce`` maps a path to the size the server will *claim* for it (tree, model info, HEAD)
        while still serving the real bytes: a hostile "huge file announced small".
        """
        self.create_repo(repo_id)
        with self.lock:
            repo = self.repos[repo_id]
            tree = dict(repo["commits"][repo["branches"][branch]]["files"])
            for path in delete:
                tree.pop(path, None)
            for path, data in files.items():
                rec = self.file_record(data, path, lfs=(lfs or {}).get(path))
                if announce and path in announce:
                    rec["announced"] = announce[path]
                tree[path] = rec
            return self.commit(repo_id, branch, tree, message)


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
        # the body must be read before answering, or the client sees a reset connection
        if self.command in ("POST", "PUT", "DELETE") and not getattr(self, "_body_read", False):
            self._body = self._read_body()
            self._body_read = True
        self._json(status, {"error": message}, h)

    def _body_json(self) -> dict:
        if not getattr(self, "_body_read", False):
            self._body = self._read_body()
            self._body_read = True
        return json.loads(self._body or b"{}")

    def _route(self, method: str) -> None:
        self._body_read = False
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        raw = url.path
        self.hub.requests.append((method, raw))
        auth = self.headers.get("Authorization")
        if auth:
            self.hub.auth_headers.append(auth)
        parts = raw.strip("/").split("/")
        try:
            if self._authenticate(raw):
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

    def do_DELETE(self):
        self._route("DELETE")

    # -- auth -------------------------------------------------------------------------------------
    def _authenticate(self, raw: str) -> bool:
        """Who is calling (``self.user``, None when anonymous). A token the hub does not know is refused
        on every route, public reads included, as the Hub does."""
        self.user = None
        if not self.hub.tokens:       # a hub without auth: everyone is the default user
            self.user = self.hub.user
            return True
        auth = self.headers.get("Authorization")
        if not auth or raw.startswith("/lfs-upload/"):   # uploads carry the batch's href, not the token
            return True
        m = re.fullmatch(r"Bearer (\S+)", auth)
        user = self.hub.tokens.get(m.group(1)) if m else None
        if user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return False
        self.user = user
        return True

    def _write_allowed(self, repo_id: str | None = None, *, pr: bool = False) -> bool:
        """Writes need a token; into a repo (or namespace) of its user, or a pull request on a public repo."""
        if self.user is None:
            self._error(401, "Invalid username or password.")
            return False
        if repo_id is None:
            return True
        repo = self.hub.state.repos.get(repo_id)
        if repo_id.split("/")[0] == self.user:
            return True
        if pr and repo is not None and not repo.get("private"):
            return True
        self._error(403, f"You don't have the rights to write to {repo_id}", "Forbidden")
        return False

    def _visible(self, repo_id: str) -> bool:
        """Answer 404 RepoNotFound for a missing repo, or a private one the caller does not own."""
        repo = self.hub.state.repos.get(repo_id)
        if repo is None or (repo.get("private") and self.user != repo_id.split("/")[0]):
            code = 401 if repo is not None and self.user is None else 404
            self._error(code, "Repository not found", "RepoNotFound")
            return False
        return True

    def _files_allowed(self, repo_id: str) -> bool:
        """A gated repo serves its files only to its owner and the users granted access."""
        repo = self.hub.state.repos[repo_id]
        if not repo.get("gated") or self.user == repo_id.split("/")[0] or self.user in repo.get("access", []):
            return True
        if self.user is None:
            self._error(401, f"Access to model {repo_id} is restricted. You must be authenticated to access it.",
                        "GatedRepo")
        else:
            self._error(403, f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                        f"Visit {self.hub.url}/{repo_id} to ask for access.", "GatedRepo")
        return False

    # -- dispatch ---------------------------------------------------------------------------------
    def _dispatch(self, method: str, raw: str, parts: list[str]) -> None:
        if method == "POST" and raw == "/api/repos/create":
            return self._create_repo()
        if method == "DELETE" and raw == "/api/repos/delete":
            return self._delete_repo()
        if method == "POST" and raw == "/api/validate-yaml":
            return self._validate_yaml()
        if method == "GET" and raw.rstrip("/") == "/api/models":
            return self._search()
        if method == "PUT" and len(parts) == 4 and parts[0] == "lfs-upload":
            return self._lfs_put(f"{unquote(parts[1])}/{unquote(parts[2])}", parts[3])
        if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models":
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            if not self._visible(repo_id):
                return
            action, rest = parts[4], parts[5:]
            if method == "POST" and action == "preupload" and rest:
                return self._preupload(repo_id, unquote(rest[0]))
            if method == "POST" and action == "commit" and rest:
                return self._commit(repo_id, unquote(rest[0]))
            if method == "POST" and action == "branch" and rest:
                return self._branch(repo_id, unquote("/".join(rest)))
            if method == "PUT" and action == "settings" and not rest:
                return self._settings(repo_id)
            if method == "GET" and action == "revision" and rest:
                return self._model_info(repo_id, unquote(rest[0]))
            if method == "GET" and action == "tree" and rest:
                return self._tree(repo_id, unquote(rest[0]), unquote("/".join(rest[1:])))
            if action == "xet-write-token":
                self.hub.xet_requests.append(repo_id)
                return self._error(404, "Xet storage is not enabled on this hub")
            return self._error(404, f"no route {method} {raw}")
        if len(parts) == 4 and parts[0] == "api" and parts[1] == "models" and method == "GET":
            repo_id = f"{unquote(parts[2])}/{unquote(parts[3])}"
            if not self._visible(repo_id):
                return
            return self._model_info(repo_id, "main")
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
        body = self._body_json()
        if body.get("type") not in (None, "model"):
            return self._error(400, "only model repos are supported by this test server")
        name = body.get("name") or ""
        org = body.get("organization") or self.user
        repo_id = f"{org}/{name}"
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
            return self._error(400, f"invalid repo name {repo_id!r}")
        url = f"{self.hub.url}/{repo_id}"
        if org != self.user:
            return self._error(403, f"You don't have the rights to create a model under the namespace \"{org}\"",
                               "Forbidden")
        private = body.get("private") or body.get("visibility") == "private"
        if not self.hub.state.create_repo(repo_id, private=bool(private)):
            return self._json(409, {"error": "You already created this model repo", "url": url},
                              {"X-Error-Message": "You already created this model repo"})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self):
        if not self._write_allowed():
            return
        body = self._body_json()
        repo_id = f"{body.get('organization') or self.user}/{body.get('name')}"
        if repo_id not in self.hub.state.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        if not self._write_allowed(repo_id):
            return
        self.hub.state.delete_repo(repo_id)
        self.hub.deleted.append(repo_id)
        self._json(200, {})

    def _settings(self, repo_id: str):
        if not self._write_allowed(repo_id):
            return
        body = self._body_json()
        st = self.hub.state
        with st.lock:
            repo = st.repos[repo_id]
            if "visibility" in body:
                if body["visibility"] not in ("public", "private"):
                    return self._error(400, "visibility must be public or private")
                repo["private"] = body["visibility"] == "private"
            if "private" in body:
                repo["private"] = bool(body["private"])
            if "gated" in body:
                repo["gated"] = body["gated"]
            st.save()
        self.hub.settings.append((repo_id, body))
        self._json(200, {})

    def _validate_yaml(self):
        body = self._body_json()
        data, err = front_matter(body.get("content") or "")
        errors = [err] if err else metadata_errors(data or {})
        if errors:
            return self._json(400, {"errors": [{"message": e} for e in errors], "warnings": []},
                              {"X-Error-Message": "; ".join(errors)})
        self._json(200, {"errors": [], "warnings": []})

    def _branch(self, repo_id: str, branch: str):
        if not self._write_allowed(repo_id):
            return
        st = self.hub.state
        body = self._body_json()
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

    def _is_pr(self) -> bool:
        return self.query.get("create_pr", ["0"])[0] in ("1", "true")

    def _preupload(self, repo_id: str, rev: str):
        if not self._write_allowed(repo_id, pr=self._is_pr()):
            return
        body = self._body_json()
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
        if not self._visible(repo_id):
            return
        body = self._body_json()
        ref = (body.get("ref") or {}).get("name") or ""
        if not self._write_allowed(repo_id, pr=ref.startswith("refs/pr/") or self.hub.allow_pr_uploads(repo_id)):
            return
        if not self.hub.lfs:
            return self._error(501, "Git LFS uploads are disabled on this hub")
        objs = []
        for o in body.get("objects", []):
            oid, size = o["oid"], int(o["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.state.has_object(repo_id, oid, size):
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{repo_id}/{oid}",
                                               "header": {}, "expires_in": 3600}}
            objs.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objs, "hash_algo": "sha256"}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, repo_id: str, oid: str):
        data = self._read_body()
        self._body_read = True
        if repo_id not in self.hub.state.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "uploaded content does not match its oid")
        self.hub.state.put_object(data)
        self.hub.state.own_object(repo_id, oid)
        self.hub.lfs_uploads.append(oid)
        self._json(200, {})

    def _commit(self, repo_id: str, rev: str):
        pr = self._is_pr()
        if not self._write_allowed(repo_id, pr=pr):
            return
        st = self.hub.state
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        self._body_read = True
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
                if not st.has_object(repo_id, oid, size):
                    return self._error(422, f"LFS object {oid} of {val['path']} was not uploaded to {repo_id}")
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
        readme = tree.get("README.md")
        if readme is not None:
            data, err = front_matter(st.object_path(readme["sha256"]).read_bytes().decode("utf-8", "replace"))
            errors = [err] if err else metadata_errors(data or {})
            if errors:
                return self._error(400, "Invalid metadata in README.md: " + "; ".join(errors))
        out = {"success": True, "hookOutput": ""}
        branch = rev
        if pr:
            with st.lock:
                repo["prs"] += 1
                branch = f"refs/pr/{repo['prs']}"
                repo["branches"][branch] = repo["branches"][rev]
            out["pullRequestUrl"] = f"{self.hub.url}/{repo_id}/discussions/{repo['prs']}"
        sha = st.commit(repo_id, branch, tree, summary)
        self.hub.commits.append((repo_id, branch, sha, summary))
        out.update({"commitOid": sha, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}"})
        self._json(200, out)

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
        bms = card.get("base_model")
        for bm in (bms if isinstance(bms, list) else [bms] if bms else []):
            tags.append(f"base_model:{bm}")
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
                "disabled": False, "gated": repo.get("gated") or False, "downloads": repo.get("downloads", 0),
                "likes": 0,
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
        start = int(self.query.get("cursor", ["0"])[0] or 0)
        n = self.hub.tree_page_size
        page, headers = out[start:start + n], {}
        if start + n < len(out):
            q = {k: v[0] for k, v in self.query.items() if k != "cursor"}
            q["cursor"] = str(start + n)
            headers["Link"] = f'<{self.hub.url}{urlsplit(self.path).path}?{urlencode(q)}>; rel="next"'
        self.hub.tree_pages.append((repo_id, start))
        self._json(200, page, headers)

    def _resolve(self, repo_id: str, rev: str, path: str):
        st = self.hub.state
        if not self._visible(repo_id) or not self._files_allowed(repo_id):
            return
        sha, tree = self._tree_at(repo_id, rev)
        if sha is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        rec = tree.get(path)
        if rec is None:
            return self._error(404, f"{path} does not exist", "EntryNotFound", {"X-Repo-Commit": sha})
        data = st.object_path(rec["sha256"]).read_bytes()
        announced = rec.get("announced", rec["size"])
        h = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if rec["lfs"]:
            h["X-Linked-Etag"] = f'"{rec["sha256"]}"'
            h["X-Linked-Size"] = str(announced)
            h["ETag"] = f'"{rec["oid"]}"'
        else:
            h["ETag"] = f'"{rec["oid"]}"'
        ctype = "application/octet-stream"
        if self.command == "HEAD":
            self.hub.downloads.append(("HEAD", repo_id, path))
            return self._send(200, b"", h, ctype, length=announced)
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if m:
            a = int(m.group(1))
            b = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            if a >= len(data):
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            self.hub.downloads.append(("RANGE", repo_id, path))
            h["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
            return self._send(206, data[a:b + 1], h, ctype)
        self.hub.downloads.append(("GET", repo_id, path))
        self._send(200, data, h, ctype)

    def _search(self):
        q = self.query
        search = (q.get("search") or [""])[0].lower()
        filters = q.get("filter") or []
        author = (q.get("author") or [None])[0]
        limit = int((q.get("limit") or ["1000"])[0])
        out = []
        st = self.hub.state
        self.hub.searches.append({k: v for k, v in q.items()})
        for repo_id in sorted(st.repos):
            repo = st.repos[repo_id]
            if repo.get("private") and self.user != repo_id.split("/")[0]:
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
        if (q.get("sort") or [""])[0] == "downloads":
            out.sort(key=lambda i: -i["downloads"])
        self._json(200, out[:limit])


class HubServer:
    """``with HubServer(tmpdir) as hub: hub.url`` — a threaded server on 127.0.0.1:<free port>.

    ``token``: the token of ``user`` (None: a hub without authentication). ``tree_page_size``: entries
    per page of a tree listing. ``lfs=False``: the hub refuses Git LFS uploads too (no storage at all).
    """

    def __init__(self, root: Path, *, token: str | None = None, user: str = "tester", tree_page_size: int = 1000,
                 lfs: bool = True):
        self.state = HubState(root)
        self.token = token
        self.user = user
        self.tokens: dict[str, str] = {token: user} if token else {}
        self.tree_page_size = tree_page_size
        self.lfs = lfs
        self.requests: list[tuple[str, str]] = []
        self.auth_headers: list[str] = []
        self.lfs_uploads: list[str] = []
        self.commits: list[tuple[str, str, str, str]] = []
        self.downloads: list[tuple[str, str, str]] = []
        self.deleted: list[str] = []
        self.settings: list[tuple[str, dict]] = []
        self.xet_requests: list[str] = []
        self.tree_pages: list[tuple[str, int]] = []
        self.searches: list[dict] = []
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

    def add_user(self, name: str) -> str:
        """A new user of this hub; returns their token."""
        tok = "hf_" + secrets.token_hex(12)
        self.tokens[tok] = name
        return tok

    def allow_pr_uploads(self, repo_id: str) -> bool:
        """LFS batch calls do not say whether they are for a pull request; like the Hub, uploads to a
        public repo are accepted from any user (the commit endpoint decides)."""
        repo = self.state.repos.get(repo_id)
        return repo is not None and not repo.get("private")

    def gate(self, repo_id: str, *, grant: list[str] = ()) -> None:
        """Make ``repo_id`` gated; ``grant``: the users whose access request was accepted."""
        with self.state.lock:
            repo = self.state.repos[repo_id]
            repo["gated"] = "manual"
            repo["access"] = list(grant)
            self.state.save()

    def seed(self, repo_id: str, files: dict[str, bytes], **kw) -> str:
        return self.state.seed(repo_id, files, **kw)

    # (yaml dict | None, error | None) of a README's front matter, parsed the way the server validates it
    front_matter = staticmethod(front_matter)
    metadata_errors = staticmethod(metadata_errors)

    def file_bytes(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        sha = self.state.resolve_rev(repo_id, rev)
        rec = self.state.repos[repo_id]["commits"][sha]["files"][path]
        return self.state.object_path(rec["sha256"]).read_bytes()

    def files(self, repo_id: str, rev: str = "main") -> dict:
        sha = self.state.resolve_rev(repo_id, rev)
        return self.state.repos[repo_id]["commits"][sha]["files"]

    def head(self, repo_id: str, branch: str = "main") -> str:
        return self.state.repos[repo_id]["branches"][branch]


__all__ = ["HubServer", "HubState", "git_blob_sha1", "front_matter", "metadata_errors", "quote"]
