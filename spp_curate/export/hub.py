"""``spp-curate push`` and the Hub's side of a release: publish, check, fetch at a revision.

Only the files ``verify`` accepted are uploaded (the manifest's entries and the manifest itself), each from
inside the release, as explicit file operations (never a folder walk, so a stray or planted file is never sent),
in commits of at most 100 files and a stated number of bytes (``huggingface_hub``'s ``create_commit``, which
uploads LFS objects before it commits), the card and the manifest in a last commit of their own, so a repo
interrupted at any point never shows a manifest whose files are not all there. Before sending, the repo's
files are listed: what the Hub already holds (same size and sha256, or git oid) is not sent again, so a push
after a kill or a network failure sends what is missing. A commit is retried on a 5xx or a dropped connection,
a bounded number of times, never on a refusal (4xx). After the last commit the remote is listed at that commit
and compared with the manifest; ``spp-curate verify hf://ORG/NAME[@REV]`` does the same later, for anyone.
The token comes from the usual places (``HF_TOKEN``, ``huggingface-cli login``) and is never printed.
"""

from __future__ import annotations

from pathlib import Path

import importlib

from typing import Any

from ..errors import UserError, brief
from ..files import safe_join


def check_repo_id(repo_id: str) -> None:
    """``ORG/NAME`` as the Hub accepts it; a one-line :class:`UserError` otherwise (no network)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"{repo_id!r} is not ORG/NAME", option="--repo-id")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"{repo_id!r} is not a valid repo id: {str(exc).splitlines()[0]}", option="--repo-id") \
            from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exception types a failed connection raises, whichever HTTP client huggingface_hub uses."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests.exceptions", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def parse_hub_release(spec: str, option: str = "--pairs") -> tuple[str, str | None]:
    """``hf://ORG/NAME[@REVISION]`` as ``(repo id, revision)``; a one-line error naming ``option`` otherwise."""
    body = spec[len("hf://"):] if spec.startswith("hf://") else spec
    repo_id, _, revision = body.partition("@")
    try:
        check_repo_id(repo_id)
    except UserError:
        raise UserError(f"{spec!r} is not hf://ORG/NAME[@REVISION]", option=option) from None
    if "@" in body and not revision:
        raise UserError(f"{spec!r} names no revision after '@'", option=option)
    return repo_id, revision or None


def fetch_release(spec: str) -> Path:
    """A release on the Hub (``hf://ORG/NAME[@REVISION]``, a branch, tag or commit) as a local folder: the
    files of that revision, fetched into the Hugging Face cache (or read from it offline), then verified
    against their manifest as a local release is (every file's size and sha256, rows, layout). A revision
    pins the release; without one, the branch's head at this moment."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, \
        RevisionNotFoundError

    from .manifest import verify_release

    repo_id, revision = parse_hub_release(spec)
    try:
        snapshot = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise UserError(f"{spec}: no such dataset or revision on the Hub ({type(exc).__name__})",
                        option="--pairs") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, *_network_errors()) as exc:
        raise UserError(f"{spec}: cannot fetch it ({type(exc).__name__}); offline, it must be in the Hugging Face "
                        "cache (HF_HUB_CACHE) at that revision", option="--pairs") from None
    folder = _own_copy(snapshot, repo_id)
    problems = verify_release(folder)
    if problems:
        raise UserError(f"{spec} does not verify as fetched ({problems[0]}; {len(problems)} problem(s))",
                        option="--pairs")
    return folder


def releases_home() -> Path:
    """Where releases fetched from the Hub are laid out as plain folders (``SPP_CURATE_CACHE``, else
    ``~/.cache/spp-curate``)."""
    import os

    return Path(os.environ.get("SPP_CURATE_CACHE") or Path.home() / ".cache" / "spp-curate") / "releases"


def _own_copy(snapshot: Path, repo_id: str) -> Path:
    """The Hub cache's snapshot (symlinks into its blobs) as a folder of plain files, hard-linked to those blobs
    (copied across file systems), keyed by the commit: what ``verify`` and the readers take, which follow no
    symlink. Only links that resolve inside the repo's own cache folder are taken."""
    import os
    import shutil

    from .pictures import link_or_copy

    commit = snapshot.name
    dest = releases_home() / f"{repo_id.replace('/', '--')}@{commit}"
    if (dest / "manifest.json").is_file():
        return dest
    repo_cache = snapshot.parents[1].resolve()
    building = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    for path in sorted(snapshot.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        target = path.resolve()
        if not target.is_file() or not target.is_relative_to(repo_cache):
            continue  # left out: verify then names what the manifest lists and is missing
        link_or_copy(target, building / path.relative_to(snapshot))
    building.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(building, dest)
    except OSError:  # another run laid it out first
        shutil.rmtree(building, ignore_errors=True)
    return dest


# ------------------------------------------------------------------ a push that survives, and a remote that is checked

#: A commit holds at most this many files and bytes (the Hub recommends under 100 files a commit; a large single
#: commit is what times out).
MAX_FILES_PER_COMMIT = 100
MAX_BYTES_PER_COMMIT = 8 * 2**30
#: Attempts of one commit before the push gives up (a 4xx is not retried: the server said no).
COMMIT_ATTEMPTS = 4
#: What a file of the release is called last, so that a half-pushed repo never holds a manifest whose files are
#: not all there: the card and the manifest go in the final commit, the manifest being what readers trust.
LAST = ("README.md", "croissant.json", "manifest.json")
#: A file the Hub keeps in git (not LFS) is read back whole to be hashed, up to this size.
MAX_REGULAR_BYTES = 64 * 2**20


def plan_commits(files: list[tuple[str, int]], max_files: int = MAX_FILES_PER_COMMIT,
                 max_bytes: int = MAX_BYTES_PER_COMMIT) -> list[list[tuple[str, int]]]:
    """The release's files in commits of at most ``max_files`` files and ``max_bytes`` bytes (a file larger than
    that alone), the card and the manifest in a last commit of their own."""
    data = [f for f in files if f[0] not in LAST]
    commits: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    size = 0
    for path, n in data:
        if current and (len(current) >= max_files or size + n > max_bytes):
            commits.append(current)
            current, size = [], 0
        current.append((path, n))
        size += n
    if current:
        commits.append(current)
    last = [f for name in LAST for f in files if f[0] == name]
    return commits + ([last] if last else [])


def remote_files(api, repo_id: str, revision: str | None) -> dict[str, dict[str, Any]]:
    """The files of a dataset repo at ``revision``: size, LFS sha256 (None for a file kept in git) and git oid;
    empty for a repo with no commit yet."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        tree = api.list_repo_tree(repo_id, repo_type="dataset", revision=revision, recursive=True)
        return {f.path: {"size": f.size, "sha256": f.lfs.sha256 if f.lfs else None, "oid": f.blob_id}
                for f in tree if hasattr(f, "size")}
    except (EntryNotFoundError, RevisionNotFoundError):
        return {}


def _git_oid(path: Path) -> str:
    import hashlib

    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def already_there(release: Path, rel: str, size: int, sha256: str | None, remote: dict[str, Any] | None) -> bool:
    """Whether the Hub holds this very file: its size and, as stored, its LFS sha256 or its git oid."""
    if remote is None or remote["size"] != size:
        return False
    if remote["sha256"] is not None:
        return sha256 is not None and remote["sha256"] == sha256
    return remote["oid"] == _git_oid(safe_join(release, rel))


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def commit_with_retries(api, repo_id: str, operations: list, revision: str | None, message: str,
                        say=lambda line: None, attempts: int = COMMIT_ATTEMPTS, wait: float = 2.0):
    """One ``create_commit``, retried with a growing wait on a 5xx or a dropped connection, never on a 4xx other
    than 408 and 429 (the server said no: an expired token, no rights, a bad request); a one-line
    :class:`UserError` when it does not go through."""
    import time

    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, attempts + 1):
        try:
            return api.create_commit(repo_id, operations=operations, repo_type="dataset", revision=revision,
                                     commit_message=message)
        except HfHubHTTPError as exc:
            status = _status(exc)
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise UserError(f"the Hub refused the commit (HTTP {status}: {brief(exc, 120)}); nothing is retried "
                                "on a refusal: check the token's write access and the repo id", option="push") from None
            why = f"HTTP {status}" if status else type(exc).__name__
        except _network_errors() as exc:
            why = type(exc).__name__
        if attempt == attempts:
            raise UserError(f"the Hub did not take the commit after {attempts} attempts ({why}); run the same push "
                            "again: it sends only what the Hub does not hold", option="push")
        say(f"push: commit failed ({why}); again in {wait * 2 ** (attempt - 1):.0f} s "
            f"(attempt {attempt + 1} of {attempts})")
        time.sleep(wait * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def retry_wait() -> float:
    """Seconds before the first retry of a commit (doubling after): ``SPP_CURATE_RETRY_WAIT``, else 2."""
    import os

    try:
        return max(0.0, float(os.environ.get("SPP_CURATE_RETRY_WAIT", "2")))
    except ValueError:
        return 2.0


def push_release(release: Path, files: list[tuple[str, int]], repo_id: str, private: bool = False,
                 revision: str | None = None, max_files: int = MAX_FILES_PER_COMMIT,
                 max_bytes: int = MAX_BYTES_PER_COMMIT, say=lambda line: None,
                 wait: float | None = None) -> dict[str, Any]:
    """Upload the verified ``files`` of ``release`` in bounded commits, the manifest last; files the Hub already
    holds (same size and hash) are not sent, so a push after a kill or a network failure sends what is missing.
    Then the remote at the last commit is compared with the manifest. Returns the commit, the counts, the bytes
    sent and the URL."""
    import time

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .. import layout
    from ..progress import stage_progress
    from .manifest import load_manifest

    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # one bar of ours (files, bytes, rate, ETA), not one per file
    manifest = load_manifest(release)
    sha = {e.path: e.sha256 for e in manifest.files}
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        remote = remote_files(api, repo_id, revision)
    except HfHubHTTPError as exc:
        raise UserError(f"the Hub refused the upload: {brief(exc, 160)}", option="push") from None
    except _network_errors() as exc:
        raise UserError(f"cannot reach the Hub ({type(exc).__name__}); check the network, HF_ENDPOINT and "
                        "HF_HUB_OFFLINE", option="push") from None
    wait = retry_wait() if wait is None else wait
    todo = [(rel, n) for rel, n in files if not already_there(release, rel, n, sha.get(rel), remote.get(rel))]
    commits = plan_commits(todo, max_files, max_bytes)
    # Files of an earlier version this one does not list (a pair table cut in more shards, dropped picture shards)
    # leave in the manifest's own commit: the repo switches from one version to the next in one commit, and the
    # configs' globs never read the two mixed.
    listed = {rel for rel, _ in files}
    stale = sorted(p for p in remote if p not in listed
                   and any(pattern.fullmatch(p) for pattern in layout.RELEASE_ENTRY_PATTERNS.values()))
    if stale and not any(rel == layout.MANIFEST for chunk in commits for rel, _ in chunk):
        commits.append([])
    sent, commit, started = 0, None, time.time()
    say(f"push: {len(files) - len(todo)} of {len(files)} files already on the Hub; {len(todo)} to send in "
        f"{len(commits)} commit(s) of at most {max_files} files"
        + (f"; {len(stale)} file(s) of the earlier version to remove with the manifest" if stale else ""))
    with stage_progress("push", sum(n for _, n in todo), unit="B") as (bar, task):
        for i, chunk in enumerate(commits, 1):
            operations: list = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(safe_join(release, rel)))
                                for rel, _ in chunk]
            if i == len(commits):
                operations += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
            commit = commit_with_retries(api, repo_id, operations, revision,
                                         f"spp-curate release: part {i} of {len(commits)} ({len(chunk)} files)",
                                         say, wait=wait)
            sent += sum(n for _, n in chunk)
            bar.update(task, advance=sum(n for _, n in chunk))
    head = commit.oid if commit is not None else api.dataset_info(repo_id, revision=revision).sha
    after = remote_files(api, repo_id, head)
    problems = compare_remote(release, manifest, after, api, repo_id, head)
    problems += [f"{p}: left from an earlier version" for p in stale if p in after]
    if problems:
        raise UserError(f"the Hub's copy at {head[:12]} differs from the release: " + "; ".join(problems[:5])
                        + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""), option="push")
    return {"commit": head, "url": str(url), "files": len(files), "sent_files": len(todo), "sent_bytes": sent,
            "commits": len(commits), "seconds": round(time.time() - started, 2)}


def compare_remote(release: Path | None, manifest, remote: dict[str, dict[str, Any]], api, repo_id: str,
                   revision: str) -> list[str]:
    """What differs between a repo's files at ``revision`` and the manifest's: a file missing, of another size, or
    of another hash (LFS files by the sha256 the Hub lists; files kept in git read back and hashed)."""
    import hashlib

    problems = []
    for entry in manifest.files:
        got = remote.get(entry.path)
        if got is None:
            problems.append(f"{entry.path}: missing")
        elif got["size"] != entry.bytes:
            problems.append(f"{entry.path}: {got['size']:,} bytes, the manifest says {entry.bytes:,}")
        elif got["sha256"] is not None and got["sha256"] != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the manifest")
        elif got["sha256"] is None:
            if entry.bytes > MAX_REGULAR_BYTES:
                problems.append(f"{entry.path}: kept in git at {entry.bytes:,} bytes, over {MAX_REGULAR_BYTES:,} to check")
                continue
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo_id, entry.path, repo_type="dataset", revision=revision))
            if hashlib.sha256(path.read_bytes()).hexdigest() != entry.sha256:
                problems.append(f"{entry.path}: sha256 differs from the manifest")
    if "manifest.json" not in remote:
        problems.append("manifest.json: missing")
    return problems


def verify_remote(spec: str) -> tuple[str, list[str]]:
    """``verify hf://ORG/NAME[@REV]``: the repo's files at that revision against the manifest it holds there;
    returns the commit and the problems (empty when every listed file is there with its size and hash)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from .manifest import load_manifest

    import shutil
    import tempfile

    repo_id, revision = parse_hub_release(spec, "RELEASE")
    api = HfApi()
    try:
        head = api.dataset_info(repo_id, revision=revision).sha
        fetched = Path(hf_hub_download(repo_id, "manifest.json", repo_type="dataset", revision=head))
        with tempfile.TemporaryDirectory() as folder:  # the cache holds a link; the checks read a file of ours
            shutil.copyfile(fetched.resolve(), Path(folder) / "manifest.json")
            manifest = load_manifest(Path(folder), option="RELEASE")
        remote = remote_files(api, repo_id, head)
        return head, compare_remote(None, manifest, remote, api, repo_id, head)
    except HfHubHTTPError as exc:
        raise UserError(f"{spec}: {brief(exc, 160)}", option="RELEASE") from None
    except _network_errors() as exc:
        raise UserError(f"{spec}: cannot reach the Hub ({type(exc).__name__})", option="RELEASE") from None
