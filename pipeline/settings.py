"""The one setting that locates ../shared (models and data), and ${VAR} expansion in catalog paths.

FACECURATE_SHARED wins when set; otherwise `shared` beside the project checkout (../shared).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def shared_root() -> Path:
    value = os.environ.get("FACECURATE_SHARED")
    return Path(value).expanduser().resolve() if value else (PROJECT_ROOT.parent / "shared").resolve()


def expand_vars(text: str) -> str:
    """Expand ${FACECURATE_SHARED} (defaulted as above) and other ${VAR}s; unknown vars are an error."""

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name == "FACECURATE_SHARED":
            return str(shared_root())
        if name not in os.environ:
            raise KeyError(name)
        return os.environ[name]

    return _VAR.sub(sub, text)


def available_cores() -> int:
    """The cores this process may run on (its affinity, which a container or taskset narrows). Here, not
    in `pipeline.threads`: the tests size their workers' threads with it before torch is imported."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
