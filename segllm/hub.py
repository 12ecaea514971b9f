"""Hugging Face hub ids wherever a folder is accepted.

Every door that takes a checkpoint, LLaVA-1.5 or CLIP folder (``--checkpoint``,
``from_pretrained``, ``load_model``, ``model.llava.path`` / ``vision_tower`` and ``model.init`` in a
recipe) passes its argument through :func:`resolve_folder`:

- an existing local path is returned as it is (a local folder always wins over a hub id);
- otherwise a string of the form ``org/name``, ``org/name/sub/folder`` or either with ``@revision``
  is a hub id: the repository (only the subfolder's files when one is named) is fetched with
  ``huggingface_hub.snapshot_download`` into the normal hub cache (``HF_HUB_CACHE``, or
  ``HF_HOME/hub``), and the snapshot folder (plus the subfolder) is returned;
- with ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, only the cache is read: an id that is
  not there raises :class:`HubError` saying how to download it;
- anything else (or ``None``) is returned unchanged, so the caller's own "folder not found" error
  names it. Nothing is ever fetched unless the caller named a hub id: there are no default ids.

The environment is read when a call is made (not when this module or ``huggingface_hub`` is
imported), so setting ``HF_HOME`` or ``HF_HUB_OFFLINE`` in a running process takes effect.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from segllm.errors import CheckpointError

__all__ = ["HubError", "HubId", "hub_cache_dir", "hub_offline", "parse_hub_id", "resolve_folder"]

# one path segment of a hub id: what the hub allows in an owner or repository name (no "--" or
# ".." checked here: huggingface_hub refuses those with its own message, turned into a HubError)
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB_ID = re.compile(rf"^(?P<repo>{_SEGMENT}/{_SEGMENT})(?P<sub>(?:/{_SEGMENT})*)/?(?:@(?P<rev>[^@\s]+))?$")

# files worth fetching for a folder that is read as config + safetensors weights + tokenizer:
# hub repositories often also hold the same weights as pickles, TensorFlow or Flax files
WEIGHT_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


class HubError(CheckpointError):
    """A hub id that cannot be resolved: not in the cache while offline, unknown to the hub, or a
    revision that does not exist. The message names the id and says how to download it."""


@dataclass(frozen=True)
class HubId:
    """A parsed hub id.

    Attributes:
        repo_id: ``org/name``.
        subfolder: the folder inside the repository (``""``: the repository's root).
        revision: a branch, tag or commit hash (None: the default branch, ``main``).
    """

    repo_id: str
    subfolder: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{sub}{rev}"

    def download_command(self) -> str:
        """The shell command that fetches this id into the hub cache (``hf`` is huggingface_hub's
        command line; older versions call it ``huggingface-cli``)."""
        parts = ["hf download", self.repo_id]
        if self.subfolder:
            parts.append(f"--include '{self.subfolder}/*'")
        if self.revision:
            parts.append(f"--revision {self.revision}")
        return " ".join(parts)


def parse_hub_id(text: str | os.PathLike, *, revision: str | None = None) -> HubId | None:
    """``org/name[/sub/folder][@revision]`` -> :class:`HubId`; None when ``text`` is not of that form
    (an absolute path, ``./x``, ``~/x``, one segment, a Windows path, ...).

    Args:
        text: the string a user passed where a folder is accepted.
        revision: a revision given separately (``--revision``); it must agree with an ``@rev`` in
            ``text`` when both are given.

    Raises:
        HubError: ``text`` names one revision and ``revision`` another.
    """
    if isinstance(text, Path):
        text = str(text)
    if not isinstance(text, str):
        return None
    m = _HUB_ID.match(text)
    if m is None:
        return None
    rev = m.group("rev")
    if rev and revision and rev != revision:
        raise HubError(f"{text!r} names revision {rev!r} but revision {revision!r} was also given: name one")
    return HubId(m.group("repo"), m.group("sub").strip("/"), rev or revision)


def hub_offline() -> bool:
    """Whether downloads are switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set to a
    true value, read now; huggingface_hub itself reads them once at import)."""
    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any(v is not None and v.strip().upper() in {"1", "ON", "YES", "TRUE"} for v in values) or constants.HF_HUB_OFFLINE


def hub_cache_dir() -> Path:
    """The hub cache folder, by huggingface_hub's rule but read now: ``HF_HUB_CACHE`` (or the older
    ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else huggingface_hub's default."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def resolve_folder(
    path: str | os.PathLike | None,
    *,
    revision: str | None = None,
    patterns: tuple[str, ...] | None = None,
    what: str = "checkpoint",
) -> Path | None:
    """The local folder for ``path``: itself when it exists, else the hub snapshot a hub id names
    (fetched into the hub cache unless offline), else ``Path(path)`` unchanged.

    Args:
        path: a folder, a hub id (``org/name``, ``org/name/sub``, with an optional ``@revision``),
            or None (returned as None: the caller's default, never a hub id).
        revision: a branch, tag or commit of the hub repository (only used for a hub id).
        patterns: glob patterns of the files to fetch, relative to the subfolder (default: all of
            it). Already cached files are never fetched again.
        what: what the folder is, for error messages ("checkpoint", "LLaVA-1.5 folder", ...).

    Raises:
        HubError: a hub id that is not cached while offline, that the hub does not know, or whose
            revision or subfolder does not exist (the message says how to download it); a
            revision given with a local path.
    """
    if path is None:
        return None
    local = Path(path).expanduser()
    if local.exists():
        if revision is not None:
            # a revision says the caller meant the hub, but a local path always wins: say so
            raise HubError(f"{what} {str(path)!r} is a local path, and a revision ({revision!r}) applies to hub ids only")
        return local
    hub_id = parse_hub_id(path, revision=revision)
    if hub_id is None:
        return local
    return _snapshot(hub_id, patterns=patterns, what=what)


def _snapshot(hub_id: HubId, *, patterns: tuple[str, ...] | None, what: str) -> Path:
    prefix = f"{hub_id.subfolder}/" if hub_id.subfolder else ""
    allow = [prefix + p for p in (patterns or ("*",))]
    offline = hub_offline()
    cache = hub_cache_dir()
    how = (
        f"download it on a machine with network access into the same cache (HF_HOME or HF_HUB_CACHE pointing at "
        f"{cache}): `{hub_id.download_command()}`"
        + (", or unset HF_HUB_OFFLINE to let segllm download it" if offline else "")
        + "; or pass a local folder instead"
    )
    try:
        snapshot = snapshot_download(
            hub_id.repo_id, revision=hub_id.revision, allow_patterns=allow, cache_dir=str(cache), local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        where = "downloads are off (HF_HUB_OFFLINE)" if offline else "the hub could not be reached"
        raise HubError(
            f"{what} {str(hub_id)!r} is not a local folder, and hub id {hub_id.repo_id} "
            f"(revision {hub_id.revision or 'main'}) is not in the hub cache {cache} while {where}: {how}"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{what} {str(hub_id)!r}: the hub repository {hub_id.repo_id} has no revision {hub_id.revision!r}") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise HubError(
            f"{what} {str(hub_id)!r} is not a local folder, and the hub has no repository {hub_id.repo_id} that this "
            f"machine may read ({type(e).__name__}; a private or gated one needs `hf auth login`)"
        ) from None
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise HubError(f"{what} {str(hub_id)!r} is not a local folder and could not be fetched from the hub: {e}") from None
    folder = Path(snapshot) / hub_id.subfolder if hub_id.subfolder else Path(snapshot)
    # the cache holds a snapshot for the revision, but the files asked for may be absent: a
    # snapshot records only what was fetched, and an offline look-up cannot list the repository
    if not folder.is_dir() or not any(folder.iterdir()):
        missing = f"has no folder {hub_id.subfolder!r}" if hub_id.subfolder else "is empty"
        raise HubError(
            f"{what} {str(hub_id)!r}: the cached snapshot {snapshot} of {hub_id.repo_id} {missing}"
            + (f": {how}" if offline else " (no such folder in the repository at that revision?)")
        )
    return folder
