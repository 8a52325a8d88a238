"""What ``headprune prune``'s heatmap and report say chose the heads: the values of the
selection panel, their label, and the layers the recipe kept whole."""

from __future__ import annotations

import math

import torch

from ..ranking import DEFAULT_GQA


def selection_values(scores, settings: dict):
    """The values that chose the heads, for the heatmap's second panel (``None`` for random)."""
    from ..ranking.recipes import resolve_recipe
    from ..ranking.reconstruction import reconstruction_score
    from ..stats.moments import DEFAULT_DAMPING

    if settings.get("order") == "random":
        return None
    if settings.get("score") == "learned":
        return torch.tensor([[math.nan if v is None else v for v in row] for row in settings["learned"]["scores"]],
                            dtype=torch.float64)
    recipe = resolve_recipe(scores, settings.get("score"), settings.get("order"), ())
    if recipe.score == "reconstruction":
        return reconstruction_score(scores, settings.get("gqa", DEFAULT_GQA), settings.get("damping", DEFAULT_DAMPING))
    return scores.score(recipe.score) if isinstance(recipe.score, str) else None


def selection_label(scores, settings: dict) -> str:
    """The selection panel's title: the score, and where the values shown are not those that chose
    the heads, what chose them."""
    from ..ranking.recipes import default_for

    score = settings.get("score") or default_for(scores)["score"]
    steps = settings.get("steps")
    if isinstance(steps, int) and steps > 1:  # the values shown are the first round's, of the unpruned model
        return (f"{score} of round 1 of {steps} (for reference: later rounds ranked the model with the earlier "
                "rounds' heads removed)")
    if settings.get("sequential"):
        return f"{score} (for reference: --sequential chose each layer's heads again on the pruned layers' outputs)"
    if settings.get("scope") == "measured" and settings.get("score") != "learned":
        from ..hf.allocation import resolve_choice

        choice = resolve_choice(scores, settings.get("gqa", DEFAULT_GQA), settings.get("score"),
                                settings.get("order"), settings.get("choose"))
        if choice == "greedy":  # the ranking's values are shown, but measurement chose
            return f"{score} (for reference: the heads went by measured removal cost)"
    return f"{score} (the score that chose the heads)"


def protected_layers(scores, settings: dict) -> tuple:
    """The layers the recipe kept whole, as select_heads resolves them."""
    from ..ranking.recipes import resolve_recipe

    recipe = resolve_recipe(scores, settings.get("score"), settings.get("order"), settings.get("protect_layers"),
                            uniform=bool(settings.get("uniform")))
    return tuple(recipe.protect_layers)
