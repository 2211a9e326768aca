"""A small, real Hugging Face Hub server on 127.0.0.1 for publishing tests.

It speaks the subset of the Hub's HTTP API that ``huggingface_hub`` (2.x, no ``hf_xet``:
run clients with ``HF_HUB_DISABLE_XET=1``) uses to publish a folder and to download it
again, read off ``huggingface_hub/hf_api.py``, ``_commit_api.py`` and ``file_download.py``:

upload side
    ``POST /api/repos/create``                      -> ``{"url": ...}`` (409 if it exists)
    ``POST /api/validate-yaml``                     -> README front matter parsed with PyYAML
    ``POST /api/models/{repo}/branch/{branch}``     -> create a branch (409 if it exists)
    ``POST /api/models/{repo}/preupload/{rev}``     -> every file ``uploadMode: "regular"``
    ``POST /api/models/{repo}/commit/{rev}``        -> NDJSON: a header line, then ``file``
                                                       (base64), ``deletedFile``, ``deletedFolder``
download side
    ``GET  /api/models/{repo}[/revision/{rev}]``    -> model info (sha, siblings, private)
    ``GET  /api/models/{repo}/tree/{rev}[/{path}]`` -> file listing
    ``HEAD|GET /{repo}/resolve/{rev}/{path}``       -> ``ETag`` (git blob sha1), ``X-Repo-Commit``,
                                                       ``Content-Length`` (+ ``Range: bytes=N-``)
    ``GET  /api/whoami-v2``

Errors carry the ``X-Error-Code`` / ``X-Error-Message`` headers that
``huggingface_hub.utils.hf_raise_for_status`` maps to ``RepositoryNotFoundError``,
``RevisionNotFoundError`` and ``EntryNotFoundError``.

Design decisions:
- Standard library only (``http.server`` in a daemon thread, HTTP/1.1 keep-alive), an
  ephemeral port, state in memory: a repo is a dict of branches -> commit sha, a commit a
  full snapshot ``{path: bytes}``. Nothing touches the disk.
- Tokens are checked like the Hub: writes need a known token (401 otherwise); reads of a
  private repo without one answer 401 ``RepoNotFound``.
- Failure injection for tests: ``fail_commit_status`` (e.g. 500 on the commit call) and
  ``reject_tokens`` (401 on every call carrying or needing a token). The preupload call is
  retried by the client on 5xx with exponential backoff, so failures are injected at the
  commit, which is posted once.
- Only model repos: dataset/space URLs get a 400 naming what is unsupported.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["HubServer", "git_blob_sha1"]

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob: what the Hub returns as ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class _Commit:
    oid: str
    parent: str | None
    summary: str
    files: dict[str, bytes]  # full snapshot after this commit
    created_at: str


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, _Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.body = body or {}  # extra JSON fields, e.g. the Hub's 409 on create carries the repo url


class HubServer:
    """In-memory Hub on ``127.0.0.1:<ephemeral port>``; use as a context manager.

    Args:
        tokens: accepted tokens -> user name. ``None`` accepts any non-empty token as user ``"user"``.
    """

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = {"hf_test_token": "user"} if tokens is None else dict(tokens)
        self.fail_commit_status: int | None = None  # answer the commit call with this status
        self.reject_tokens = False  # answer 401 to every authenticated call
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) log, for assertions
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection helpers for tests ------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Snapshot ``{path: bytes}`` of a repo at a branch or commit."""
        with self._lock:
            commit = self.repos[repo_id].resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_id}@{revision}")
            return dict(commit.files)

    # -- state changes (called with the lock held) -----------------------------------------
    def _new_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join((str(self._counter), *parts)).encode()).hexdigest()

    def _commit(self, repo: _Repo, branch: str, summary: str, files: dict[str, bytes]) -> _Commit:
        parent = repo.branches.get(branch)
        oid = self._new_oid(repo.repo_id, branch, summary, *(f"{p}:{git_blob_sha1(c)}" for p, c in sorted(files.items())))
        commit = _Commit(oid=oid, parent=parent, summary=summary, files=files, created_at=_now_iso())
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def _create_repo(self, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_id=repo_id, private=private, created_at=_now_iso())
        # Like the Hub: a new repo starts with one commit holding a .gitattributes.
        self._commit(repo, "main", "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self.repos[repo_id] = repo
        return repo


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has Content-Length
    server_hub: HubServer

    def log_message(self, format, *args):  # noqa: A002 - silence stderr; requests are logged in hub.requests
        pass

    # -- plumbing ----------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, *, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), headers, head=head)

    def _user(self, *, required: bool) -> str | None:
        """User name from ``Authorization: Bearer <token>``; 401 when invalid (or missing and required)."""
        hub = self.server_hub
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else ""
        if token:
            if not hub.reject_tokens and (not hub.tokens or token in hub.tokens):
                return hub.tokens.get(token, "user")
            raise _HubError(401, "Invalid credentials in Authorization header")
        if required:
            raise _HubError(401, "Authorization header is required")
        return None

    def _repo(self, repo_id: str, user: str | None, *, write: bool = False) -> _Repo:
        repo = self.server_hub.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise _HubError(
                404 if user is not None else 401,
                f"Repository Not Found for url: {self.path}.",
                "RepoNotFound",
            )
        if write and user != repo_id.split("/")[0]:
            raise _HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _revision(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _dispatch(self, method: str) -> None:
        hub = self.server_hub
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        hub.requests.append((method, url.path))
        body = self._body() if method == "POST" else b""
        try:
            with hub._lock:
                if method == "POST" and segments == ["api", "repos", "create"]:
                    return self._create(body)
                if method == "POST" and segments == ["api", "validate-yaml"]:
                    return self._validate_yaml(body)
                if method == "GET" and segments == ["api", "whoami-v2"]:
                    user = self._user(required=True)
                    return self._json(200, {"type": "user", "name": user, "auth": {"type": "access_token"}})
                if len(segments) >= 4 and segments[0] == "api":
                    if segments[1] in ("datasets", "spaces"):
                        raise _HubError(400, f"this test server only serves model repos, not {segments[1]}")
                    if segments[1] == "models":
                        return self._api_models(method, segments[2:], body, query)
                if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
                    return self._resolve(method, "/".join(segments[:2]), segments[3], "/".join(segments[4:]))
                raise _HubError(404, f"no route for {method} {url.path}")
        except _HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message, **err.body}, headers, head=method == "HEAD")
        except Exception as err:  # a bug in the server must show up as a 500, not a hang
            self._json(500, {"error": f"test hub server error: {type(err).__name__}: {err}"}, head=method == "HEAD")

    do_GET = lambda self: self._dispatch("GET")  # noqa: E731
    do_HEAD = lambda self: self._dispatch("HEAD")  # noqa: E731
    do_POST = lambda self: self._dispatch("POST")  # noqa: E731

    # -- endpoints ---------------------------------------------------------------------------
    def _create(self, body: bytes) -> None:
        user = self._user(required=True)
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise _HubError(400, f"this test server only creates model repos, not {payload.get('type')}")
        name, namespace = payload.get("name"), payload.get("organization") or user
        if not (isinstance(name, str) and _REPO_PART.match(name) and _REPO_PART.match(namespace)):
            raise _HubError(400, f"invalid repo name {namespace}/{name}")
        if namespace != user:
            raise _HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{name}"
        if repo_id in self.server_hub.repos:
            raise _HubError(409, "You already created this model repo", body={"url": f"{self.server_hub.url}/{repo_id}"})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.server_hub._create_repo(repo_id, private)
        self._json(200, {"url": f"{self.server_hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body: bytes) -> None:
        self._user(required=False)
        content = json.loads(body or b"{}").get("content", "")
        errors, warnings = [], []
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if match is None:
            warnings.append({"message": "empty or missing yaml metadata in repo card"})
        else:
            try:
                meta = yaml.safe_load(match.group(1))
                if not isinstance(meta, dict):
                    errors.append({"message": "\"metadata\" must be a YAML mapping"})
            except yaml.YAMLError as err:
                errors.append({"message": f"YAML error: {err}"})
        status = 400 if errors else 200
        self._json(status, {"errors": errors, "warnings": warnings}, {"X-Error-Message": "Invalid metadata"} if errors else None)

    def _api_models(self, method: str, rest: list[str], body: bytes, query: dict) -> None:
        if len(rest) < 2:
            raise _HubError(404, "repo id must be namespace/name")
        repo_id, rest = "/".join(rest[:2]), rest[2:]
        action = rest[0] if rest else None
        if method == "GET" and action in (None, "revision"):
            user = self._user(required=False)
            repo = self._repo(repo_id, user)
            commit = self._revision(repo, rest[1] if action == "revision" and len(rest) > 1 else "main")
            return self._json(200, self._model_info(repo, commit))
        if method == "GET" and action == "tree" and len(rest) >= 2:
            user = self._user(required=False)
            commit = self._revision(self._repo(repo_id, user), rest[1])
            prefix = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            return self._json(200, _tree(commit.files, prefix, recursive))
        if method != "POST" or action not in ("preupload", "commit", "branch") or len(rest) != 2:
            raise _HubError(404, f"no route for {method} /api/models/{repo_id}/{'/'.join(rest)}")
        user = self._user(required=True)
        repo = self._repo(repo_id, user, write=True)
        revision = rest[1]
        if action == "branch":
            if revision in repo.branches:
                raise _HubError(409, f"Reference already exists: refs/heads/{revision}")
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            base = self._revision(repo, start)
            repo.branches[revision] = base.oid
            return self._json(200, {})
        commit = self._revision(repo, revision)
        if action == "preupload":
            files = json.loads(body)["files"]
            answer = []
            for f in files:
                existing = commit.files.get(f["path"])
                answer.append(
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha1(existing) if existing is not None else None,
                    }
                )
            return self._json(200, {"files": answer, "commitOid": commit.oid})
        # action == "commit"
        if revision not in repo.branches:
            raise _HubError(400, f"can only commit to a branch, got {revision!r}")
        if self.server_hub.fail_commit_status is not None:
            raise _HubError(self.server_hub.fail_commit_status, "Internal Error - We're working hard to fix this as soon as possible!")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent is not None and parent != commit.oid:
            raise _HubError(412, f"parentCommit {parent} is not the head of {revision}")
        files = dict(commit.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"unsupported encoding {value.get('encoding')!r} for {value.get('path')}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise _HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(folder)}
            else:
                raise _HubError(400, f"unsupported commit operation {key!r} (this server only takes regular files)")
        new = self.server_hub._commit(repo, revision, header.get("summary", ""), files)
        self._json(
            200,
            {
                "success": True,
                "commitOid": new.oid,
                "commitUrl": f"{self.server_hub.url}/{repo_id}/commit/{new.oid}",
                "pullRequestUrl": None,
            },
        )

    def _model_info(self, repo: _Repo, commit: _Commit) -> dict:
        return {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.created_at,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": p, "size": len(c)} for p, c in sorted(commit.files.items())],
        }

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        user = self._user(required=False)
        repo = self._repo(repo_id, user)
        commit = self._revision(repo, revision)
        if path not in commit.files:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(content)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status, start = 200, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and method == "GET":
            start = int(match.group(1))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        self._send(status, content[start:], headers, head=method == "HEAD")


def _tree(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    entries, folders = [], set()
    base = prefix + "/" if prefix else ""
    for path, content in sorted(files.items()):
        if not path.startswith(base):
            continue
        rel = path[len(base):]
        if "/" in rel and not recursive:
            folders.add(base + rel.split("/")[0])
            continue
        if recursive:
            parts = rel.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                folders.add(base + "/".join(parts[:i]))
        entries.append({"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": path})
    entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f} for f in sorted(folders)]
    return entries
