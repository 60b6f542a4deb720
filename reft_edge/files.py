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
from collections.abc import Iterator
from pathlib import Path

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
    """Yield a temporary folder next to ``final``; on success it replaces ``final`` whole.

    Beside the folder, ``<folder>.pid`` names the writing process, so a later run can tell the
    leftover of a killed writer (SIGKILL runs no cleanup) from a folder still being written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    writer = writer_file(tmp)
    writer.write_text(f"{os.getpid()}\n")
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
    finally:
        writer.unlink(missing_ok=True)


def writer_file(temporary: Path) -> Path:
    """Where atomic_dir records the PID of the process writing ``temporary`` (outside it, so the
    PID never ends up in the finished folder)."""
    return temporary.with_name(temporary.name + ".pid")


def writer_alive(temporary: Path) -> bool | None:
    """Whether the process that writes ``temporary`` still runs; None where no PID was recorded
    (a folder from an older reft-edge) or it cannot be told."""
    try:
        pid = int(writer_file(temporary).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_stale_temporaries(final: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Delete the hidden temporary folders that killed runs of ``atomic_dir(final)`` left behind
    (``.{name}.*.tmp``); returns them. A folder goes when its writer's PID no longer runs, or,
    where no PID was recorded, when nothing in it changed for ``max_age_s`` (a day): a live run
    writes into its folder all the time, so its newest modification is recent and it stays.
    """
    final = Path(final)
    removed = []
    for folder in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        alive = writer_alive(folder)
        if alive is False or (alive is None and time.time() - newest_change(folder) > max_age_s):
            shutil.rmtree(folder, ignore_errors=True)
            writer_file(folder).unlink(missing_ok=True)
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


def check_output_path(out: str | Path, option: str = "--out", *, folder: bool = False) -> None:
    """Raise a UsageError unless ``out`` can be written (a file, or with ``folder`` a folder that
    replaces whatever is there): checked before the work starts, so a long run never ends in an OSError."""
    from reft_edge.errors import UsageError

    path = Path(out)
    if not folder and path.is_dir():
        raise UsageError(f"{option} {out} is a folder; give a file path inside it, e.g. {path / 'name.reft'}")
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{option} {out} is a file; give a folder path")
    parent = path.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{option} {out}: {existing} is a file, not a folder; choose another path")
    if existing != parent and not folder:
        raise UsageError(f"{option} {out}: folder {parent} does not exist; create it or choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {out}: cannot write in {existing} (permission denied); choose another path")
