"""The table and the figure of ``compare.py --suite``: every setting over every task of the suite, over seeds.

:func:`suite_summary` turns compare.py's rows (``summarise``, one per task and setting) into one entry per setting;
:func:`format_suite` prints them as one table, :func:`plot_suite` draws validation pseudo-Dice against training time
averaged over the tasks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from e2enet.training.plots import plot_dice_over_time


def _training_seconds(run: dict) -> float:
    return float(sum(row["seconds"] for row in run["log"]))  # epochs include their validation batches


def _worst_class(runs_by_task: dict[str, list[dict]]) -> dict:
    """The lowest Dice of any class in any run: a class a setting fails on, which a mean over classes hides."""
    scored = [
        (dice, task, name, run["seed"])
        for task, runs in runs_by_task.items()
        for run in runs
        for name, dice in run["dice_per_class"].items()
        if dice is not None  # undefined: the class is in neither the reference nor the prediction
    ]
    dice, task, name, seed = min(scored)
    return {"dice": dice, "task": task, "class": name, "seed": seed}


def suite_summary(rows_by_task: dict[str, list[dict]]) -> list[dict]:
    """One entry per setting: per-task mDice (mean, std over seeds), their mean, its spread, the worst class.

    ``rows_by_task[task]`` are compare.py's rows of one task, one per setting in the same order for every task, each
    with its ``runs`` over the same seeds. The mean over tasks has a spread over seeds: seed ``s`` of every task makes
    one suite result, and the std is over those.
    """
    tasks = list(rows_by_task)
    entries = []
    for i, name in enumerate(r["name"] for r in rows_by_task[tasks[0]]):
        rows = {task: rows_by_task[task][i] for task in tasks}
        if any(row["name"] != name for row in rows.values()):
            raise ValueError(f"the tasks' rows are not in the same setting order (expected {name!r} at {i})")
        runs = {task: row["runs"] for task, row in rows.items()}
        per_seed = np.array([[run["mdice"] for run in task_runs] for task_runs in runs.values()]).mean(0)
        all_runs = [run for task_runs in runs.values() for run in task_runs]
        entries.append(
            {
                "name": name,
                "seeds": rows[tasks[0]]["seeds"],
                "mdice_per_task": {task: row["mdice"] for task, row in rows.items()},
                "mdice_std_per_task": {task: row["mdice_std"] for task, row in rows.items()},
                "mdice_over_tasks": float(per_seed.mean()),
                "mdice_over_tasks_std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0,
                "worst_class": _worst_class(runs),
                "training_seconds_per_run": float(np.mean([_training_seconds(run) for run in all_runs])),
                "runs": all_runs,
            }
        )
    return entries


def spread(mean: float, std: float, seeds: int) -> str:
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f}"  # one seed has no spread to show


def format_suite(entries: list[dict]) -> str:
    """A markdown table: one row per setting, one mDice column per task, then the mean, worst class and time."""
    tasks = list(entries[0]["mdice_per_task"])
    header = f"| model | {' | '.join(tasks)} | mean over tasks | worst class (task, seed) | training s / run |"
    lines = [header, "|" + "---|" * (len(tasks) + 4)]
    for e in entries:
        seeds = len(e["seeds"])
        cells = [spread(e["mdice_per_task"][t], e["mdice_std_per_task"][t], seeds) for t in tasks]
        worst = e["worst_class"]
        mean = spread(e["mdice_over_tasks"], e["mdice_over_tasks_std"], seeds)
        lines.append(
            f"| {e['name']} | {' | '.join(cells)} | **{mean}** | {worst['dice']:.3f} {worst['class']} "
            f"({worst['task']}, {worst['seed']}) | {e['training_seconds_per_run']:.0f} |"
        )
    return "\n".join(lines)


def plot_suite(entries: list[dict], num_tasks: int, path: Path) -> None:
    """Validation pseudo-Dice against training seconds, averaged over every task and seed, one line per setting,
    with the test mDice averaged over the tasks at the end (a star): which setting is ahead at equal time."""
    title = f"Mean over {num_tasks} task(s) x {len(entries[0]['seeds'])} seed(s)"
    plot_dice_over_time(entries, path, final="mdice_over_tasks", title=title)
