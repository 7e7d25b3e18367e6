"""Small file and console helpers shared by the driver, the CLI and the reports: atomic
writes (a reader never sees half a file) and aligned text tables. No TensorFlow here."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.
    On failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, value: Any) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def file_lock(path: str | Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block; the
    kernel releases it when the process dies, so a ``kill -9`` never leaves it held.
    With ``blocking=False`` the block gets ``False`` at once when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def format_table(rows: Iterable[Sequence[Any]], header: Sequence[str]) -> list[str]:
    """Rows as left-aligned text columns under ``header`` (two spaces apart)."""
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def print_table(
    rows: Iterable[Sequence[Any]], header: Sequence[str], printer: Callable[[str], Any] = print
) -> None:
    for line in format_table(rows, header):
        printer(line)
