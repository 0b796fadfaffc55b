"""Models named by their Hugging Face Hub id, `org/name` or `org/name@revision`, as every tool in
this ecosystem names them. huggingface_hub resolves them: its cache, HF_HUB_OFFLINE, tokens from
its usual places (HF_TOKEN, `huggingface-cli login`). Only the files a merge reads are fetched
(weights, their index, config, tokenizer and processor files, adapter files)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from foldin.errors import CheckpointError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
WANTED = ["*.safetensors", "*.json", "*.bin", "*.model", "*.txt", "tokenizer*", "*.py"]


@dataclass(frozen=True)
class Located:
    """Where a model named by the user is on this machine, and, for a Hub model, which one."""

    path: Path
    hub_id: str | None = None  # org/name
    revision: str | None = None  # the commit the name resolved to

    @property
    def source(self) -> str:
        """How to name this model again: its Hub id at the resolved commit, or its path."""
        return f"{self.hub_id}@{self.revision}" if self.hub_id else str(self.path)


def locate(name: str | os.PathLike[str]) -> Located:
    """A local path as it is; otherwise a Hub id, resolved to a folder in huggingface_hub's cache."""
    path = Path(name)
    if path.exists():
        return Located(path)
    match = HUB_ID.fullmatch(str(name))
    if match is None or str(name).startswith((".", "/", "~")):
        raise CheckpointError(f"{name} does not exist (and is not a Hub id of the form org/name[@revision]).")
    return _download(match["repo"], match["revision"])


def _download(repo: str, revision: str | None) -> Located:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise CheckpointError(f"{repo} is not a local path, and naming Hub models needs huggingface_hub.") from None
    named = f"{repo}@{revision}" if revision else repo
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=WANTED))
    except GatedRepoError:
        raise CheckpointError(
            f"could not get {named} from the Hub: it is gated; accept its terms and log in."
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"could not get {named} from the Hub: no such repository (or it is private).") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"could not get {named} from the Hub: it has no revision {revision!r}.") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"could not get {named}: it is not in the Hugging Face cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE is set)."
        ) from None
    except OSError as e:
        raise CheckpointError(f"could not get {named} from the Hub: {e}.") from None
    return Located(folder, repo, folder.name)  # a snapshot folder is named by its commit
