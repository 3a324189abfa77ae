"""A tiny trained run and the command lines around it, shared by the tests that check what train.py and predict.py
refuse, keep and write (the run itself is a fixture in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    """train.py's command line for one epoch of two iterations."""
    budget = ["--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--no-progress"]
    return [
        "--data",
        str(dataset),
        "--out",
        str(out),
        *budget,
        "--preprocessed",
        str(out.parent / "preprocessed"),
        *extra,
    ]


def predict_args(run: Path, images: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(run), "--input", str(images), "--output", str(output), "--no-progress", *extra]


def exit_status(main, argv, capsys) -> tuple[int, str]:
    """Run a script's main in-process as its command line would run: (exit status, what it printed to stderr).

    Any exception other than SystemExit propagates: a traceback where a one-line error was due fails the test.
    """
    capsys.readouterr()
    try:
        result = main(argv)
        status = result if isinstance(result, int) else 0
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: equal snapshots mean nothing was changed, added or removed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
