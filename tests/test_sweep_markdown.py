"""The sweep's markdown table, with and without random draws."""

import pytest

from headprune.app.sweep import sweep_markdown


def _result(random):
    return {"lower_is_better": True, "metric": "perplexity", "model": "m", "data": "d", "baseline": 10.0,
            "removal": "refit", "ratios": [0.3, 0.5], "recipes": {"default": [11.0, 30.0]}, "random": random}


def test_random_columns_mark_recipes_better_than_the_random_mean():
    text = sweep_markdown(_result([[12.0, 13.0], [20.0, 25.0]]))
    rows = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert "random mean (2 seeds)" in text and "random heads" in text
    assert rows[0].startswith("| 0.30 | 11 * |") and "12-13" in rows[0]
    assert rows[1].startswith("| 0.50 | 30 |") and "*" not in rows[1]


@pytest.mark.parametrize("random", [[[], []], []])
def test_no_random_draws_leave_the_random_columns_out(random):
    text = sweep_markdown(_result(random))
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows[0] == "| fraction pruned | default |" and rows[1] == "|---|---|"
    assert rows[2:] == ["| 0.30 | 11 |", "| 0.50 | 30 |"]
    assert "random" not in text


def test_the_calibration_and_its_reference_share_are_said():
    settings = {"data": "mine.txt", "samples": 64, "seq_len": 256,
                "reference": {"samples": 16, "texts": ["persuasion", "python_code"]}}
    text = sweep_markdown({**_result([]), "settings": settings})
    assert ("Calibrated on 64 x 256 tokens of `mine.txt` (16 of the 64 sequences from the bundled `persuasion` and "
            "`python_code`, `--reference`).") in text.splitlines()[0]
    plain = sweep_markdown({**_result([]), "settings": {**settings, "reference": None}})
    assert plain.splitlines()[0].endswith("Calibrated on 64 x 256 tokens of `mine.txt`.")
