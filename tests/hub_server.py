"""A loopback emulation of the parts of the Hugging Face Hub HTTP API that flatl2o uses.

It lets the tests drive the *real* ``huggingface_hub`` client (``hf_hub_download``,
``HfApi.create_repo``, ``HfApi.create_branch``, ``HfApi.upload_folder``) end to end without
the network. Written against huggingface_hub 2.4's wire protocol:

* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``: 200 with ``X-Repo-Commit``,
  ``ETag`` (the git blob sha1 of the file, as the Hub sends for non-LFS files) and
  ``Content-Length``. No ``X-Xet-Hash`` / ``X-Xet-Refresh-Route`` / ``Link: xet-auth``
  header is ever sent, so the client never switches to Xet storage and downloads over plain
  HTTP; no redirect either (``Location`` absent, the file is served from the resolve URL).
  Misses are 404 with the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``) and ``X-Error-Message`` headers, which the client maps to its typed errors.
* ``POST /api/repos/create`` (409 when the repo exists; the new repo gets an initial commit
  with ``.gitattributes`` on ``main``, like the Hub), ``POST /api/models/{repo}/branch/{b}``.
* ``POST /api/models/{repo}/preupload/{revision}``: every file is declared ``"regular"`` (never
  LFS / Xet) with the git oid of the current remote copy, so unchanged files are skipped.
* ``POST /api/models/{repo}/commit/{revision}``: the NDJSON commit (``header``, ``file`` with
  base64 content, ``deletedFile``, ``deletedFolder``); ``lfsFile`` is refused.
* ``POST /api/validate-yaml`` (parses the model card front matter) and
  ``GET /api/models/{repo}[/revision/{rev}]`` (id, sha, siblings).

Write calls need an ``Authorization: Bearer`` header (401 otherwise, as on the Hub). Every
request is logged in :attr:`FakeHub.requests`. The server listens on 127.0.0.1 only, on a free
port, serves one request per connection (HTTP/1.0), and :meth:`FakeHub.stop` joins the serving
thread and every handler thread.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as ETag / oid of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Request:
    """One request the server received (for assertions in tests)."""

    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Repo:
    """A model repo: commits (sha -> full file tree) and branches (name -> sha)."""

    repo_id: str
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Branch name or full commit sha -> commit sha (None if unknown)."""
        if revision in self.branches:
            return self.branches[revision]
        if _COMMIT_RE.match(revision) and revision in self.commits:
            return revision
        return None


class HubError(Exception):
    """An error answer: status, Hub error code (``X-Error-Code``), message, extra headers/JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


class FakeHub:
    """In-memory repos plus a ``ThreadingHTTPServer`` that serves them on 127.0.0.1."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake Hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.hub = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-hub",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and join every thread the server started."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()  # returns once serve_forever has exited
        server.server_close()  # joins the handler threads (block_on_close)
        if thread is not None:
            thread.join(timeout=10)
        self._thread = None
        # Keep `_server` so that `endpoint` still names the (now closed) port.

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ repo helpers
    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        """Create a repo with an initial commit on ``main`` (like the Hub does)."""
        with self._lock:
            if repo_id in self.repos:
                raise HubError(409, f"You already created this model repo: {repo_id}")
            repo = Repo(repo_id, private=private)
            self.repos[repo_id] = repo
            self._commit(repo, "main", {".gitattributes": GITATTRIBUTES}, [], "initial commit")
            return repo

    def commit_files(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        revision: str = "main",
        deletions: list[str] | None = None,
        message: str = "server-side commit",
    ) -> str:
        """Commit files directly (test setup, e.g. a corrupted checkpoint); returns the sha."""
        with self._lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            return self._commit(repo, revision, files, deletions or [], message)

    def file(self, repo_id: str, filename: str, revision: str = "main") -> bytes:
        repo = self.repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None, revision
        return repo.commits[sha][filename]

    def requests_for(self, method: str | None = None, contains: str = "") -> list[Request]:
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and contains in r.path
            ]

    def _commit(
        self,
        repo: Repo,
        branch: str,
        files: dict[str, bytes],
        deletions: list[str],
        message: str,
    ) -> str:
        parent = repo.branches.get(branch)
        tree = dict(repo.commits[parent]) if parent is not None else {}
        for path in deletions:
            if path.endswith("/"):
                tree = {k: v for k, v in tree.items() if not k.startswith(path)}
            else:
                tree.pop(path, None)
        tree.update(files)
        self._counter += 1
        digest = hashlib.sha1(
            json.dumps(
                [
                    repo.repo_id,
                    parent,
                    message,
                    self._counter,
                    sorted(git_blob_oid(v) for v in tree.values()),
                ]
            ).encode()
        ).hexdigest()
        repo.commits[digest] = tree
        repo.branches[branch] = digest
        return digest

    # ------------------------------------------------------------------ API
    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def handle(self, h: _Handler, method: str) -> None:
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self._lock:
            self.requests.append(Request(method, h.path, headers))
        body = b""
        if method == "POST":
            body = h.rfile.read(int(headers.get("content-length", "0") or 0))
        try:
            with self._lock:
                status, out_headers, payload = self._route(method, path, query, headers, body)
        except HubError as e:
            out_headers = {"X-Error-Message": e.message, **e.headers}
            if e.code:
                out_headers["X-Error-Code"] = e.code
            status, payload = e.status, json.dumps({"error": e.message, **e.body}).encode()
            out_headers.setdefault("Content-Type", "application/json")
        h.send_response(status)
        out_headers.setdefault("Content-Length", str(len(payload)))
        for k, v in out_headers.items():
            h.send_header(k, v)
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(payload)

    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
    ) -> tuple[int, dict[str, str], bytes]:
        if "/resolve/" in path and method in ("GET", "HEAD") and not path.startswith("/api/"):
            return self._resolve(path.lstrip("/"))
        if method == "POST" and path == "/api/repos/create":
            self._require_token(headers)
            return self._api_create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._api_validate_yaml(json.loads(body or b"{}"))
        m = re.fullmatch(r"/api/models/(.+?)/(preupload|commit|branch)/(.+)", path)
        if m and method == "POST":
            self._require_token(headers)
            repo_id, action, revision = m.groups()
            if action == "preupload":
                return self._api_preupload(repo_id, revision, json.loads(body or b"{}"))
            if action == "commit":
                return self._api_commit(repo_id, revision, query, body)
            return self._api_branch(repo_id, revision, json.loads(body or b"{}"))
        m = re.fullmatch(r"/api/models/(.+?)(?:/revision/(.+))?", path)
        if m and method == "GET":
            return self._api_model_info(m.group(1), m.group(2) or "main")
        raise HubError(404, f"Not found: {method} {path}")

    @staticmethod
    def _require_token(headers: dict[str, str]) -> None:
        if not headers.get("authorization", "").startswith("Bearer "):
            raise HubError(401, "Invalid username or password.")

    @staticmethod
    def _json(data: Any, status: int = 200) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(data).encode()

    def _resolve(self, rest: str) -> tuple[int, dict[str, str], bytes]:
        # {owner}/{name}/resolve/{revision}/{filename}; the revision is URL-quoted by the client
        # (so a branch "a/b" arrives as "a%2Fb" and was unquoted above: match the repo first).
        for repo_id in sorted(self.repos, key=len, reverse=True):
            prefix = f"{repo_id}/resolve/"
            if rest.startswith(prefix):
                repo = self.repos[repo_id]
                break
        else:
            raise HubError(404, "Repository not found", "RepoNotFound")
        remainder = rest[len(prefix) :]
        for rev in sorted([*repo.branches, *repo.commits], key=len, reverse=True):
            if remainder.startswith(rev + "/"):
                revision, filename = rev, remainder[len(rev) + 1 :]
                break
        else:
            raise HubError(404, f"Invalid rev id: {remainder.split('/')[0]}", "RevisionNotFound")
        sha = self._revision(repo, revision)
        tree = repo.commits[sha]
        if filename not in tree:
            raise HubError(
                404, f"Entry not found: {filename}", "EntryNotFound", headers={"X-Repo-Commit": sha}
            )
        content = tree[filename]
        return (
            200,
            {
                "X-Repo-Commit": sha,
                "ETag": f'"{git_blob_oid(content)}"',
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}";',
                "Accept-Ranges": "bytes",
            },
            content,
        )

    def _api_create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if payload.get("type") not in (None, "model"):
            raise HubError(400, f"this fake Hub only hosts model repos, got {payload.get('type')}")
        name, org = payload.get("name"), payload.get("organization")
        if not isinstance(name, str) or not name:
            raise HubError(400, "missing repo name")
        repo_id = f"{org}/{name}" if org else name
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", body={"url": url})
        self.create_repo(repo_id, private=payload.get("visibility") == "private")
        return self._json({"url": url, "name": repo_id, "id": repo_id})

    def _api_branch(
        self, repo_id: str, branch: str, payload: dict[str, Any]
    ) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._revision(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start
        return self._json({})

    def _api_preupload(
        self, repo_id: str, revision: str, payload: dict[str, Any]
    ) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        sha = self._revision(repo, revision)
        tree = repo.commits[sha]
        files = []
        for f in payload.get("files", []):
            current = tree.get(f["path"])
            files.append(
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(current) if current is not None else None,
                }
            )
        return self._json({"files": files, "commitOid": sha})

    def _api_commit(
        self, repo_id: str, revision: str, query: dict[str, list[str]], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        if query.get("create_pr"):
            raise HubError(400, "this fake Hub does not emulate pull requests")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        summary, files, deletions = "", {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent is not None and parent != repo.branches[revision]:
                    raise HubError(
                        412, "A commit has happened since. Please refresh and try again."
                    )
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in repo.commits[repo.branches[revision]]:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                deletions.append(value["path"])
            elif key == "deletedFolder":
                deletions.append(value["path"].rstrip("/") + "/")
            else:  # lfsFile: the preupload answer said every file is regular
                raise HubError(422, f"unexpected commit operation {key!r}: all files are regular")
        if not summary:
            raise HubError(400, "commit summary is required")
        sha = self._commit(repo, revision, files, deletions, summary)
        return self._json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}",
                "pullRequestUrl": None,
            }
        )

    def _api_validate_yaml(self, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        import yaml

        content = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if m is None:
            return self._json(
                {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
            )
        try:
            data = yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            return self._json({"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}, 400)
        if not isinstance(data, dict):
            return self._json({"errors": [{"message": "metadata must be a mapping"}]}, 400)
        return self._json({"errors": [], "warnings": []})

    def _api_model_info(self, repo_id: str, revision: str) -> tuple[int, dict[str, str], bytes]:
        repo = self._repo(repo_id)
        sha = self._revision(repo, revision)
        return self._json(
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": repo.private,
                "siblings": [{"rfilename": name} for name in sorted(repo.commits[sha])],
            }
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # so that server_close() joins every handler thread
    block_on_close = True
    allow_reuse_address = True
    hub: FakeHub


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers after stop()
    timeout = 10  # a stuck client cannot keep a handler thread alive forever
    server: _Server

    def do_GET(self) -> None:
        self.server.hub.handle(self, "GET")

    def do_HEAD(self) -> None:
        self.server.hub.handle(self, "HEAD")

    def do_POST(self) -> None:
        self.server.hub.handle(self, "POST")

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass


# ---------------------------------------------------------------------- client configuration
#: An endpoint that refuses connections at once (the discard port on loopback): used whenever
#: no fake Hub is running, so that no test can ever reach the real Hub.
DEAD_ENDPOINT = "http://127.0.0.1:9"


@dataclass
class HFEnv:
    """Where the isolated Hugging Face home and cache of one test live."""

    home: Path
    cache: Path

    def set_endpoint(self, monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
        """Point huggingface_hub at ``endpoint``: env var *and* the constants read at import."""
        from huggingface_hub import constants

        endpoint = endpoint.rstrip("/")
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )
        _close_hf_session()

    def set_offline(self, monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
        """Emulate ``HF_HUB_OFFLINE=1`` (read once at import, so the constant is patched too)."""
        from huggingface_hub import constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def isolate_hf(monkeypatch: pytest.MonkeyPatch, root: Path) -> HFEnv:
    """Give huggingface_hub a private home, cache and token location under ``root``."""
    from huggingface_hub import constants

    home, cache = root / "hf_home", root / "hf_home" / "hub"
    cache.mkdir(parents=True)
    for var in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_OIDC_RESOURCE",
        "HF_HUB_DISABLE_XET",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    patches = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patches.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # No progress bars (and no tqdm monitor thread) in tests; read at import, like the above.
    tqdm_module = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.setattr(tqdm_module, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    env = HFEnv(home=home, cache=cache)
    env.set_endpoint(monkeypatch, DEAD_ENDPOINT)
    return env


def _close_hf_session() -> None:
    """Drop huggingface_hub's pooled HTTP client (fresh connections for the next endpoint)."""
    from huggingface_hub.utils import close_session

    close_session()
