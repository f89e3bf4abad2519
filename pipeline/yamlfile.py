"""Reading user YAML files with errors that name the file and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError


def read_yaml(path: Path, what: str = "config file") -> Any:
    """Parse a YAML file; a UserError names the file (and line) when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist (or is not a file).")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{what} '{path}' is not valid YAML{where}: {problem}.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} '{path}' is not UTF-8 text (byte offset {e.start}).") from None
