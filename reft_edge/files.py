"""Small file helpers shared by all stages: the cache folder and atomic writes.

Every output (patch, bundle, converted model, checkpoint) is written under a
temporary name in the destination folder and renamed into place, so a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from reft_edge.constants import CACHE_ENV


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_dir() -> Path:
    """The folder for converted models and cached bundles ($REFT_EDGE_CACHE or ~/.cache/reft-edge)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "reft-edge"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it to ``final`` on success, delete it on error."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(final: Path, data: bytes) -> None:
    with atomic_file(final) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success it replaces ``final`` whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(final: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Delete the hidden temporary folders that killed runs of ``atomic_dir(final)`` left behind
    (``.{name}.*.tmp``) when nothing in them changed for ``max_age_s`` (a day); returns them.

    A live run writes into its folder all the time, so its newest modification is recent
    and it is left alone.
    """
    final = Path(final)
    removed = []
    for folder in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        if folder.is_dir() and not folder.is_symlink() and time.time() - newest_change(folder) > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def newest_change(folder: Path) -> float:
    """The latest modification time of ``folder`` or anything in it (0 for what vanished meanwhile)."""
    times = [folder.stat().st_mtime]
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                times.append(os.lstat(os.path.join(root, name)).st_mtime)
    return max(times)
