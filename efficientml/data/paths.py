"""Where data files come from, in order:

1. an explicit path given by the caller;
2. the ``EFFICIENTML_DATA`` environment variable (a folder laid out like ``../shared/data``);
3. ``../shared/data`` beside the checkout (and ``./shared/data`` inside it);
4. system locations (Debian's ``dataset-fashion-mnist`` puts files in /usr/share/datasets/…);
5. a download from the public canonical URL into the cache (``EFFICIENTML_CACHE`` or
   ``~/.cache/efficientml``), checked by sha256 and written atomically.

Offline, step 5 fails with a message naming ``EFFICIENTML_DATA`` and the file expected.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from efficientml.core.errors import DataNotFoundError
from efficientml.core.paths import cache_dir  # noqa: F401  (re-exported: data.paths.cache_dir)
from efficientml.core.serialization import atomic_path

REPO_ROOT = Path(__file__).resolve().parents[2]
SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}


def data_roots() -> list[Path]:
    roots = []
    env = os.environ.get("EFFICIENTML_DATA")
    if env:
        roots.append(Path(env))
    roots += [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]
    return roots


def models_roots() -> list[Path]:
    """Folders searched for pretrained weights (``EFFICIENTML_MODELS``, then ../shared/models)."""
    roots = []
    env = os.environ.get("EFFICIENTML_MODELS")
    if env:
        roots.append(Path(env))
    roots += [REPO_ROOT.parent / "shared" / "models", REPO_ROOT / "shared" / "models"]
    return roots


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(relpath: str, explicit: str | os.PathLike | None = None, url: str | None = None,
            sha256: str | None = None, system_key: str | None = None,
            roots: list[Path] | None = None) -> Path:
    """Find ``relpath`` (e.g. ``"fashion-mnist/train-images-idx3-ubyte.gz"``) or download it."""
    if explicit is not None:
        p = Path(explicit)
        if p.is_dir():
            p = p / Path(relpath).name
        if not p.is_file():
            raise DataNotFoundError(f"data file {str(p)!r} does not exist")
        return p
    for root in roots if roots is not None else data_roots():
        p = root / relpath
        if p.is_file():
            return p
    for d in SYSTEM_DIRS.get(system_key or "", []):
        p = d / Path(relpath).name
        if p.is_file():
            return p
    cached = cache_dir() / relpath
    if cached.is_file() and (sha256 is None or sha256_file(cached) == sha256):
        return cached
    if url is None:
        raise DataNotFoundError(
            f"cannot find {relpath!r}: set EFFICIENTML_DATA to a folder that contains it "
            f"(searched {', '.join(str(r) for r in data_roots())})")
    return download(url, cached, sha256, relpath)


def download(url: str, dest: Path, sha256: str | None, relpath: str) -> Path:
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            if sha256 is not None and (got := sha256_file(tmp)) != sha256:
                raise DataNotFoundError(
                    f"download of {url} has sha256 {got[:12]}…, expected {sha256[:12]}…; not saved")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise DataNotFoundError(
            f"cannot find {relpath!r} locally and could not download it from {url} ({e}); "
            f"set EFFICIENTML_DATA to a folder containing {relpath!r}") from None
    return dest
