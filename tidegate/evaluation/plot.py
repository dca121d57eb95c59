"""curve.png: routed accuracy against the fraction escalated, one line per estimator."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_curves(metrics: Mapping[str, Any], path: Path, title: str | None = None) -> None:
    """Draw ``metrics["routing"]`` with edge-only, cloud-only and the oracle marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.6, 4.4), dpi=90)
    for name, points in metrics["routing"].items():
        auc = metrics["estimators"].get(name, {}).get("auroc")
        label = f"{name} (AUROC {auc:.2f})" if auc is not None else name
        ax.plot(
            [100 * p["escalated"] for p in points],
            [100 * p["accuracy"] for p in points],
            label=label,
            linewidth=1.4,
            drawstyle="steps-post" if len(points) < 12 else "default",
        )
    edge, cloud = metrics["edge_accuracy"], metrics["cloud_accuracy"]
    ax.scatter([0], [100 * edge], marker="s", color="black", zorder=5, label="edge only")
    ax.scatter([100], [100 * cloud], marker="D", color="black", zorder=5, label="cloud only")
    if "oracle" in metrics:
        o = metrics["oracle"]
        ax.scatter(
            [100 * o["escalated"]],
            [100 * o["accuracy"]],
            marker="*",
            s=120,
            color="gold",
            edgecolors="black",
            zorder=5,
            label="oracle",
        )
    if "targets" in metrics:
        t = metrics["targets"]
        ax.axhline(
            100 * t["accuracy"], color="grey", linestyle=":", linewidth=1,
            label=f"target: {100 * t['fraction_of_cloud']:.0f}% of cloud-only accuracy",
        )  # fmt: skip
        ax.axvline(
            100 * t["escalation_budget"], color="grey", linestyle="--", linewidth=1,
            label=f"target: ≤ {100 * t['escalation_budget']:.0f}% escalated",
        )  # fmt: skip
    run = metrics["run"]
    split = f", split {run['split']}" if run.get("split") else ""
    ax.set_title(
        title
        or f"edge {run.get('edge_model')} → cloud {run.get('cloud_model')} "
        f"({metrics['items']} items{split})",
        fontsize=8,
    )
    ax.set_xlabel("queries escalated to the cloud (%)")
    ax.set_ylabel("accuracy of routed answers (%)")
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
