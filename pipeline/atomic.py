"""Atomic artifacts: every file or directory is written to a temporary sibling and renamed
into place, so a crash or `kill -9` leaves the old artifact or the new one, never half of one.

No dependency beyond the standard library, so library code (embedding, the training loop) can
use it anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Every temporary name starts with this prefix and names its writer (`<pid>@<host>.`), so the
# clean-up at a command's start removes only what a dead Nucleus process of this machine left,
# never a user's file and never the temporary of a process still writing (a worker, say).
TMP_PREFIX = ".nucleus-tmp-"
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TMP_NAME = re.compile(rf"^{re.escape(TMP_PREFIX)}(\d+)@([A-Za-z0-9-]+)\.")


def tmp_name(name: str) -> str:
    """The temporary name of this process for an artifact called `name`."""
    return f"{TMP_PREFIX}{os.getpid()}@{HOST}.{name}"


def is_stale_temporary(name: str) -> bool:
    """True for a temporary left by a Nucleus process of this machine that no longer runs."""
    m = _TMP_NAME.match(name)
    if m is None or m.group(2) != HOST:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def tmp_target(name: str) -> str | None:
    """The artifact name a temporary was written for (`old-<name>`: a copy moved aside)."""
    m = _TMP_NAME.match(name)
    return name[m.end():] if m else None


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(tmp_name(path.name))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write a file or directory; renamed to `path` on success.

    A directory that already exists at `path` is replaced: the old one is moved aside first and
    removed after the rename, so a crash in between leaves a complete copy of one of them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    remove_path(tmp)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    if path.is_dir() and not path.is_symlink():
        old = path.with_name(tmp_name(f"old-{path.name}"))
        os.replace(path, old)
        os.replace(tmp, path)
        remove_path(old)
    else:
        os.replace(tmp, path)


def restore_aside(path: Path) -> bool:
    """Put back a directory `atomic_path` moved aside when its writer was killed between the
    two renames (the old copy is complete, the new one was already in place or is lost).
    True when `path` was restored."""
    if path.exists() or not path.parent.is_dir():
        return False
    for old in path.parent.glob(f"{TMP_PREFIX}*.old-{path.name}"):
        if is_stale_temporary(old.name):
            os.replace(old, path)
            return True
    return False


def remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def read_json(path: Path) -> Any:
    """A JSON artifact; a damaged one (cut short, overwritten) is bad input naming the file."""
    from pipeline.errors import DamagedFile

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(path, f"not valid JSON ({e})") from None
