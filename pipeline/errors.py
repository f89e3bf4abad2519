"""Errors that reach the user.

`UserError` is bad input: the CLI prints its message (no traceback) and exits 2. Anything else
that escapes a stage is a bug and exits 1.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator
from pathlib import Path


class UserError(Exception):
    """Bad input: a message that names the field or file, the rule and the bad value."""


class DamagedFile(UserError):
    """An artifact that exists but cannot be read (cut short, overwritten, not what it should
    be). The CLI adds the command that rebuilds it (`pipeline.workspace.rebuild_hint`)."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"'{self.path}' is damaged: {problem}.")


@contextlib.contextmanager
def reading(path: Path | str, what: str) -> Iterator[None]:
    """Turn any failure to parse the artifact at `path` into a DamagedFile naming it.

    For readers (FAISS, Arrow, SQLite, safetensors, numpy) that raise their own exception types
    without the file's name. A missing file is left to the caller: that is a stage not run yet,
    not damage."""
    try:
        yield
    except (UserError, KeyboardInterrupt, MemoryError, FileNotFoundError):
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DamagedFile(path, f"not a readable {what} ({type(e).__name__}{': ' + first if first else ''})") from None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_choice(what: str, name: str, choices: Iterable[str]) -> UserError:
    """The error for a name that is not in a registry."""
    choices = sorted(choices)
    return UserError(
        f"unknown {what} '{name}'.{did_you_mean(name, choices)} Choose one of: {', '.join(choices)}."
    )


class JobFailed(Exception):
    """A job failed on every attempt (or was rejected): the message names each job, its attempts
    and the worker's error. Exit 1 without a traceback: the traceback is the worker's."""
