"""Pictures for the reports: the entropy heatmap and the sweep plot (matplotlib, Agg)."""

from __future__ import annotations

import functools
import logging
import textwrap
from contextlib import contextmanager
from pathlib import Path

import torch

from .sweep_table import random_mean


class MissingExtra(ModuleNotFoundError):
    """An optional dependency a command needs (the command line says it in one line)."""


def check_available(command: str) -> None:
    """:class:`MissingExtra` naming the extra to install where matplotlib cannot be imported:
    the command's picture is drawn last, after all its work."""
    try:  # the backend too: its native start-up, where an interrupt reads as another error, before the work
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError as e:
        picture = "sweep.png" if command == "sweep" else "heatmap.png"
        raise MissingExtra(f"{command} draws {picture} with matplotlib, which cannot be imported here "
                                  f"({e}); pip install 'headprune[plot]' (or matplotlib)") from None


def _figure(**kwargs):
    """A matplotlib figure of its own, outside pyplot: the caller's backend, open figures and
    style are left alone (a report drawn in a notebook does not switch it to Agg)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


@contextmanager
def _quiet_fonts():
    """matplotlib's notices of a missing font (it falls back, no fault) kept out of the output
    while a picture is drawn (fonts are looked up when the layout is computed, before saving);
    the logger's level is as it was afterwards."""
    log = logging.getLogger("matplotlib.font_manager")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(level)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)  # a png through Agg, this figure only
    return path


def _quietly(draw):
    """``draw`` (a picture's function) inside :func:`_quiet_fonts`."""
    @functools.wraps(draw)
    def wrapped(*args, **kwargs):
        with _quiet_fonts():
            return draw(*args, **kwargs)
    return wrapped


@_quietly
def heatmap(scores, path: Path, *, pruned: dict | None = None, title: str = "", score: str = "entropy",
            selection=None, selection_label: str = "", protected=()) -> Path:
    """Sites x heads, colour = mean attention entropy (nats), or another ``score``; pruned heads
    crossed out and ``protected`` sites (kept whole by the recipe) marked. With ``selection``
    (a ``[sites, heads]`` tensor: the values that chose the heads, lower = pruned first) a
    second panel shows it, so the picture says both what the heads do and why they went."""
    values = scores.score(score).float().numpy() if score != "entropy" else scores.entropy.float().numpy()
    L, H = values.shape
    panels = [(values, f"mean attention {score}", _unit(score).strip(" ()"))]  # (values, title, colour-bar label)
    if selection is not None:  # the long description is the panel's title: as a colour-bar label it ran off the image
        order = "lower: ranked first" if "for reference" in (selection_label or "") else "lower: pruned first"
        panels.append((selection.float().numpy(), selection_label or "selection score", order))
    width = max(4.0, 0.45 * H + 2.5)
    fig = _figure(figsize=(len(panels) * width, max(3.0, 0.28 * L + 2.2)))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (v, name, label) in zip(axes[0], panels):
        im = ax.imshow(v, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, label=label)
        if len(panels) > 1 or name not in title:  # a lone panel whose title the figure's repeats has none
            ax.set_title(textwrap.fill(name, int(width * 9)), fontsize=8)
        _mark(ax, {i: scores.positions(i, hs) for i, hs in (pruned or {}).items()}, protected, H)  # columns: positions
        _axes(ax, scores, L, H)
    n = sum(len(v) for v in (pruned or {}).values())
    notes = [f"red x: {n} pruned heads" if pruned else "", "white box: kept whole" if protected else ""]
    fig.suptitle((title + "\n" if title else "") + "; ".join(t for t in notes if t), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _unit(score: str) -> str:
    return " (nats)" if score in ("entropy", "rest") else (" (fraction)" if score == "sink" else "")


def _mark(ax, pruned, protected, heads: int) -> None:
    from matplotlib.patches import Rectangle

    for layer, hs in (pruned or {}).items():
        ax.scatter(list(hs), [int(layer)] * len(hs), marker="x", c="red", s=40, linewidths=1.5)
    for layer in protected:
        ax.add_patch(Rectangle((-0.5, layer - 0.5), heads, 1, fill=False, edgecolor="white", linewidth=1.5))


def _axes(ax, scores, sites: int, heads: int) -> None:
    ax.set_xlabel("query head (position among the heads kept)" if scores.head_ids is not None else "query head")
    ax.set_ylabel("layer (attention site)")
    ax.set_xticks(range(heads))
    step = max(1, sites // 16)
    ax.set_yticks(range(0, sites, step))
    ax.set_yticklabels([scores.names[i] for i in range(0, sites, step)], fontsize=7)


@_quietly
def sweep_plot(result: dict, path: Path) -> Path:
    """Quality against the fraction of heads pruned: one line per recipe, random as a band."""
    from matplotlib import colormaps

    order = sorted(range(len(result["ratios"])), key=result["ratios"].__getitem__)  # lines left to right
    pick = lambda rows: [rows[i] for i in order] if rows else rows  # noqa: E731
    total, heads, drawn = result.get("heads_total"), result.get("heads", {}), result.get("random_heads") or []

    def removed(rows):  # each point where its heads put it: a layout can round to another number of heads
        return [sum(rows[i]) / len(rows[i]) / total for i in order]

    xs = {k: removed([[sum(map(len, h.values()))] for h in heads[k]]) for k in result["recipes"]
          if total and len(heads.get(k) or ()) == len(order)}
    result = {**result, "ratios": pick(result["ratios"]), "random": pick(result["random"]),
              "recipes": {k: pick(v) for k, v in result["recipes"].items()}}
    ratios = result["ratios"]
    at = removed(drawn) if total and len(drawn) == len(order) and all(drawn) else ratios
    metric = result["metric"]
    fig = _figure(figsize=(10.0, 4.2))
    ax = fig.subplots()
    rnd = torch.tensor(result["random"])  # [ratios, seeds]
    if rnd.numel():  # a sweep of no random draws (seeds=0) has no band
        lo, hi = rnd.min(1).values, rnd.max(1).values
        seeds = f"{rnd.shape[1]} seed{'s' * (rnd.shape[1] != 1)}"
        ax.fill_between(at, lo, hi, color="grey", alpha=0.3, label=f"random ({seeds}, min-max)")
        ax.plot(at, [random_mean(row, result.get("lower_is_better", False)) for row in result["random"]],
                color="grey", ls="--", lw=1)
    default = result.get("default_recipe")
    colours, markers = colormaps["tab20"], "osD^vPX<>*"  # a colour and marker each: the default cycle has 10
    for i, (name, values) in enumerate(result["recipes"].items()):
        main = name == default
        ax.plot(xs.get(name, ratios), values, marker=markers[i % len(markers)], color=colours(i % 20), lw=2.5 if main else 1.2,
                zorder=3 if main else 2,
                label=(name if name.endswith("default") else f"{name} (the default)") if main else name)
    ax.axhline(result["baseline"], color="black", lw=0.8, ls=":", label="unpruned")
    if result.get("lower_is_better"):
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 31.2, not 3.12x10^1
            axis(FuncFormatter(lambda v, _: f"{v:.4g}"))
    ax.set_xlabel("fraction of heads pruned" + (" (the heads each point removed)" if xs else ""))
    ax.set_ylabel(metric + (" (lower is better)" if result.get("lower_is_better") else " (higher is better)"))
    ax.set_title(f"{result['model']}: {metric} on held-out text ({result['data']})", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.66, 0.5), fontsize=7,
               frameon=False)  # outside the data
    fig.tight_layout(rect=(0, 0, 0.65, 1))
    return _save(fig, path)
