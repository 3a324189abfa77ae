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
    one dataset) never rename each other's half-written file: the last complete write wins. An OSError of the
    write (a full disk, a read-only folder) names ``path``, which is what the user can act on.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        f = open(tmp, "xb")  # "x": never someone else's file; the mode is open()'s usual one (umask)
    except OSError as error:  # a read-only folder, a missing permission
        raise error_about(error, path) from error
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno is None or error.filename not in (None, str(tmp)):
            raise
        raise error_about(error, path) from error  # a full disk: write() names no file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def error_about(error: OSError, path: Path | str) -> OSError:
    """The same error, about ``path``: the file being written, not a temporary name or none (a failed write())."""
    return type(error)(error.errno, error.strerror, str(path))


def write_json(path: Path | str, obj: object, indent: int = 2) -> None:
    """``obj`` as indented JSON with a final newline, written atomically."""
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=indent) + "\n").encode())
