"""A loopback Hugging Face Hub server for push/load tests, plus the pytest fixtures that start it.

There is no internet on the machines that run these tests and no Hub server can be installed from
the registries, so this module implements, with the standard library only, the subset of the Hub
HTTP API that ``huggingface_hub`` uses to push a folder and that ``transformers``/``peft`` use to
load one back. The endpoint list was read from the installed ``huggingface_hub`` source
(``hf_api.create_repo``, ``HfApi._validate_yaml``, ``_commit_api._fetch_upload_modes`` and
``_send_commit``, ``lfs.post_lfs_batch_info`` and ``lfs_upload``, ``file_download.get_hf_file_metadata``)
of every release in :data:`CHECKED_HUGGINGFACE_HUB` (the project's floor and its newest release), and
it answers what either client generation sends; see https://huggingface.co/docs/hub/api for the
public description of the same routes. Where the generations differ, the server accepts both forms
(``create_repo``: 1.x sends ``"private": bool``, 2.x sends ``"visibility": "private"|"public"``), and
what a test must expect from the client itself is derived in one place, :class:`ClientGeneration`.

What is served (anything else answers 404 and is recorded as ``"unknown"`` so a test notices):

==========================  ====================================================================
endpoint name               route
==========================  ====================================================================
``create_repo``             ``POST /api/repos/create``
``validate_yaml``           ``POST /api/validate-yaml``
``preupload``               ``POST /api/models/{repo}/preupload/{rev}``
``lfs_batch``               ``POST /{repo}.git/info/lfs/objects/batch`` (basic transfer only)
``lfs_upload``              ``PUT /_lfs/{ticket}`` (the signed upload URL the batch answer hands out)
``commit``                  ``POST /api/models/{repo}/commit/{rev}`` (NDJSON, ``create_pr=1``)
``create_branch``           ``POST /api/models/{repo}/branch/{branch}``
``model_info``              ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``
``resolve``                 ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``
==========================  ====================================================================

Design points the tests rely on:

* Commits are atomic: a commit is validated completely (every LFS object uploaded and of the
  declared size, every regular file decodable, the parent commit current) before the branch
  pointer moves, so an interrupted or rejected push leaves the branch exactly where it was.
* Every request is recorded as a :class:`Call` (endpoint name, method, path, status), so a test can
  assert which endpoints a push or a load touched and fail loudly when ``huggingface_hub`` changes.
* Faults can be injected per endpoint (:meth:`HubServer.inject_fault`): drop the connection after
  the request body was read (a network failure mid-upload) or answer an HTTP status.
* Tokens map to users; writes need a valid token for the repo's namespace, private repos need one
  to be read, exactly the distinctions the real Hub draws for these routes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

#: The ``huggingface_hub`` releases whose client code this server was read from and whose test runs
#: it passed: the project's floor (1.5.0, the lowest transformers 5.5 allows; 1.3.0 was checked too) and the
#: newest release.
#: Any release of the same major versions is expected to speak the same subset; a new major version
#: fails ``test_client_version_is_in_the_range_the_server_was_checked_against`` until someone re-reads
#: the client and adds it here.
CHECKED_HUGGINGFACE_HUB = ("1.5.0", "2.4.0")

#: Token -> user name. ``WRITE_TOKEN`` may write to its user's namespace; ``OTHER_TOKEN`` is a
#: valid token of a different user (used to prove private repos and namespaces are enforced).
WRITE_TOKEN = "hf_loopback_alice_write"
OTHER_TOKEN = "hf_loopback_bob_write"
USER = "alice"
TOKENS = {WRITE_TOKEN: USER, OTHER_TOKEN: "bob"}

# The real Hub stores these through LFS whatever their size (its default .gitattributes); anything
# else is a regular git blob unless it is at least 10 MB.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".gguf", ".onnx", ".npy", ".npz", ".pkl",
                 ".msgpack", ".model")
_LFS_MIN_SIZE = 10 * 1024 * 1024

_GITATTRIBUTES = b"".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in _LFS_SUFFIXES)

#: The endpoints that only read. A load (transformers, peft) must touch nothing else; which of them it
#: touches depends on the transformers release (5.23 resolves the revision through model_info first,
#: 5.1 goes straight to resolve), so tests check the set, not the sequence.
READ_ENDPOINTS = frozenset({"model_info", "resolve"})


@dataclass(frozen=True)
class ClientGeneration:
    """What the installed ``huggingface_hub`` does that a test must know and that differs across releases.

    Tests assert what ends up on the server (files, commits, refusals). The few that must count the
    client's own requests take the count from here, so this is the one place that knows the client.

    Attributes:
        version: ``huggingface_hub.__version__``.
        retries_dropped_connections: Whether a request whose connection the server closes without an
            answer is retried. The client sees that as httpx's ``RemoteProtocolError``: 1.x retries
            only ``TimeoutException`` and ``NetworkError`` (``utils/_http._DEFAULT_RETRY_ON_EXCEPTIONS``),
            so it raises at once; 2.x (on ``httpx2``) added ``RemoteProtocolError`` to that tuple.
        max_retries: Retries ``http_backoff`` makes after the first attempt (its default, used for LFS uploads).
    """

    version: str
    retries_dropped_connections: bool
    max_retries: int

    #: Upload attempts per dropped LFS upload, as measured on the checked releases; ``installed()``
    #: reads the policy from the client itself and the version test compares it with these.
    KNOWN_DROPPED_UPLOAD_ATTEMPTS: ClassVar[dict[str, int]] = {"1.3.0": 1, "1.5.0": 1, "2.4.0": 6}

    @classmethod
    def installed(cls) -> ClientGeneration:
        """The generation of the imported ``huggingface_hub``, read from its retry policy rather than
        its version number, so a release inside a major version that changes the policy is followed."""
        import inspect

        import huggingface_hub
        from huggingface_hub.utils import _http

        retried = _http._DEFAULT_RETRY_ON_EXCEPTIONS
        return cls(
            version=huggingface_hub.__version__,
            retries_dropped_connections=any(exc.__name__ == "RemoteProtocolError" for exc in retried),
            max_retries=inspect.signature(_http.http_backoff).parameters["max_retries"].default,
        )

    @property
    def dropped_upload_attempts(self) -> int:
        """How many times one LFS upload is sent when the server drops every attempt."""
        return 1 + self.max_retries if self.retries_dropped_connections else 1


_REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"
_ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    ("POST", "create_repo", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
    ("POST", "create_branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$")),
    ("POST", "lfs_batch", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")),
    ("PUT", "lfs_upload", re.compile(r"^/_lfs/(?P<ticket>[0-9a-f]+)$")),
    ("GET", "model_info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("GET", "resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("HEAD", "resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]


@dataclass(frozen=True)
class Call:
    """One request the server answered (or dropped).

    Attributes:
        endpoint: Endpoint name from the module table, or ``"unknown"``.
        method: HTTP method.
        path: Request path without the query string.
        status: HTTP status sent, or 0 when the connection was dropped on purpose.
    """

    endpoint: str
    method: str
    path: str
    status: int


@dataclass
class StoredFile:
    """A file in a commit's tree.

    Attributes:
        sha256: Content address of the blob in the server's blob store.
        size: Size in bytes.
        lfs: Whether the file was committed through LFS (its ETag is then the sha256, as on the Hub).
        git_oid: Git blob sha1 of the content, the ETag of regular files.
    """

    sha256: str
    size: int
    lfs: bool
    git_oid: str


@dataclass
class Commit:
    """An immutable commit: a full file tree plus its parent."""

    oid: str
    parent: str | None
    message: str
    description: str
    tree: dict[str, StoredFile]


@dataclass
class Repo:
    """A model repository: refs (branch or ``refs/pr/N`` name -> commit oid) and commits."""

    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    num_prs: int = 0


@dataclass
class _Fault:
    endpoint: str
    mode: str  # "disconnect" or "status"
    status: int
    remaining: int


class _HubError(Exception):
    """An error answered as JSON with the Hub's ``X-Error-Code`` header so the client maps it."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


def git_blob_oid(data: bytes) -> str:
    """Git's blob object id (sha1 of ``"blob <size>\\0" + data``), which the Hub uses as ETag.

    See https://git-scm.com/book/en/v2/Git-Internals-Git-Objects.
    """
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """A loopback Hub: storage, refs, an access log and fault injection behind a threaded HTTP server.

    Use as a context manager or through the :func:`hub_server` fixture. ``url`` is the value for
    ``HF_ENDPOINT`` (``huggingface_hub`` reads it at import time, so set it before importing in a
    subprocess, or pass ``endpoint=`` to ``HfApi``/``hf_hub_download`` in process).

    Args:
        root: Folder for the blob store; a temporary folder is created (and removed on close) if None.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="loopback_hub_") if root is None else root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "staging").mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.calls: list[Call] = []
        self._faults: list[_Fault] = []
        self._tickets: dict[str, tuple[str, int]] = {}  # upload ticket -> (oid, size)
        # One lock guards refs, commits and the log: commits are applied under it, which is what makes
        # them atomic with respect to concurrent readers and writers.
        self._lock = threading.RLock()
        self._clock = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop serving and remove the temporary blob store."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- test helpers
    def endpoints(self) -> list[str]:
        """Endpoint names hit since the last :meth:`clear_calls`, in order, duplicates removed."""
        with self._lock:
            return list(dict.fromkeys(call.endpoint for call in self.calls))

    def clear_calls(self) -> None:
        """Forget the access log (call between the phases a test wants to tell apart)."""
        with self._lock:
            self.calls.clear()

    def inject_fault(self, endpoint: str, *, mode: str = "disconnect", status: int = 500, times: int = 1) -> None:
        """Make the next ``times`` requests to ``endpoint`` fail.

        Args:
            endpoint: An endpoint name from the module table.
            mode: ``"disconnect"`` closes the socket after reading the request body, without an
                answer (what a dropped network looks like to the client); ``"status"`` answers ``status``.
            status: HTTP status for ``mode="status"``.
            times: How many requests fail before the endpoint works again.

        Raises:
            ValueError: If ``endpoint`` or ``mode`` is not one this server knows.
        """
        known = {name for _, name, _ in _ROUTES}
        if endpoint not in known:
            raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(known)}")
        if mode not in ("disconnect", "status"):
            raise ValueError(f"unknown fault mode {mode!r}; expected 'disconnect' or 'status'")
        with self._lock:
            self._faults.append(_Fault(endpoint, mode, status, times))

    def head(self, repo_id: str, ref: str = "main") -> Commit:
        """The commit a ref points to.

        Raises:
            KeyError: If the repo or ref does not exist.
        """
        with self._lock:
            repo = self.repos[repo_id]
            return repo.commits[repo.refs[ref]]

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        """Path -> content of every file at ``ref``."""
        tree = self.head(repo_id, ref).tree
        return {path: (self.root / "blobs" / entry.sha256).read_bytes() for path, entry in tree.items()}

    def history(self, repo_id: str, ref: str = "main") -> list[Commit]:
        """Commits reachable from ``ref``, newest first."""
        with self._lock:
            repo = self.repos[repo_id]
            out, oid = [], repo.refs[ref]
            while oid is not None:
                out.append(repo.commits[oid])
                oid = repo.commits[oid].parent
            return out

    # ----------------------------------------------------------------------------------- internals
    def _take_fault(self, endpoint: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.endpoint == endpoint and fault.remaining > 0:
                    fault.remaining -= 1
                    return fault
        return None

    def _user(self, headers: Any) -> str | None:
        """User of the bearer token; raises 401 for a token the server does not know."""
        auth = headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in TOKENS:
            # This exact message makes huggingface_hub raise a plain 401 rather than "repo not found".
            raise _HubError(401, "Invalid credentials in Authorization header")
        return TOKENS[token]

    def _repo_for_read(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            # The Hub does not reveal whether a private repo exists: same answer as a missing one.
            raise _HubError(404 if user else 401, "Repository not found", code="RepoNotFound")
        return repo

    def _repo_for_write(self, repo_id: str, user: str | None) -> Repo:
        if user is None:
            raise _HubError(401, "You must be authenticated to write to a repository")
        repo = self._repo_for_read(repo_id, user)
        if repo_id.split("/")[0] != user:
            raise _HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _resolve_ref(self, repo: Repo, rev: str) -> str:
        if rev in repo.refs:
            return repo.refs[rev]
        if re.fullmatch(r"[0-9a-f]{40}", rev) and rev in repo.commits:
            return rev
        raise _HubError(404, f"Invalid rev id: {rev}", code="RevisionNotFound")

    def _new_commit(self, repo: Repo, parent: str | None, message: str, description: str,
                    tree: dict[str, StoredFile]) -> Commit:
        self._clock += 1
        payload = json.dumps([parent, message, description, self._clock,
                              sorted((p, f.sha256) for p, f in tree.items())])
        commit = Commit(hashlib.sha1(payload.encode()).hexdigest(), parent, message, description, tree)
        repo.commits[commit.oid] = commit
        return commit

    def _store_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / sha
        if not path.exists():
            tmp = self.root / "staging" / f"{sha}.{threading.get_ident()}"
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: a reader never sees half a blob
        return sha

    # ------------------------------------------------------------------------------------ handlers
    def handle(self, endpoint: str, method: str, match: re.Match[str], query: dict[str, list[str]], headers: Any,
               body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Dispatch one request; returns (status, headers, body). Raises :class:`_HubError`."""
        user = self._user(headers)
        groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        handler = getattr(self, f"_h_{endpoint}")
        with self._lock:
            return handler(user=user, query=query, headers=headers, body=body, **groups)

    def _h_create_repo(self, user, body, **_):
        payload = json.loads(body)
        if user is None:
            raise _HubError(401, "You must be authenticated to create a repository")
        if payload.get("type", "model") != "model":
            raise _HubError(400, f"this loopback Hub serves model repos only, not {payload.get('type')!r}")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise _HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            # Same status and wording as the Hub, which create_repo(exist_ok=True) relies on.
            # create_repo(exist_ok=True) reads "url" from this 409 answer, as the Hub sends it.
            raise _HubError(409, "You already created this model repo", extra={"url": url})
        # huggingface_hub 2.x sends "visibility"; 1.x sends "private" (a bool). The Hub takes either.
        private = payload["visibility"] == "private" if "visibility" in payload else bool(payload.get("private"))
        repo = Repo(repo_id, private=private)
        # Like the Hub, a new repo has one commit holding .gitattributes.
        sha = self._store_blob(_GITATTRIBUTES)
        tree = {".gitattributes": StoredFile(sha, len(_GITATTRIBUTES), False, git_blob_oid(_GITATTRIBUTES))}
        repo.refs["main"] = self._new_commit(repo, None, "initial commit", "", tree).oid
        self.repos[repo_id] = repo
        return 200, {}, json.dumps({"url": url, "name": repo_id}).encode()

    def _h_validate_yaml(self, body, **_):
        import yaml  # pyyaml is a project dependency; the Hub validates the same front matter

        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, flags=re.S)
        errors = []
        if match is None:
            errors.append({"message": "README.md has no YAML metadata block"})
        else:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as exc:
                meta, errors = None, [{"message": f"YAML does not parse: {exc}"}]
            if meta is not None and not isinstance(meta, dict):
                errors.append({"message": "YAML metadata must be a mapping"})
            elif isinstance(meta, dict):
                errors.extend(_metadata_errors(meta))
        if errors:
            return 400, {}, json.dumps({"errors": errors, "warnings": []}).encode()
        return 200, {}, json.dumps({"errors": [], "warnings": []}).encode()

    def _h_preupload(self, user, repo, rev, body, **_):
        target = self._repo_for_write(repo, user)
        head = target.commits[self._resolve_ref(target, rev)].tree
        files = []
        for item in json.loads(body)["files"]:
            path, size = item["path"], item["size"]
            lfs = path.endswith(_LFS_SUFFIXES) or size >= _LFS_MIN_SIZE
            entry = head.get(path)
            # The remote oid lets the client drop unchanged files from the commit: sha256 for LFS
            # files, the git blob sha1 for regular ones (see CommitOperationAdd._local_oid).
            oid = None if entry is None else (entry.sha256 if entry.lfs else entry.git_oid)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {}, json.dumps({"files": files}).encode()

    def _h_lfs_batch(self, user, repo, body, **_):
        self._repo_for_write(repo, user)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise _HubError(400, "this loopback Hub accepts LFS 'upload' operations with the 'basic' transfer only")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            if (self.root / "blobs" / oid).exists():
                objects.append({"oid": oid, "size": size})  # no actions: already stored, nothing to send
                continue
            ticket = hashlib.sha1(f"{oid}{time.monotonic_ns()}".encode()).hexdigest()
            self._tickets[ticket] = (oid, size)
            upload = {"href": f"{self.url}/_lfs/{ticket}", "header": {}}
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload}})
        payload = json.dumps({"transfer": "basic", "objects": objects}).encode()
        return 200, {"Content-Type": "application/vnd.git-lfs+json"}, payload

    def _h_lfs_upload(self, ticket, body, **_):
        # Signed-URL semantics: the ticket authorises the upload, no Authorization header comes with it.
        if ticket not in self._tickets:
            raise _HubError(403, "upload ticket unknown or already used")
        oid, size = self._tickets[ticket]
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, f"uploaded content does not match oid {oid} / size {size}")
        del self._tickets[ticket]
        self._store_blob(body)
        return 200, {}, b""

    def _h_create_branch(self, user, repo, rev, body, **_):
        target = self._repo_for_write(repo, user)
        if rev in target.refs:
            raise _HubError(409, f"Reference {rev} already exists")
        if rev.startswith("refs/"):
            raise _HubError(400, f"Invalid reference for a branch: {rev}")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        target.refs[rev] = self._resolve_ref(target, start)
        return 200, {}, b"{}"

    def _h_commit(self, user, repo, rev, query, body, **_):
        target = self._repo_for_write(repo, user)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        base_oid = self._resolve_ref(target, rev)
        if header.get("parentCommit") and not base_oid.startswith(header["parentCommit"]):
            raise _HubError(412, f"A commit has happened since {header['parentCommit']}; parent is {base_oid}")
        tree = dict(target.commits[base_oid].tree)
        pending: list[bytes] = []
        # Validate everything first and build the new tree aside: nothing is visible until the ref moves.
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HubError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                data = base64.b64decode(value["content"])
                pending.append(data)
                tree[path] = StoredFile(hashlib.sha256(data).hexdigest(), len(data), False, git_blob_oid(data))
            elif key == "lfsFile":
                blob = self.root / "blobs" / value["oid"]
                if not blob.exists() or ("size" in value and blob.stat().st_size != value["size"]):
                    raise _HubError(400, f"LFS object {value['oid']} for {path} was not uploaded")
                tree[path] = StoredFile(value["oid"], blob.stat().st_size, True, value["oid"])
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise _HubError(404, "A file with this name doesn't exist", code="EntryNotFound")
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [n for n in tree if n.startswith(prefix)]:
                    del tree[name]
            else:
                raise _HubError(400, f"unsupported commit operation {key!r}")
        for data in pending:
            self._store_blob(data)
        commit = self._new_commit(target, base_oid, header.get("summary", ""), header.get("description", ""), tree)
        pr_url = None
        if query.get("create_pr") == ["1"]:
            target.num_prs += 1
            target.refs[f"refs/pr/{target.num_prs}"] = commit.oid
            pr_url = f"{self.url}/{repo}/discussions/{target.num_prs}"
        else:
            target.refs[rev] = commit.oid  # the single step that publishes the commit
        return 200, {}, json.dumps({"commitUrl": f"{self.url}/{repo}/commit/{commit.oid}", "commitOid": commit.oid,
                                    "pullRequestUrl": pr_url, "success": True}).encode()

    def _h_model_info(self, user, repo, rev="main", **_):
        target = self._repo_for_read(repo, user)
        oid = self._resolve_ref(target, rev)
        tree = target.commits[oid].tree
        info = {
            "id": repo,
            "modelId": repo,
            "author": repo.split("/")[0],
            "sha": oid,
            "private": target.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(tree)],
        }
        return 200, {}, json.dumps(info).encode()

    def _h_resolve(self, user, repo, rev, path, **_):
        target = self._repo_for_read(repo, user)
        oid = self._resolve_ref(target, rev)
        entry = target.commits[oid].tree.get(path)
        if entry is None:
            raise _HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {"X-Repo-Commit": oid, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
        if entry.lfs:
            # The Hub names the LFS object in these headers; huggingface_hub prefers them over ETag.
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        return 200, headers, (self.root / "blobs" / entry.sha256).read_bytes()


def _metadata_errors(meta: dict[str, Any]) -> list[dict[str, str]]:
    """The checks of the Hub's metadata validator that our cards can get wrong.

    The real rules are documented at https://huggingface.co/docs/hub/model-cards#model-card-metadata;
    this covers the keys our cards write: list-typed keys, ``base_model_relation`` values and the
    ``model-index`` shape (https://github.com/huggingface/hub-docs/blob/main/modelcard.md).
    """
    errors = []
    for key in ("tags", "datasets", "language"):
        if key in meta and not isinstance(meta[key], list | str):
            errors.append({"message": f'"{key}" must be a string or a list of strings'})
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in ("adapter", "merge", "quantized", "finetune"):
        errors.append({"message": '"base_model_relation" must be one of adapter, merge, quantized, finetune; '
                                  f"got {relation!r}"})
    if relation is not None and "base_model" not in meta:
        errors.append({"message": '"base_model_relation" requires "base_model"'})
    for entry in meta.get("model-index") or []:
        if not isinstance(entry, dict) or "name" not in entry or not isinstance(entry.get("results"), list):
            errors.append({"message": '"model-index" entries need "name" and a "results" list'})
            continue
        for result in entry["results"]:
            if "task" not in result or "dataset" not in result or not isinstance(result.get("metrics"), list):
                errors.append({"message": '"model-index" results need "task", "dataset" and "metrics"'})
            for metric in result.get("metrics", []):
                if "type" not in metric or "value" not in metric:
                    errors.append({"message": '"model-index" metrics need "type" and "value"'})
    return errors


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """Request body, with Content-Length or chunked transfer encoding (httpx streams file objects chunked)."""
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        parts = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()  # CRLF after each chunk
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keeps connections alive as httpx expects; every answer sets Content-Length.
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # the access log lives in server.calls; stderr noise would hide test output

        def _dispatch(self) -> None:
            split = urlsplit(self.path)
            body = _read_body(self)
            endpoint, match = "unknown", None
            for method, name, pattern in _ROUTES:
                if method == self.command and (match := pattern.match(split.path)):
                    endpoint = name
                    break
            fault = server._take_fault(endpoint) if match else None
            if fault is not None and fault.mode == "disconnect":
                with server._lock:
                    server.calls.append(Call(endpoint, self.command, split.path, 0))
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            headers: dict[str, str] = {}
            try:
                if match is None:
                    raise _HubError(404, f"the loopback Hub does not serve {self.command} {split.path}")
                if fault is not None:
                    raise _HubError(fault.status, f"injected failure ({fault.status})")
                status, headers, payload = server.handle(endpoint, self.command, match, parse_qs(split.query),
                                                         self.headers, body)
            except _HubError as err:
                status, payload = err.status, json.dumps({"error": err.message, **err.extra}).encode()
                headers = {**err.headers, "X-Error-Message": err.message}
                if err.code:
                    headers["X-Error-Code"] = err.code
            except Exception as err:  # a server bug must reach the test as a 500 with the reason
                status, payload = 500, json.dumps({"error": f"loopback Hub bug: {err!r}"}).encode()
                headers = {"X-Error-Message": f"loopback Hub bug: {err!r}"}
            with server._lock:
                server.calls.append(Call(endpoint, self.command, split.path, status))
            self.send_response(status)
            headers.setdefault("Content-Type", "application/json")
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    return Handler


def hub_env(server: HubServer, hf_home: str | os.PathLike[str], token: str | None = WRITE_TOKEN) -> dict[str, str]:
    """Environment for a fresh process that talks to ``server`` and nothing else.

    ``HF_ENDPOINT`` is read when ``huggingface_hub`` is imported, so it must be in the child's
    environment; Xet is disabled because the loopback Hub speaks the LFS protocol only; offline
    switches are removed so the child really goes to the server; ``HF_HOME`` isolates its cache.
    """
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN")
    env = {k: v for k, v in os.environ.items() if k not in offline}
    env.update({"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home),
                "HF_HUB_DISABLE_TELEMETRY": "1"})
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """A fresh loopback Hub, with this process's ``huggingface_hub`` pointed at it.

    ``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET`` and ``HF_HUB_OFFLINE`` into
    ``constants`` at import time, and another test may already have imported it, so the constants
    are patched here (and restored by ``monkeypatch``) rather than the environment alone.
    """
    from huggingface_hub import constants

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token_file"))
        # huggingface_hub's module-level functions (file_exists, model_info, ... used by peft) go
        # through one HfApi built at import time with the endpoint of that moment: point it here too,
        # or they would try the real Hub.
        from huggingface_hub import hf_api

        monkeypatch.setattr(hf_api.api, "endpoint", server.url)
        # Any other host is a bug (there is no internet here, and a test must not depend on it):
        # fail the lookup loudly instead of letting a library swallow a DNS error.
        real_getaddrinfo = socket.getaddrinfo

        def loopback_only(host, *args, **kwargs):
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise OSError(f"test tried to reach {host!r}; only the loopback Hub is allowed")
            return real_getaddrinfo(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
        yield server


# What a push that uploads weights needs: create the repo, read what it holds (hf_posenc's identity
# check), validate the card's YAML, ask which files go through LFS, get LFS upload URLs, upload, commit.
UPLOADING_PUSH = {"create_repo", "model_info", "validate_yaml", "preupload", "lfs_batch", "lfs_upload", "commit"}
UPLOAD_ENDPOINTS = {"preupload", "lfs_batch", "lfs_upload"}


def assert_one_atomic_push(server: HubServer) -> None:
    """The order that matters in a push, whatever the client release: the repo exists before anything
    else, the card is validated before any upload (a rejected card uploads nothing), every upload
    precedes the commit, and the commit is the last request and happens exactly once."""
    names = [call.endpoint for call in server.calls]
    assert set(names) == UPLOADING_PUSH, names
    assert names[0] == "create_repo" and names[-1] == "commit" and names.count("commit") == 1, names
    first_upload = min(names.index(n) for n in UPLOAD_ENDPOINTS)
    assert max(names.index(n) for n in ("create_repo", "model_info", "validate_yaml")) < first_upload, names
    assert all(call.status == 200 for call in server.calls), server.calls


def quote_rev(rev: str) -> str:
    """A revision as it appears in Hub URLs (``refs/pr/1`` -> ``refs%2Fpr%2F1``)."""
    return quote(rev, safe="")


# The child process: import order matters (HF_ENDPOINT is read when huggingface_hub is imported, and
# the environment sets it), then load every requested repo and save its logits on fixed input ids.
_LOADER = r"""
import json, sys
import torch
import transformers
specs, out = json.loads(sys.argv[1]), sys.argv[2]
# One thread: CPU kernels may split reductions differently with another thread count, and the test
# compares logits bit for bit with a reference computed single-threaded too.
torch.set_num_threads(1)
import huggingface_hub.constants as hc
assert hc.ENDPOINT == __import__("os").environ["HF_ENDPOINT"], "HF_ENDPOINT was not honoured"
results = {}
for spec in specs:
    kwargs = {"trust_remote_code": True} if spec.get("trust_remote_code") else {}
    if spec.get("revision"):
        kwargs["revision"] = spec["revision"]
    try:
        if spec.get("adapter"):
            from peft import PeftModel
            remote_code = {"trust_remote_code": True} if spec.get("base_trust_remote_code") else {}
            base = transformers.AutoModelForCausalLM.from_pretrained(spec["base"], **remote_code)
            revision = {"revision": spec["revision"]} if spec.get("revision") else {}
            model = PeftModel.from_pretrained(base, spec["repo"], **revision)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(spec["repo"], **kwargs)
        model.eval()
        with torch.no_grad():
            logits = model(torch.tensor(spec["input_ids"])).logits
        posenc = getattr(getattr(model, "config", None), "posenc", None)
        results[spec["name"]] = {"logits": logits, "class": type(model).__name__, "posenc": posenc,
                                 "hf_posenc_imported": "hf_posenc" in sys.modules}
    except Exception as err:  # reported to the test, which decides whether it was expected
        results[spec["name"]] = {"error": f"{type(err).__name__}: {err}"}
torch.save(results, out)
"""


def load_in_fresh_process(server: HubServer, specs: list[dict[str, Any]], workdir: Path,
                          token: str | None = WRITE_TOKEN, timeout: float = 300) -> dict[str, dict[str, Any]]:
    """Load repos from ``server`` in a new Python process and return their logits.

    One process serves many loads because importing torch and transformers dominates the cost.

    Args:
        server: The loopback Hub.
        specs: Per load: ``name``, ``repo``, ``input_ids`` (nested list), optional ``trust_remote_code``,
            ``revision``; for adapters ``adapter=True``, ``base`` and ``base_trust_remote_code``.
        workdir: Scratch folder (the child's ``HF_HOME`` lives there, so nothing is cached between calls).
        token: ``HF_TOKEN`` for the child, or None for an anonymous user.
        timeout: Seconds before the child is killed.

    Returns:
        name -> ``{"logits", "class", "posenc"}`` or ``{"error": message}``.

    Raises:
        AssertionError: If the child process itself failed (its stderr is in the message).
    """
    import subprocess
    import sys

    import torch

    out = workdir / "fresh_logits.pt"
    home = Path(tempfile.mkdtemp(prefix="hf_home_", dir=workdir))
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(specs), str(out)],
        env=hub_env(server, home, token),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"fresh-process load failed:\n{proc.stderr[-4000:]}"
    return torch.load(out, weights_only=False)


def single_thread_logits(model: Any, input_ids: list[list[int]]) -> Any:
    """Logits computed with one CPU thread, as :func:`load_in_fresh_process` computes them.

    CPU kernels may split reductions differently with another thread count, so a bit-for-bit
    comparison needs the same count on both sides.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model(torch.tensor(input_ids)).logits
    finally:
        torch.set_num_threads(threads)
