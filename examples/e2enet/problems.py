"""Known problems versus bugs.

Code that finds something the user can fix (a damaged file, a dataset.json key, a run folder that belongs to another
experiment) raises :class:`Problem`, with a message naming the file, case or value and what to do. The scripts show
it as one line, ``error: ...``, and exit with status 2, as argparse does for a bad flag. So does a file the user
cannot write: a full disk, a read-only folder, a missing permission (:func:`unwritable_as_problem`). Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator
from pathlib import Path

EXIT_STATUS = 2  # argparse's status for a usage error
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
NOT_PERMITTED = (errno.EACCES, errno.EPERM, errno.EROFS)


class Problem(ValueError):
    """A problem with the user's data, files or flags, stated with its fix (a ValueError, as bad input is)."""


def report_problem(problem: Problem) -> int:
    """Print ``error: ...`` to stderr; return the exit status."""
    print(f"error: {problem}", file=sys.stderr)
    return EXIT_STATUS


@contextlib.contextmanager
def unwritable_as_problem() -> Iterator[None]:
    """Inside: an OSError of a full disk or a missing permission becomes a :class:`Problem` naming the file (the
    target of an atomic write, see atomic.py) and the fix; any other OSError stays a bug."""
    try:
        yield
    except OSError as error:
        if error.errno not in FULL_DISK + NOT_PERMITTED:
            raise
        where = error.filename or "a file"
        if error.errno in FULL_DISK:
            message = (
                f"cannot write {where} ({error.strerror}); free space on that disk and run again, or use a folder on "
                "another disk"
            )
        elif error.errno == errno.EROFS:
            message = f"cannot write {where} ({error.strerror}); use a folder on a writable file system"
        else:
            folder = Path(error.filename).parent if error.filename else "its folder"
            message = (
                f"cannot access {where} ({error.strerror}); give this user the permission (for an output, to write "
                f"{folder}), or use another folder"
            )
        raise Problem(message) from error


@contextlib.contextmanager
def exit_on_problem() -> Iterator[None]:
    """Inside: a :class:`Problem`, or a file that cannot be written, becomes its one-line report and
    ``SystemExit(2)``, in-process callers included."""
    try:
        with unwritable_as_problem():
            yield
    except Problem as problem:
        raise SystemExit(report_problem(problem)) from problem
