"""Hugging Face Hub model ids → a local folder or GGUF file, as transformers and llama.cpp resolve them.

    load("HuggingFaceTB/SmolLM2-135M-Instruct")               # config.json + safetensors + tokenizer
    load("HuggingFaceTB/SmolLM2-135M-Instruct@<revision>")    # a branch, tag or commit hash
    load("bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_0.gguf")  # one GGUF file of a repo

``huggingface_hub`` does the fetching: a download takes only the files loading reads (config and generation
config, safetensors and their index, tokenizer files, chat template; PyTorch ``.bin`` weights and a
SentencePiece ``tokenizer.model`` only for a repo without safetensors or tokenizer.json). A snapshot already
complete in the Hub cache is used as it is, without asking the Hub (so a model downloaded once loads at once
offline; a branch is not checked for newer commits: name the revision, or update the cache with
``hf download``).
``HF_HUB_CACHE`` / ``HF_HOME`` (the cache), ``HF_ENDPOINT`` (a mirror), ``HF_HUB_OFFLINE`` and ``HF_TOKEN``
(gated repos) are honoured, read when the model is loaded.
A repo that cannot be fetched or found in the cache is a :class:`DataNotFoundError` saying why and how to
get the files here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from efficientml.core.errors import CheckpointError, DataNotFoundError
from efficientml.core.lazy import optional_import

# Hub names: an owner and a repo name of letters, digits, '-', '_' and '.', as the Hub validates them
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?P<file>(?:/[^@/]+)*/[^@/]+\.gguf)?(?:@(?P<rev>[^@\s]+))?$")

# what the loaders read from a folder (load_hf, load_compressed, Tokenizer.from_folder)
FOLDER_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                "efficientml_compression.json"]
NO_WEIGHTS = "weights (*.safetensors or pytorch_model*.bin)"
BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]  # only for a repo without safetensors


@dataclass(frozen=True)
class HubId:
    repo: str
    filename: str | None = None  # a GGUF file inside the repo; None: the repo is a safetensors folder
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"/{self.filename}" if self.filename else "") + \
            (f"@{self.revision}" if self.revision else "")


def parse_hub_id(source: str) -> HubId | None:
    """``owner/name[/path/file.gguf][@revision]`` → its parts; None when ``source`` is not of that form
    (an absolute or ``./`` path, a single name, a path with ``..``)."""
    m = _HUB_ID.match(source)
    if m is None or ".." in source.split("@")[0]:
        return None
    return HubId(m["repo"], m["file"][1:] if m["file"] else None, m["rev"])


def _env_path(name: str) -> str | None:
    return os.environ.get(name) or None


def _cache_dir() -> str | None:
    """The Hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    if _env_path("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if _env_path("HF_HOME") else None


def fetch(hub: HubId) -> Path:
    """The local path of a Hub model: the snapshot folder, or the GGUF file. A snapshot already complete
    in the cache is used without asking the Hub; otherwise what is missing is downloaded."""
    hf = optional_import("huggingface_hub", extra="llm", purpose=f"loading {str(hub)!r} from the Hugging Face Hub")
    kw = dict(revision=hub.revision, cache_dir=_cache_dir(), endpoint=_env_path("HF_ENDPOINT"))
    found = _cached(hf, hub, kw)
    if found is not None:
        return found
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise DataNotFoundError(_failure(hub, None))
    try:
        if hub.filename is not None:
            return Path(hf.hf_hub_download(hub.repo, hub.filename, **kw))
        folder = Path(hf.snapshot_download(hub.repo, allow_patterns=FOLDER_FILES, **kw))
        # an older repo: PyTorch pickles only, a SentencePiece tokenizer.model only
        extra = (BIN_FILES if _missing(folder) == [NO_WEIGHTS] else []) + \
            ([] if (folder / "tokenizer.json").is_file() else ["tokenizer.model"])
        if extra:
            folder = Path(hf.snapshot_download(hub.repo, allow_patterns=FOLDER_FILES + extra, **kw))
    except Exception as e:  # network, auth, missing repo/revision/file: all end in the same advice
        raise DataNotFoundError(_failure(hub, e)) from None
    missing = _missing(folder)
    if missing:  # a repo without safetensors, or (offline) a partial cache
        raise DataNotFoundError(
            f"Hugging Face repo {str(hub)!r} gave no loadable model folder: it lacks {', '.join(missing)} (found: "
            f"{', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'}); for a GGUF repo name the file, "
            f"e.g. {hub.repo}/<file>.gguf")
    return folder


def _cached(hf, hub: HubId, kw: dict) -> Path | None:
    """The cache's copy, or None (huggingface_hub's own offline fallback comes after up to ~20 s of retries)."""
    try:
        if hub.filename is not None:
            return Path(hf.hf_hub_download(hub.repo, hub.filename, local_files_only=True, **kw))
        folder = Path(hf.snapshot_download(hub.repo, allow_patterns=FOLDER_FILES + BIN_FILES,
                                           local_files_only=True, **kw))
    except Exception:  # not cached (LocalEntryNotFoundError and kin)
        return None
    return None if _missing(folder) else folder


def _missing(folder: Path) -> list[str]:
    """What a loadable folder lacks: config.json and the weights (every shard an index names, or a
    single safetensors or pytorch_model*.bin file); empty when complete."""
    from efficientml.llm.io.folder import weight_files

    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    try:
        _, files = weight_files(folder, check=False)
    except CheckpointError:  # no weights at all, or an unreadable index
        return missing + [NO_WEIGHTS]
    return missing + [f.name for f in files if not f.is_file()]


def _failure(hub: HubId, e: Exception | None) -> str:
    kind = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if e is None:
        why = "it is not in the local Hub cache and HF_HUB_OFFLINE is set"
    elif kind == "GatedRepoError":
        why = ("the repo is gated: accept its license on huggingface.co, then log in (`hf auth login`) "
               "or set HF_TOKEN")
    elif kind == "RepositoryNotFoundError":
        why = "no such repo (or it is private: log in or set HF_TOKEN)"
    elif kind == "RevisionNotFoundError":
        why = f"the repo has no revision {hub.revision!r}"
    elif kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        why = f"the repo has no file {hub.filename!r}"
    else:
        why = f"it could not be downloaded and is not in the local Hub cache ({kind}: {first})"
    return (f"model {str(hub)!r} is not a built-in name or an existing file or folder, and as a Hugging Face "
            f"repo id: {why}. Without network access, download it on a connected machine "
            f"(`hf download {hub.repo}`) and copy the Hub cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub), "
            "or pass a local folder or .gguf file")
