"""Known problems versus bugs.

Code that finds something the user can fix (a damaged file, a dataset.json key, a run folder that belongs to another
experiment) raises :class:`Problem`, with a message naming the file, case or value and what to do. The scripts show
it as one line, ``error: ...``, and exit with status 2, as argparse does for a bad flag. Any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

EXIT_STATUS = 2  # argparse's status for a usage error


class Problem(ValueError):
    """A problem with the user's data, files or flags, stated with its fix (a ValueError, as bad input is)."""


def report_problem(problem: Problem) -> int:
    """Print ``error: ...`` to stderr; return the exit status."""
    print(f"error: {problem}", file=sys.stderr)
    return EXIT_STATUS


@contextlib.contextmanager
def exit_on_problem() -> Iterator[None]:
    """Inside: a :class:`Problem` becomes its one-line report and ``SystemExit(2)``, in-process callers included."""
    try:
        yield
    except Problem as problem:
        raise SystemExit(report_problem(problem)) from problem
