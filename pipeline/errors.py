"""Errors that reach the user.

`UserError` is bad input: the CLI prints its message (no traceback) and exits 2. Anything else
that escapes a stage is a bug and exits 1.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: a message that names the field or file, the rule and the bad value."""


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
