"""``spp-curate push``: publish a verified release to the Hugging Face Hub as a dataset repo.

Uploads go through ``huggingface_hub``'s large-folder uploader, which splits
the work, retries, and resumes an interrupted upload. The token comes from
the usual places (``HF_TOKEN``, ``huggingface-cli login``) and is never
printed.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..files import read_json

# Left out of an upload: the export's plan file and the uploader's own cache.
IGNORE_PATTERNS = [".export.json", ".cache/**", "**/.*.tmp-*"]


def release_files(release: Path) -> list[tuple[str, int]]:
    """The files a push uploads, as ``(relative path, bytes)``: those the manifest lists, plus the manifest."""
    manifest = read_json(release / "manifest.json")
    files = [(e["path"], int(e["bytes"])) for e in manifest["files"]]
    return files + [("manifest.json", (release / "manifest.json").stat().st_size)]


def push_release(release: Path, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    """Create the dataset repo if needed and upload ``release``; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"{repo_id!r} is not ORG/NAME", option="--repo-id")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        api.upload_large_folder(repo_id=repo_id, folder_path=release, repo_type="dataset", revision=revision,
                                private=private, ignore_patterns=IGNORE_PATTERNS, print_report=False)
    except HfHubHTTPError as exc:
        raise UserError(f"the Hub refused the upload: {str(exc).splitlines()[0]}", option="push") from None
    except OSError as exc:
        raise UserError(f"cannot reach the Hub ({type(exc).__name__}); check the network and HF_ENDPOINT",
                        option="push") from None
    return str(url)
