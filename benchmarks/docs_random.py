"""The paragraph of docs/quality.md on random draws that keep the default's protected layers
(bench_quality.py --random-protect, see make_docs.py and docs_tables.py)."""

from __future__ import annotations

from make_docs import mean, num, pct


def _points(ctx, name: str) -> list:
    """``(result, ratio index)`` of every measured point."""
    return [(res, i) for res in ctx["R"][name]["results"] for i in range(len(res["ratios"]))]


def _won(ctx, name: str) -> tuple:
    points = _points(ctx, name)
    return sum(1 for res, i in points if res["recipes"]["default"][i] < mean(res["random"][i], True)), len(points)


def protected_wins(ctx, name: str = "quality_random_protected") -> str:
    """At how many points the default beats the mean of the protected draws, in words."""
    won, total = _won(ctx, name)
    return f"{won} of {total} points" if won < total else f"every one of the {total} points"


def protected_summary(ctx, name: str = "quality_random_protected", unprotected: str = "quality_default_smollm2") -> str:
    """The protected draws against the unprotected draws of the targets table over the seeds both
    drew (a draw's seed is its index), where both measured the same text and ratio under the same
    calibration (the default's figures checked equal)."""
    other = {(r["evaluated_on"], ratio): (r, i) for r in ctx["R"][unprotected]["results"]
             for i, ratio in enumerate(r["ratios"])}
    parts, gains = [], []
    for res, i in _points(ctx, name):
        key = (res["evaluated_on"], res["ratios"][i])
        if key in other:
            o, j = other[key]
            if abs(o["recipes"]["default"][j] - res["recipes"]["default"][i]) > 1e-5 * o["recipes"]["default"][j]:
                raise ValueError(f"{name}: the default at {key} differs from {unprotected}'s: not the same calibration")
            n = min(len(o["random"][j]), len(res["random"][i]))
            kept, free = mean(res["random"][i][:n], True), mean(o["random"][j][:n], True)
            gains.append(kept <= free * (1 + 1e-5))  # equal where no draw took a head there, to float rounding
            parts.append(f"`{key[0]}` at {pct(key[1])}: {num(kept, 4)} kept whole, {num(free, 4)} not")
    won, total = _won(ctx, name)
    verdict = ("The default's lead over random pruning is not its protection of the first layer." if won == total else
               f"At {total - won} of {total} points random draws with the first layer kept whole are as good as the "
               "default or better.")
    helps = ("keeping the first layer whole helps random draws too, or changes nothing where no draw took a head "
             "there" if all(gains) else f"keeping it whole helped the draws at {sum(gains)} of {len(gains)} points")
    return (f"Over the seeds both drew ({n} per point), against the targets table's draws, which may take heads from "
            f"the first layer (geometric means): {'; '.join(parts)}: {helps}. {verdict}")


TABLES = {f.__name__: f for f in (protected_wins, protected_summary)}
