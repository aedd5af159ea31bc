"""Output locations: checked before any work, temporary siblings named so that a later run can tell
a dead writer's leftovers from a live one's, and folders replaced only when they hold our output.

Temporary names are ``.NAME.PID.XXXXXXXX.tmp`` (``.HASH.PID.XXXXXXXX.tmp`` when NAME is too long for
that to fit the file system's 255-byte limit): a leftover whose process is gone (a SIGKILL, a power
cut) is deleted by the next write to the same target; an old folder moved aside during a replace
(``….old.tmp``) is put back if the new one never arrived.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from efficientml.core.errors import ConfigError, OutputError

NAME_MAX = 255
_RANDOM = 8 + len(".tmp")  # mkstemp's random part and our suffix
# files our folder writers produce (llm convert/quantize/prune, save_hf, save_compressed)
OUR_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "efficientml_compression.json", "recipe.json", "README.md",
             "adapter_config.json", "adapter_model.safetensors", "training_log.json")


def tmp_prefix(path: Path) -> str:
    """``.NAME.PID.`` or, when that would not fit in a file name, ``.HASH16.PID.``."""
    pid = os.getpid()
    prefix = f".{path.name}.{pid}."
    if len(prefix.encode()) + _RANDOM + len(".old") > NAME_MAX:
        prefix = f".{_short(path.name)}.{pid}."
    return prefix


def _short(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


_TMP = re.compile(r"^\.(?P<stem>.+)\.(?P<pid>\d+)\.(?P<rand>[^.]+)(?P<old>\.old)?\.tmp$")
_LEGACY = re.compile(r"^\.(?P<stem>.+)\.(?:(?P<rand>[a-z0-9_]{8})\.tmp|(?P<old>old))$")
LEGACY_AGE_S = 3600.0


def _age(p: Path) -> float:
    import time

    try:
        return time.time() - p.lstat().st_mtime
    except OSError:
        return 0.0


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings of ``path`` left by writers that are no longer running; restore
    an old folder moved aside by a replace that was killed before the new one took its place."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    stems = {path.name, _short(path.name)}
    done = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for e in entries:
        m = _TMP.match(e.name)
        if m and m["stem"] in stems:
            dead, old = not _pid_alive(int(m["pid"])), bool(m["old"])
        else:  # names of writers before the pid was in them: dead if untouched for an hour
            legacy = _LEGACY.match(e.name)
            if not legacy or legacy["stem"] != path.name:
                continue
            dead, old = _age(e) > LEGACY_AGE_S, legacy["old"] is not None
        if not dead:
            continue
        try:
            if old and not path.exists() and not path.is_symlink():
                os.replace(e, path)  # the replace died between its two renames: the old output stays
            elif e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()
            done.append(e)
        except OSError:
            pass
    return done


def normalize(path: str | os.PathLike) -> Path:
    """``mydir/.`` → ``mydir``, ``.`` → the current folder's absolute path (so it has a name)."""
    text = os.fspath(path)
    if not text:
        raise ConfigError("the output path is empty; give a file or folder name")
    p = Path(text)
    if p.name in ("", ".", ".."):
        p = Path(os.path.abspath(text))
    return p


def check_output(path: str | os.PathLike, overwrite: bool = False, folder: bool = False,
                 flag: str = "--out") -> Path:
    """Raise a one-sentence error now, before any work, if ``path`` cannot be written: it exists and
    ``overwrite`` is off (or it is a folder of files we did not write), it is a file where a folder is
    expected or the reverse, its name is too long, it lies under a file, or its folder is not
    writable. Returns the normalized path."""
    try:
        return _check_output(path, overwrite, folder, flag)
    except OSError as e:  # a stat refused on the way (permission denied on a parent, a loop, …)
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{flag}: cannot write {str(path)!r} ({why(e)})") from None


def _check_output(path: str | os.PathLike, overwrite: bool, folder: bool, flag: str) -> Path:
    p = normalize(path)
    what = "folder" if folder else "file"
    if len(p.name.encode()) > NAME_MAX:
        raise ConfigError(f"{flag} name is {len(p.name.encode())} bytes long; file names are limited to "
                          f"{NAME_MAX} bytes")
    if p.exists() or p.is_symlink():
        if p.is_dir() != folder:
            kind = "a folder" if p.is_dir() else "not a folder"
            raise ConfigError(f"{flag} {str(path)!r} is {kind}; expected a {what} path")
        if not overwrite:
            raise ConfigError(f"{flag} {str(path)!r} already exists; choose a new path or add --overwrite "
                              "to replace it")
        if folder:
            check_replaceable(p, flag)
    _check_parent(p, flag)
    return p


def check_replaceable(p: Path, flag: str = "--out") -> None:
    """A folder may be replaced only if it is not the current folder (or above it) and every entry
    in it is a file our writers produce."""
    here = Path.cwd().resolve()
    target = p.resolve()
    if target == here or target in here.parents:
        raise ConfigError(f"{flag} {str(p)!r} is the current folder or contains it; give the name of a "
                          "new folder (it is never replaced)")
    foreign = [e.name for e in sorted(p.iterdir()) if not _ours(e)]
    if foreign:
        raise ConfigError(f"{flag} {str(p)!r} holds files efficientml did not write (e.g. {foreign[0]!r}); "
                          "it is never replaced, give a new folder name")


def _ours(e: Path) -> bool:
    if _TMP.match(e.name):
        return True
    return e.is_file() and any(fnmatch.fnmatchcase(e.name, pat) for pat in OUR_FILES)


def _check_parent(p: Path, flag: str) -> None:
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        if anc.is_symlink():
            raise ConfigError(f"{flag} {str(p)!r} lies under {str(anc)!r}, a broken link")
        anc = anc.parent
    if not anc.is_dir():
        raise ConfigError(f"{flag} {str(p)!r} lies under {str(anc)!r}, which is a file, not a folder")
    probe(anc, flag)


def probe(folder: Path, flag: str = "--out") -> None:
    """Create and delete a file in ``folder``: the only test of writability that holds for read-only
    mounts, ACLs and root alike."""
    try:
        fd, name = tempfile.mkstemp(prefix=".efficientml-probe.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"{flag}: cannot write into folder {str(folder)!r} ({why(e)})") from None


def why(e: OSError) -> str:
    names = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.ENAMETOOLONG: "file name too long", errno.EDQUOT: "disk quota exceeded"}
    return names.get(e.errno, e.strerror or str(e))
