"""``spp-curate push``: publish a verified release to the Hugging Face Hub as a dataset repo.

Only the files ``verify`` accepted are uploaded (the manifest's entries and the
manifest itself), each from inside the release: one commit of explicit file
operations, never a folder walk, so a stray or planted file is never sent.
Files the Hub already holds (same content) are not sent again, so rerunning an
interrupted push sends only what is missing. The token comes from the usual
places (``HF_TOKEN``, ``huggingface-cli login``) and is never printed.
"""

from __future__ import annotations

from pathlib import Path

import importlib

from ..errors import UserError
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


def push_release(release: Path, files: list[tuple[str, int]], repo_id: str, private: bool = False,
                 revision: str | None = None) -> str:
    """Create the dataset repo if needed and upload ``files`` (``manifest.verified_files`` of ``release``, with
    ``repo_id`` checked by :func:`check_repo_id`); returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(safe_join(release, rel)))
                  for rel, _ in files]
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        api.create_commit(repo_id, operations=operations, repo_type="dataset", revision=revision,
                          commit_message=f"spp-curate release ({len(files)} files)")
    except HfHubHTTPError as exc:
        raise UserError(f"the Hub refused the upload: {str(exc).splitlines()[0]}", option="push") from None
    except _network_errors() as exc:
        raise UserError(f"cannot reach the Hub ({type(exc).__name__}); check the network, HF_ENDPOINT and "
                        "HF_HUB_OFFLINE", option="push") from None
    return str(url)


def parse_hub_release(spec: str) -> tuple[str, str | None]:
    """``hf://ORG/NAME[@REVISION]`` as ``(repo id, revision)``; a one-line error naming ``--pairs`` otherwise."""
    body = spec[len("hf://"):] if spec.startswith("hf://") else spec
    repo_id, _, revision = body.partition("@")
    try:
        check_repo_id(repo_id)
    except UserError:
        raise UserError(f"{spec!r} is not hf://ORG/NAME[@REVISION]", option="--pairs") from None
    if "@" in body and not revision:
        raise UserError(f"{spec!r} names no revision after '@'", option="--pairs")
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
