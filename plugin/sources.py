"""Model sources: a local directory, or a hub id `org/name[:branch]` resolved through huggingface_hub.

`org/name:branch` is how text-generation-webui writes a branch; `revision=` says the same in Python.
With HF_HUB_OFFLINE=1 the hub cache is read without any network access. This is the built-in
`gptq_resolve_source` plugin; it goes last, so a plugin can resolve other spellings first.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import SourceError
from .hookspecs import hookimpl
from .types import ResolvedSource

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Files a GPTQ checkpoint needs; pickle weights are fetched only when the caller opted in to them.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "tokenizer*"]
PICKLE_PATTERNS = ["*.bin", "*.pt"]


@hookimpl(trylast=True)
def gptq_resolve_source(source: str, revision: str | None, allow_pickle: bool) -> ResolvedSource:
    return resolve_source(source, revision=revision, allow_pickle=allow_pickle)


def resolve_source(text: str, revision: str | None = None, allow_pickle: bool = False) -> ResolvedSource:
    """Turn what the user wrote into a local directory holding the checkpoint."""
    path = Path(text).expanduser()
    if path.is_dir():
        return ResolvedSource(text=text, path=path.resolve(), revision=revision)
    if path.exists():
        raise SourceError(f"{text}: is a file; a GPTQ source is a model directory or a hub id (org/name[:branch])")
    repo_id, _, branch = text.partition(":")
    if not _HUB_ID.match(repo_id):
        raise SourceError(f"{text!r}: no such directory, and not a hub id of the form org/name[:branch]")
    if branch and revision and branch != revision:
        raise SourceError(f"{text!r}: names branch {branch!r} but revision={revision!r} was also given")
    rev = revision or branch or None
    return _from_hub(text, repo_id, rev, allow_pickle)


def _from_hub(text: str, repo_id: str, revision: str | None, allow_pickle: bool) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise SourceError(f"{text!r}: the hub has no revision {revision!r} of {repo_id}") from None
    except LocalEntryNotFoundError:
        where = f"revision {revision!r} of " if revision else ""
        raise SourceError(
            f"{text!r}: no directory of that name, and {where}{repo_id} is not in the hub cache "
            "(offline, or the hub cannot be reached)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SourceError(f"{text!r}: the hub could not provide {repo_id}: {exc}") from None
    return ResolvedSource(text=text, path=local, repo_id=repo_id, revision=revision, commit=local.name)
