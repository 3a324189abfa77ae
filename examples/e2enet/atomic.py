"""Atomic file writes: a reader, or a run resumed after a crash, finds the old file or the new one, never half of one.

with atomic_write(path) as f:  # a binary file object
    torch.save(state, f)
write_json(path, obj)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: Path | str) -> Iterator[BinaryIO]:
    """Write to a temporary file in the same folder, flush and fsync it, then rename it over ``path``.

    The rename is atomic only within one file system, hence the temporary file beside the target; the fsync
    makes sure the renamed file holds its data even after a power loss. On an error the target is untouched.
    Each writer gets its own temporary name, so processes writing the same file at once (two folds preprocessing
    one dataset) never rename each other's half-written file: the last complete write wins.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    f = open(tmp, "xb")  # "x": never someone else's file; the mode is open()'s usual one (umask)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path | str, obj: object, indent: int = 2) -> None:
    """``obj`` as indented JSON with a final newline, written atomically."""
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=indent) + "\n").encode())
