"""What a run records about where it came from."""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path


def version() -> str:
    try:
        return metadata.version("tissuesim")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def git_commit() -> str:
    """Commit of the source tree tissuesim runs from ('+dirty' when it has changes), '' if unknown."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
