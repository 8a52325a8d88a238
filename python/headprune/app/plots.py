"""Pictures for the reports: the entropy heatmap and the sweep plot (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import torch

from .sweep import random_mean


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(scores, path: Path, *, pruned: dict | None = None, title: str = "", score: str = "entropy") -> Path:
    """Layers x heads, colour = mean attention entropy (nats); pruned heads crossed out."""
    plt = _plt()
    values = scores.score(score).float().numpy() if score != "entropy" else scores.entropy.float().numpy()
    L, H = values.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * H + 2.5), max(3.0, 0.28 * L + 1.5)))
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    unit = "nats" if score in ("entropy", "rest") else ("fraction" if score == "sink" else "")
    fig.colorbar(im, ax=ax, label=f"mean attention {score}" + (f" ({unit})" if unit else ""))
    for layer, heads in (pruned or {}).items():
        for h in heads:
            ax.scatter([h], [int(layer)], marker="x", c="red", s=40, linewidths=1.5)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    step = max(1, L // 16)
    ax.set_yticks(range(0, L, step))
    ax.set_yticklabels([scores.names[i] for i in range(0, L, step)], fontsize=7)
    n = sum(len(v) for v in (pruned or {}).values())
    ax.set_title((title + "\n" if title else "") + (f"red x: {n} pruned heads" if pruned else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sweep_plot(result: dict, path: Path) -> Path:
    """Quality against the fraction of heads pruned: one line per recipe, random as a band."""
    plt = _plt()
    ratios = result["ratios"]
    metric = result["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rnd = torch.tensor(result["random"])  # [ratios, seeds]
    lo, hi = rnd.min(1).values, rnd.max(1).values
    ax.fill_between(ratios, lo, hi, color="grey", alpha=0.3, label=f"random ({rnd.shape[1]} seeds, min-max)")
    ax.plot(ratios, [random_mean(row, result.get("lower_is_better", False)) for row in result["random"]],
            color="grey", ls="--", lw=1)
    for name, values in result["recipes"].items():
        ax.plot(ratios, values, marker="o", label=name)
    ax.axhline(result["baseline"], color="black", lw=0.8, ls=":", label="unpruned")
    if result.get("lower_is_better"):
        ax.set_yscale("log")
    ax.set_xlabel("fraction of heads pruned")
    ax.set_ylabel(metric + (" (lower is better)" if result.get("lower_is_better") else " (higher is better)"))
    ax.set_title(f"{result['model']}: {metric} on held-out text ({result['data']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
