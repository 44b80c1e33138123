"""Reading the small JSON files of a run directory, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpfed.errors import DataError


def read_json_object(path: Path, *, what: str = "", required: bool = True) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``DataError`` naming the file (and ``what`` it is) otherwise."""
    what = f"{what} " if what else ""
    if not path.is_file():
        if required:
            raise DataError(f"{path}: {what}not found")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: {what}not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: {what}must hold a JSON object, got {type(data).__name__}")
    return data
