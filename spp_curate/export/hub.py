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
