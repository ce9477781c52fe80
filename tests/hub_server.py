"""A local stand-in for the Hugging Face Hub, for the real ``huggingface_hub`` client pointed at it with
``HF_ENDPOINT`` (and ``HF_HUB_DISABLE_XET=1``: the LFS transfer, not Xet's storage protocol).

It answers what the client calls for a dataset repo here: create a repo and a branch, pre-upload (regular or
LFS), the LFS batch API with basic transfers and the PUT of each object, commit (NDJSON), the revision and
tree listings, and file downloads (``resolve``, with the headers ``hf_hub_download`` reads). Commits are kept
in memory, objects on disk. A test can make it fail: the next N commits answer 500 or 403, an LFS object is
dropped or altered after its commit, a committed file is removed from the head."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

#: Files the stand-in stores as LFS objects (the Hub's own .gitattributes for datasets names these and more).
LFS_SUFFIXES = (".parquet", ".tar", ".png", ".jpg", ".npz")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=lambda: {"main": ""})
    commits: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # sha -> path -> file


@dataclass
class Hub:
    store: Path
    repos: dict[str, Repo] = field(default_factory=dict)
    fail_commits: list[int] = field(default_factory=list)  # status codes the next commits answer
    #: A path the stand-in loses right after the commit that adds it (data missing behind a successful commit).
    lose_on_commit: str | None = None
    commits_made: int = 0
    lfs_bytes_received: int = 0
    requests: list[str] = field(default_factory=list)

    def head(self, repo_id: str, rev: str) -> tuple[str, dict[str, dict[str, Any]]]:
        repo = self.repos[repo_id]
        sha = repo.branches.get(rev, rev)
        return sha, repo.commits.get(sha, {})

    def drop(self, repo_id: str, path: str) -> None:
        """A file removed from the branch head, as an interrupted or faulty upload leaves a repo."""
        repo = self.repos[repo_id]
        files = dict(repo.commits[repo.branches["main"]])
        files.pop(path)
        sha = hashlib.sha1(f"drop {path} {time.time()}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches["main"] = sha

    def alter(self, repo_id: str, path: str, truncate: bool = False) -> None:
        """Another file committed under a head file's name: one byte flipped, or cut to half its length."""
        _, files = self.head(repo_id, "main")
        data = bytearray(Path(files[path]["blob"]).read_bytes())
        if truncate:
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        oid = hashlib.sha256(bytes(data)).hexdigest()
        blob = self.store / (oid if files[path]["lfs"] else f"git-{oid}")
        blob.write_bytes(bytes(data))
        files[path] = {**files[path], "size": len(data), "sha256": oid, "blob": str(blob),
                       "oid": git_blob_id(bytes(data))}


def create_app(hub: Hub) -> FastAPI:
    app = FastAPI()

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.middleware("http")
    async def log(request: Request, call_next):
        hub.requests.append(f"{request.method} {request.url.path}")
        return await call_next(request)

    @app.post("/api/repos/create")
    async def create(request: Request):
        body = await request.json()
        repo_id = f"{body.get('organization') or 'user'}/{body['name']}" if "/" not in body["name"] else body["name"]
        if repo_id in hub.repos:  # the Hub names the existing repo's url in its 409
            return JSONResponse({"error": "You already created this dataset repo",
                                 "url": f"{base(request)}/datasets/{repo_id}"}, status_code=409)
        hub.repos[repo_id] = Repo()
        return {"url": f"{base(request)}/datasets/{repo_id}", "name": repo_id}

    @app.post("/api/datasets/{org}/{name}/branch/{branch}")
    async def branch(org: str, name: str, branch: str):
        repo = hub.repos[f"{org}/{name}"]
        if branch in repo.branches:
            return JSONResponse({"error": "Reference already exists"}, status_code=409)
        repo.branches[branch] = repo.branches["main"]
        return {}

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        """The card's YAML header: it must parse as a mapping (the Hub checks much more)."""
        import yaml

        body = await request.json()
        text = body.get("content", "")
        try:
            header = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else {}
            ok = isinstance(header, dict)
        except (yaml.YAMLError, IndexError):
            ok = False
        if not ok:
            return JSONResponse({"errors": [{"message": "the YAML header does not parse"}]}, status_code=400)
        return {"errors": [], "warnings": []}

    @app.get("/api/datasets/{org}/{name}")
    async def info(org: str, name: str):
        return await revision(org, name, "main")

    @app.get("/api/datasets/{org}/{name}/revision/{rev:path}")
    async def revision(org: str, name: str, rev: str):
        repo_id = f"{org}/{name}"
        if repo_id not in hub.repos:
            return JSONResponse({"error": "Repository not found"}, status_code=404,
                                headers={"X-Error-Code": "RepoNotFound"})
        sha, files = hub.head(repo_id, rev)
        if not sha:
            return JSONResponse({"error": "Invalid rev id"}, status_code=404,
                                headers={"X-Error-Code": "RevisionNotFound"})
        return {"id": repo_id, "sha": sha, "private": False,
                "siblings": [{"rfilename": p} for p in sorted(files)]}

    @app.post("/api/datasets/{org}/{name}/preupload/{rev:path}")
    async def preupload(org: str, name: str, rev: str, request: Request):
        body = await request.json()
        return {"files": [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                           "shouldIgnore": False} for f in body["files"]]}

    @app.post("/datasets/{org}/{name}.git/info/lfs/objects/batch")
    async def batch(org: str, name: str, request: Request):
        body = await request.json()
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (hub.store / obj["oid"]).is_file():
                entry["actions"] = {"upload": {"href": f"{base(request)}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        return JSONResponse({"transfer": "basic", "objects": objects},
                            headers={"Content-Type": "application/vnd.git-lfs+json"})

    @app.put("/lfs-upload/{oid}")
    async def upload(oid: str, request: Request):
        data = await request.body()
        if hashlib.sha256(data).hexdigest() != oid:
            return JSONResponse({"error": "sha256 mismatch"}, status_code=400)
        hub.lfs_bytes_received += len(data)
        (hub.store / oid).write_bytes(data)
        return Response(status_code=200)

    @app.post("/api/datasets/{org}/{name}/commit/{rev:path}")
    async def commit(org: str, name: str, rev: str, request: Request):
        if hub.fail_commits:
            status = hub.fail_commits.pop(0)
            return JSONResponse({"error": "Forbidden" if status == 403 else "Internal Error"}, status_code=status)
        repo_id = f"{org}/{name}"
        repo = hub.repos[repo_id]
        files = dict(repo.commits.get(repo.branches.get(rev, ""), {}))
        for line in (await request.body()).decode().splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "file":
                data = base64.b64decode(value["content"])
                oid = hashlib.sha256(data).hexdigest()
                blob = hub.store / f"git-{oid}"
                blob.write_bytes(data)
                files[value["path"]] = {"size": len(data), "sha256": oid, "lfs": False, "blob": str(blob),
                                        "oid": git_blob_id(data)}
            elif item["key"] == "lfsFile":
                blob = hub.store / value["oid"]
                if not blob.is_file():
                    return JSONResponse({"error": f"LFS object {value['oid']} not uploaded"}, status_code=422)
                files[value["path"]] = {"size": value["size"], "sha256": value["oid"], "lfs": True, "blob": str(blob),
                                        "oid": git_blob_id(f"oid sha256:{value['oid']}".encode())}
            elif item["key"] in ("deletedFile", "deletedFolder"):
                files = {p: f for p, f in files.items() if p != value["path"] and not p.startswith(value["path"] + "/")}
        sha = hashlib.sha1(f"{repo_id} {hub.commits_made} {time.time()}".encode()).hexdigest()
        hub.commits_made += 1
        if hub.lose_on_commit in files:
            files.pop(hub.lose_on_commit)
            hub.lose_on_commit = None
        repo.commits[sha] = files
        repo.branches[rev] = sha
        return {"commitOid": sha, "commitUrl": f"{base(request)}/datasets/{repo_id}/commit/{sha}",
                "pullRequestUrl": None}

    @app.get("/api/datasets/{org}/{name}/tree/{rev}")
    @app.get("/api/datasets/{org}/{name}/tree/{rev}/{path:path}")
    async def tree(org: str, name: str, rev: str, path: str = "", recursive: bool = False):
        repo_id = f"{org}/{name}"
        if repo_id not in hub.repos:
            return JSONResponse({"error": "Repository not found"}, status_code=404,
                                headers={"X-Error-Code": "RepoNotFound"})
        _, files = hub.head(repo_id, rev)
        out = []
        for p, f in sorted(files.items()):
            if path and not p.startswith(path.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": p, "size": f["size"], "oid": f["oid"]}
            if f["lfs"]:
                entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
            out.append(entry)
        return out

    @app.api_route("/datasets/{org}/{name}/resolve/{rev}/{path:path}", methods=["GET", "HEAD"])
    async def resolve(org: str, name: str, rev: str, path: str, request: Request):
        repo_id = f"{org}/{name}"
        sha, files = hub.head(repo_id, rev) if repo_id in hub.repos else ("", {})
        if path not in files:
            return JSONResponse({"error": "Entry not found"}, status_code=404, headers={"X-Error-Code": "EntryNotFound"})
        f = files[path]
        data = Path(f["blob"]).read_bytes()
        etag = f["sha256"] if f["lfs"] else f["oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Length": str(len(data))}
        if f["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers)
        return Response(content=data, status_code=200, headers=headers, media_type="application/octet-stream")

    return app


class HubServer:
    """The stand-in running on 127.0.0.1 in a thread; ``endpoint`` is what ``HF_ENDPOINT`` takes."""

    def __init__(self, store: Path) -> None:
        import uvicorn

        store.mkdir(parents=True, exist_ok=True)
        self.hub = Hub(store)
        config = uvicorn.Config(create_app(self.hub), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
