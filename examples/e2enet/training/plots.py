"""Figures and statistics of a training run: progress (losses, pseudo-Dice, learning rate) and fusion connections.

Written by train.py into ``RUN_DIR/fold_F``: ``progress.png`` every epoch, ``fusion_connections.png`` (and the
shares behind it) at the end of a sparse run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from e2enet.atomic import atomic_write


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` atomically: a full disk mid-write leaves the previous figure, never a truncated one."""
    with atomic_write(path) as f:
        fig.savefig(f, dpi=90, format=Path(path).suffix.lstrip(".") or "png")


def fusion_connection_proportions(model, sparsity) -> dict[str, dict[str, float]]:
    """Share of active kernels of each node's first fusion conv fed by the forward, up and down inputs.

    The first conv of node x(i, j) reads concat[forward (c_i), up (c_i), down (c_{i-1}, levels i >= 1)].
    """
    proportions = {}
    if sparsity is None:
        return proportions
    targets = set(sparsity.target_names)
    for key, node in model.fusion.items():
        name = f"fusion.{key}.convs.0.conv.weight"
        if name not in targets:
            continue
        # Active (c_out, c_in) kernels per input channel, whatever the granularity of the mask.
        per_input = sparsity.weight_mask(name).flatten(2)[:, :, 0].sum(0)
        c = node.up.out_channels
        flows = {"forward": per_input[:c].sum(), "up": per_input[c : 2 * c].sum(), "down": per_input[2 * c :].sum()}
        total = float(per_input.sum())
        proportions[key] = {flow: float(v) / total for flow, v in flows.items()}
    return proportions


def plot_progress(rows: list[dict], update_epochs: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=[2, 1])
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train loss", color="tab:blue")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="val loss", color="tab:red")
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    ax_dice.plot(epochs, [r["pseudo_dice"] for r in rows], label="pseudo Dice", color="tab:green", ls="--")
    ax_dice.set_ylabel("pseudo Dice")
    ax_dice.set_ylim(0, 1)
    for e in update_epochs:
        ax_loss.axvline(e, color="grey", alpha=0.15, lw=1)
    handles = ax_loss.get_legend_handles_labels()[0] + ax_dice.get_legend_handles_labels()[0]
    ax_loss.legend(handles, [h.get_label() for h in handles], loc="upper right")
    ax_loss.set_title("E2ENet training (grey lines: epochs with a topology update)")
    ax_lr.plot(epochs, [r["lr"] for r in rows], color="black", label="learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    updated = [r for r in rows if r.get("exploration", "") != ""]
    if updated:  # a dynamic sparse run: how the topology explores, and whether regrown kernels live
        ax_topology = ax_lr.twinx()
        ax_topology.plot(
            [r["epoch"] for r in updated],
            [r["exploration"] for r in updated],
            color="tab:purple",
            label="kernels ever active",
        )
        survived = [r for r in updated if r.get("regrown_survival", "") != ""]
        ax_topology.plot(
            [r["epoch"] for r in survived],
            [r["regrown_survival"] for r in survived],
            color="tab:orange",
            ls=":",
            marker=".",
            label="regrown kept at next update",
        )
        ax_topology.set_ylim(0, 1.05)
        ax_topology.set_ylabel("share")
        handles = ax_lr.get_legend_handles_labels()[0] + ax_topology.get_legend_handles_labels()[0]
        ax_lr.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_fusion_connections(proportions: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = sorted(proportions, key=lambda k: (int(k.split("_")[1]), int(k.split("_")[0])))
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(nodes) + 2), 4))
    bottom = np.zeros(len(nodes))
    for flow, color in (("up", "tab:orange"), ("forward", "tab:blue"), ("down", "tab:green")):
        values = np.array([proportions[n][flow] for n in nodes])
        ax.bar(nodes, values, bottom=bottom, label=flow, color=color)
        bottom += values
    ax.set_xlabel("fusion node x(level, stage)")
    ax.set_ylabel("share of active kernels")
    ax.set_title("Active fusion kernels by input flow (first conv of each node)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_learning_curves(rows: list[dict], path: Path) -> None:
    """compare.py's figure: mean (and the band of one std) over seeds of the training loss and the validation
    pseudo-Dice per epoch, one line per setting. ``rows[i]["runs"][k]["log"]`` are train.py's log rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        logs = [run["log"] for run in row["runs"]]
        epochs = min(len(log) for log in logs)
        per_epoch = row["iterations"] / len(logs[0])
        x = (np.arange(epochs) + 1) * per_epoch
        for ax, key in ((ax_loss, "train_loss"), (ax_dice, "pseudo_dice")):
            values = np.array([[log[e][key] for e in range(epochs)] for log in logs])
            mean, std = values.mean(0), values.std(0)
            (line,) = ax.plot(x, mean, label=row["name"])
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    ax_loss.set_ylabel("training loss (Dice + CE)")
    ax_dice.set_ylabel("validation pseudo-Dice (mean over classes)")
    for ax in (ax_loss, ax_dice):
        ax.set_xlabel("iteration")
    seeds = len(rows[0]["runs"])
    ax_dice.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Learning curves, mean over {seeds} seed(s), band: one std")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_dice_over_time(rows: list[dict], path: Path, *, final: str = "mdice", title: str | None = None) -> None:
    """Validation pseudo-Dice against training seconds (epochs include their validation), mean over each row's runs,
    one line per row, with the held-out test mDice (``row[final]``) as a star at the end: accuracy at equal
    wall-clock time, not only at equal iterations. ``rows[i]["runs"][k]["log"]`` are train.py's log rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        logs = [run["log"] for run in row["runs"]]
        epochs = min(len(log) for log in logs)
        seconds = np.array([np.cumsum([log[e]["seconds"] for e in range(epochs)]) for log in logs]).mean(0)
        dice = np.array([[log[e]["pseudo_dice"] for e in range(epochs)] for log in logs]).mean(0)
        (line,) = ax.plot(seconds, dice, label=row["name"])
        ax.plot(seconds[-1], row[final], marker="*", markersize=12, color=line.get_color())
    ax.set_xlabel("training time per run (s)")
    ax.set_ylabel("validation pseudo-Dice; star: test mDice")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"Accuracy against training time, mean over {len(rows[0]['runs'])} seed(s)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
