"""Writing files so that a crash, a full disk or a second process never leaves a half-written output
(docs/design.md §8).

- :func:`atomic_write`: a file is written to a temporary file in the same folder, flushed to disk and
  renamed into place; :func:`atomic_dir` does the same for a folder (the old folder is renamed aside,
  the new one renamed in, then the old one deleted). Outputs get the user's umask, not mkstemp's 0600.
- Temporary names carry the host and process id, so :func:`remove_stale_temps` can delete the leftovers
  of a killed process (and only those) before the next write of the same output.
- :func:`check_output` checks an output path before any work: its folder is creatable and writable, it
  does not clobber an existing output without ``overwrite``, and there is room for it when its size is known.
- :func:`write_manifest` / :func:`verify_manifest`: the size and sha256 of every file of a folder.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ramba.errors import CheckpointError, OutputPathError

__all__ = [
    "atomic_write",
    "write_text_atomic",
    "atomic_dir",
    "new_temp_dir",
    "commit_dir",
    "remove_stale_temps",
    "check_output",
    "check_free_space",
    "describe_os_error",
    "sha256_file",
    "write_manifest",
    "verify_manifest",
    "pid_alive",
    "WRITE_ERRNOS",
]

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# errno values of a write that failed because of where it wrote, not because of a bug: reported in one line
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_os_error(e: OSError, path: str | os.PathLike) -> str:
    """One line for a failed write: the problem and the fix."""
    fixes = {
        errno.ENOSPC: "no space left on device; free some space or choose another path",
        errno.EDQUOT: "disk quota exceeded; free some space or choose another path",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "permission denied; choose a folder you can write to",
        errno.EROFS: "the file system is read-only; choose another path",
        errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
        errno.EISDIR: "it is a folder; give a file name",
        errno.EEXIST: "it exists, or a part of the path is a file, not a folder; choose another path",
    }
    return f"{path}: {fixes.get(e.errno, e.strerror or str(e))}"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; when the block ends without an error the file written there
    is flushed to disk and renamed to ``path`` (mode 0666 minus the umask). On an error it is deleted and
    ``path`` is untouched; an OSError (e.g. a full disk) becomes an OutputPathError naming the problem."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise OutputPathError(describe_os_error(e, path)) from None
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise OutputPathError(describe_os_error(e, path)) from e
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` with :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def new_temp_dir(final: str | os.PathLike) -> Path:
    """A new empty folder beside ``final`` (mode 0777 minus the umask) to build it in."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def commit_dir(tmp: Path, final: str | os.PathLike) -> Path:
    """Flushes every file of ``tmp`` to disk and renames it to ``final``; an existing ``final`` is renamed aside
    first and deleted only once the new folder is in place."""
    final = Path(final)
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.old-{socket.gethostname()}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder beside ``final``; when the block ends without an error it replaces ``final``
    (:func:`commit_dir`), on an error it is deleted and ``final`` is untouched."""
    tmp = new_temp_dir(final)
    try:
        yield tmp
        commit_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Deletes the temporary files and folders of outputs named ``name`` (a glob) in ``folder`` that processes of
    this host that no longer run left behind (kill -9, power loss); returns them. A live process's are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    for kind in ("tmp", "old"):
        marker = f".{kind}-{host}-"
        for p in folder.glob(f".{name}{marker}*"):
            pid = p.name.rsplit(marker, 1)[1].split("-")[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    if removed:
        logger.warning(
            "removed %d temporary file(s) left by an interrupted run: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def check_free_space(folder: str | os.PathLike, size: int, what: str) -> None:
    """Raises OutputPathError when the file system of ``folder`` has less than ``size`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < size:
        raise OutputPathError(
            f"{what}: needs about {size / 2**20:.1f} MiB but only {free / 2**20:.1f} MiB are free "
            f"on the disk of {folder}; free some space or choose another path"
        )


def check_output(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    folder: bool = False,
    exist_ok: bool = False,
    size: int | None = None,
    what: str = "output",
) -> Path:
    """Checks, before any work, that ``path`` can be written: it does not exist (or ``overwrite``, or, for a
    folder, ``exist_ok``), it is a file (``folder=False``) or folder as expected, the nearest existing folder
    above it is a writable folder, and it has ``size`` bytes free when given. Creates nothing.
    Raises OutputPathError naming the problem and the fix; returns ``path``."""
    path = Path(path)
    if path.exists():
        if path.is_dir() != folder:
            raise OutputPathError(
                f"{what}: {path} is a {'folder' if path.is_dir() else 'file'}; "
                f"give {'a folder' if folder else 'a file name'}"
            )
        if not (overwrite or (folder and exist_ok)):
            raise OutputPathError(f"{what}: {path} exists; pass --overwrite to replace it or choose another path")
    parent = path.parent if not (folder and path.is_dir()) else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(
            f"{what}: {parent} is a file, not a folder, so {path} cannot be created; choose another path"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(path), dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(
            f"{what}: cannot write in {parent} ({describe_os_error(e, parent).split(': ', 1)[1]})"
        ) from None
    if size is not None:
        check_free_space(parent, size, what)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, **fields) -> dict:
    """Writes ``folder/manifest.json``: ``fields`` plus the size and sha256 of every other file under ``folder``."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {**fields, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_manifest(folder: str | os.PathLike, prefix: str = "") -> dict:
    """Checks the files of ``folder`` whose names start with ``prefix`` against ``folder/manifest.json``;
    returns the manifest. Raises CheckpointError naming the missing, truncated or corrupt file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder}: no such folder")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        entries = [(rel, want["size"], want["sha256"]) for rel, want in files.items() if rel.startswith(prefix)]
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {folder}: manifest.json is missing; the checkpoint is incomplete or corrupt, use an older one"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {folder}: manifest.json is corrupt ({e}); use an older checkpoint") from None
    for rel, size, digest in entries:
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {folder}: {rel} is missing; use an older checkpoint")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {folder}: {rel} is {f.stat().st_size} bytes, expected {size} "
                "(truncated or corrupt); use an older checkpoint"
            )
        if sha256_file(f) != digest:
            raise CheckpointError(
                f"checkpoint {folder}: {rel} does not match its checksum (corrupt); use an older checkpoint"
            )
    return manifest
