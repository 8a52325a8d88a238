"""The sweep's markdown table, with and without random draws."""

import pytest

from headprune.app.sweep_table import sweep_markdown


def _result(random):
    return {"lower_is_better": True, "metric": "perplexity", "model": "m", "data": "d", "baseline": 10.0,
            "removal": "refit", "ratios": [0.3, 0.5], "recipes": {"default": [11.0, 30.0]}, "random": random}


def test_random_columns_mark_recipes_better_than_the_random_mean():
    text = sweep_markdown(_result([[12.0, 13.0], [20.0, 25.0]]))
    rows = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert "random geometric mean (2 seeds)" in text and "random heads" in text  # perplexities: geometric
    assert "`*` = better than the random geometric mean at that fraction." in text
    assert rows[0].startswith("| 0.30 | 11 * | 12.49 |") and "12-13" in rows[0]
    assert rows[1].startswith("| 0.50 | 30 |") and "*" not in rows[1]
    fidelity = {**_result([[0.9, 0.8], [0.7, 0.6]]), "lower_is_better": False, "ratios": [0.125, 0.375]}
    text = sweep_markdown(fidelity)
    assert "random mean (2 seeds)" in text  # fidelities: arithmetic
    assert "random geometric mean (1 seed)" in sweep_markdown(_result([[12.0], [20.0]]))  # not "1 seeds"
    rows = [line for line in text.splitlines() if line.startswith("| 0.")]  # 0.125 read as 0.12, 0.375 as 0.38
    assert rows[0].startswith("| 0.125 |") and rows[1].startswith("| 0.375 |")


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


def test_the_heading_says_a_masked_inputs_heads_and_a_uniform_rows_even_layouts():
    """sweep.md said neither: its fractions are of the heads left after the input's masked ones,
    and under --gqa query the uniform row ran in even layouts (a config declares one)."""
    settings = {"data": "d", "samples": 4, "seq_len": 16, "masked_in_input": 3}
    result = {**_result([]), "settings": settings, "gqa": "query",
              "recipe_settings": {"default": {}, "u": {"uniform": True, "gqa": "even"}, "g": {"gqa": "group"},
                                  "ug": {"uniform": True, "gqa": "group"}}}
    heading = sweep_markdown(result).splitlines()[0]
    assert "The 3 heads the model held masked (zero output columns) were removed first and are not counted in " \
           "the fractions." in heading
    assert heading.endswith("`u`: in --gqa even layouts (a config declares one layout). `ug`: in --gqa group "
                            "layouts.") and "`g`" not in heading  # a uniform row of whole groups is said as one


def test_fidelities_near_one_keep_their_fifth_digit():
    """At four significant digits a fidelity of 0.99997 read as 1, beside a random mean of 1."""
    result = {**_result([[0.99991, 0.99993]]), "lower_is_better": False, "metric": "fidelity", "baseline": 1.0,
              "ratios": [0.1], "recipes": {"default": [0.99997]}}
    row = [line for line in sweep_markdown(result).splitlines() if line.startswith("| 0.10")][0]
    assert row == "| 0.10 | 0.99997 * | 0.99992 | 0.99991-0.99993 |"


def test_the_report_says_timed_only_where_speed_was_measured():
    from headprune.app.report import report_markdown

    report = {"model": "m", "heads_pruned": 1, "heads_total": 8, "recipe": "r", "saved_bytes": 2**20,
              "compute_dtype": "float32", "speed": None,
              "settings": {"mode": "physical", "samples": 4, "seq_len": 8, "data": "d", "held_out_paragraphs": 3,
                           "saved_dtype": "float16"}}
    assert "Both models were evaluated in float32" in report_markdown(report, "T")
    timed = report_markdown({**report, "speed": [{"kind": "prefill"}]}, "T")
    assert "Both models were evaluated and timed in float32" in timed


@pytest.mark.parametrize("family, heads", [("llama", {0: [0, 1, 2, 3], 1: [1]}), ("llama", {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}),
                                           ("mistral", {1: [2, 3]}), ("qwen2", {0: [2, 3]}), ("gemma2", {1: [2, 3]})])
def test_kv_bytes_per_token_are_what_the_cache_grows_by(family, heads):
    """Sliding-window layers were counted as growing with every token (Gemma 2's local and
    global layers losing a KV group reported the same saving), and a layer with no head left as
    holding nothing (it keeps one zero per token for keys and for values)."""
    import torch
    from hf_tiny import tiny_model

    from headprune.hf import prune_heads
    from headprune.hf.report import measure

    model = tiny_model(family, attn_implementation="eager")
    prune_heads(model, heads)
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))

    def cached(n: int) -> int:
        with torch.no_grad():
            cache = model(input_ids=ids[:, :n], use_cache=True).past_key_values
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    got = measure(model)
    assert got["kv_cache_bytes_per_token"] * 16 == cached(40) - cached(24)  # every window (4 tokens) is behind
    assert got["kv_cache_window_sites"] == {"llama": 0, "mistral": 2, "qwen2": 1, "gemma2": 1}[family]
    # before the windows (4 tokens, 3 kept between steps) fill, every layer grows
    assert got["kv_cache_bytes_per_token"] + (got["kv_cache_window_bytes_per_token"] or 0) == cached(3) - cached(2)
    assert measure(tiny_model("bert"))["kv_cache_bytes_per_token"] is None  # no causal site


def test_a_recipe_whose_layout_rounds_to_no_head_is_said_not_starred():
    result = {**_result([[12.0, 13.0], [20.0, 25.0]]), "recipes": {"default": [11.0, 18.0], "uniform": [10.0, 19.0]},
              "heads": {"default": [{"1": [2]}, {"1": [2, 3]}], "uniform": [{}, {"0": [1], "1": [1]}]}}
    rows = [line for line in sweep_markdown(result).splitlines() if line.startswith("| 0.")]
    assert rows[0].startswith("| 0.30 | 11 * | 10 (no head) |") and rows[1].startswith("| 0.50 | 18 * | 19 * |")
    assert "`(no head)`: the layout of uniform rounds to no head there" in sweep_markdown(result)


def test_the_sweep_plot_draws_the_ratios_in_order(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from headprune.app import plots

    drawn = []
    original = Axes.plot

    def plot(self, x, y, *a, **k):
        drawn.append((list(x), list(y)))
        return original(self, x, y, *a, **k)

    monkeypatch.setattr(Axes, "plot", plot)
    result = {**_result([[25.0], [12.0]]), "ratios": [0.5, 0.1], "recipes": {"default": [30.0, 11.0]}}
    plots.sweep_plot(result, tmp_path / "s.png")
    assert ([0.1, 0.5], [11.0, 30.0]) in drawn  # the recipe, and the random mean (a geometric mean: rounding)
    assert any(x == [0.1, 0.5] and y == pytest.approx([12.0, 25.0]) for x, y in drawn)

    # each point where the heads it removed put it: a layout that rounds to no head sat at 0.3 as if
    # it pruned 30% at no cost, and the draws' band at a fraction they did not remove
    drawn.clear()
    result = {**_result([[12.0, 13.0], [20.0, 25.0]]), "heads_total": 10, "random_heads": [[2, 2], [5, 5]],
              "recipes": {"default": [11.0, 18.0], "uniform": [10.0, 19.0]},
              "heads": {"default": [{"1": [1, 2, 3]}, {"0": [1, 2], "1": [0, 1, 2]}], "uniform": [{}, {"0": [1], "1": [1]}]}}
    plots.sweep_plot(result, tmp_path / "s.png")
    assert ([0.3, 0.5], [11.0, 18.0]) in drawn and ([0.0, 0.2], [10.0, 19.0]) in drawn
    assert any(x == [0.2, 0.5] and y == pytest.approx([12.49, 22.36], abs=0.01) for x, y in drawn)


def test_the_pictures_leave_the_callers_matplotlib_as_it_was(tmp_path):
    """Drawing switched the process's backend to Agg (a notebook's inline backend with it) and
    silenced matplotlib's font notices for the rest of the process."""
    import logging

    import matplotlib

    from headprune.app import plots

    log = logging.getLogger("matplotlib.font_manager")
    backend, level = matplotlib.get_backend(), log.level
    try:
        matplotlib.use("svg")
        log.setLevel(logging.DEBUG)
        plots.sweep_plot({**_result([[25.0], [12.0]]), "ratios": [0.1, 0.5], "recipes": {"default": [11.0, 30.0]}},
                         tmp_path / "s.png")
        assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg" and log.level == logging.DEBUG
    finally:
        matplotlib.use(backend)
        log.setLevel(level)


def test_the_flops_row_says_its_context_which_the_model_can_take():
    """The row was quoted at 1,024 tokens of context, without saying so, for MiniLM's 512
    positions."""
    from hf_tiny import tiny_model

    from headprune.app.report import summary_table
    from headprune.hf.report import attention_flops_per_token, measure

    model = tiny_model("bert")  # 64 positions
    m = measure(model)
    assert m["context"] == 64 and m["attention_flops_per_token"] == attention_flops_per_token(model, 64)
    table = summary_table({"before": m, "after": m}, "fidelity")
    assert "| attention FLOPs/token (at 64 tokens of context, a fixed point of comparison: " in table
    roberta = tiny_model("roberta")  # 64 position rows, the first two skipped (padding_idx 1): 62 tokens
    assert measure(roberta)["context"] == 62  # it said 64, a context the model cannot take


def test_the_retrieval_row_says_what_it_counts_and_changes_by_paragraphs():
    """It read "retrieval top-1 | 0.2207 | 0.2394 | +8.5%", a gain of four paragraphs of 213,
    without saying what was retrieved."""
    from hf_tiny import tiny_model

    from headprune.app.report import summary_table
    from headprune.hf.report import measure

    m = measure(tiny_model("bert"))
    b = {**m, "fidelity": 1.0, "retrieval_top1": 47 / 213, "retrieval_pairs": 213, "retrieval_mrr": 0.34904}
    a = {**m, "fidelity": 0.97, "retrieval_top1": 51 / 213, "retrieval_pairs": 213, "retrieval_mrr": 0.35235}
    rows = summary_table({"before": b, "after": a}, "fidelity").splitlines()
    assert rows[3] == ("| retrieval top-1 (share of the 213 held-out paragraphs of two sentences or more whose first "
                       "sentence finds the rest of its own paragraph among all of them) | 0.22066 | 0.23944 | +4 of 213 |")
    assert rows[2].startswith("| embedding fidelity on held-out text (mean cosine similarity")
    assert rows[4] == "| retrieval MRR (mean of 1 / the rank of the true rest of each paragraph) | 0.34904 | 0.35235 | +0.9% |"
    a["retrieval_top1"] = float("nan")
    assert summary_table({"before": b, "after": a}, "fidelity").splitlines()[3].endswith("| 0.22066 | nan |  |")


def test_numbers_from_ten_thousand_are_written_whole():
    """Four significant digits wrote 41,150 tokens/s as 4.115e+04."""
    from headprune.app.report import number

    assert [number(v) for v in (41150.3, 1234.5678, 0.99997, 12.5, -20000.0, 9999.6, 2.688e43, 0.999996)] == \
        ["41,150", "1,235", "0.99997", "12.5", "-20,000", "10,000", "2.688e+43", "0.999996"]


def test_the_sweep_plot_tells_every_recipe_apart_and_reads_plain_numbers(tmp_path, monkeypatch):
    """Past ten recipes the colour cycle repeated (the default and an entropy recipe in one blue),
    and a narrow log axis read 3.0645x10^4."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from headprune.app import plots

    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    recipes = {f"recipe {i}": [30600.0 + i, 30700.0 + i] for i in range(19)}
    result = {"model": "m", "data": "d", "metric": "perplexity", "lower_is_better": True, "baseline": 30500.0,
              "ratios": [0.1, 0.2], "recipes": recipes, "random": [[30650.0], [30750.0]], "default_recipe": "recipe 0"}
    plots.sweep_plot(result, tmp_path / "s.png")
    (ax,) = figures[0].axes
    drawn = [(line.get_color(), line.get_marker()) for line in ax.get_lines() if line.get_label() in recipes or
             line.get_label().startswith("recipe 0")]
    assert len(drawn) == 19 and len(set(drawn)) == 19 and len({c for c, _ in drawn}) == 19
    FigureCanvasAgg(figures[0]).draw()
    labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text()]
    assert labels and not any("times" in t or "^" in t for t in labels), labels


def test_the_pictures_keep_matplotlibs_font_notices_out_of_the_output(tmp_path):
    """A missing font's notices are logged when the layout is computed, before the picture is
    saved; quieting the save alone let them through."""
    import logging

    import matplotlib

    from headprune.app import plots

    seen = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = seen.append
    log = logging.getLogger("matplotlib.font_manager")
    log.addHandler(handler)
    try:
        with matplotlib.rc_context({"font.family": "headprune-test-no-such-family"}):
            plots.sweep_plot({**_result([[25.0], [12.0]]), "ratios": [0.1, 0.5], "recipes": {"default": [11.0, 30.0]}},
                             tmp_path / "s.png")
    finally:
        log.removeHandler(handler)
    assert not [r for r in seen if r.levelno >= logging.WARNING], [r.getMessage() for r in seen][:3]


def test_the_summary_says_which_layers_the_kv_row_leaves_out():
    from headprune.app.report import summary_table

    m = {"query_heads": 8, "kv_heads": 4, "kv_cache_bytes_per_token": 64, "kv_cache_window_sites": 1,
         "kv_cache_dtype": "float32", "parameters": 10, "attention_flops_per_token": 5}
    assert "| KV cache bytes per token (float32), 1 sliding-window layer left out | 64 |" in \
        summary_table({"before": m, "after": m}, "perplexity")
    # every layer windowed (Mistral 7B v0.1): the per-token row was 0 and left out, with no other
    before, after = ({**m, "kv_cache_bytes_per_token": 0, "kv_cache_window_sites": 2, "kv_cache_window_bytes_per_token": n}
                     for n in (64, 32))
    assert ("| KV cache bytes per token (float32) of the 2 sliding-window layers, until their windows fill | 64 | 32 | "
            "-50.0% |") in summary_table({"before": before, "after": after}, "perplexity")
    one = {**before, "kv_cache_window_sites": 1}
    assert "of the sliding-window layer, until its window fills |" in summary_table({"before": one, "after": one}, "x")


def test_a_recipe_removed_otherwise_than_the_random_draws_is_not_starred():
    """A mean-compensated recipe was starred for beating random draws refit by least squares."""
    result = {**_result([[12.0, 13.0], [20.0, 25.0]]), "recipes": {"default": [11.0, 18.0], "variance, mean": [11.5, 19.0]},
              "recipe_settings": {"default": {}, "variance, mean": {"removal": "mean"}}}
    text = sweep_markdown(result)
    rows = [line for line in text.splitlines() if line.startswith("| 0.")]
    assert rows[0].startswith("| 0.30 | 11 * | 11.5 |") and rows[1].startswith("| 0.50 | 18 * | 19 |")
    assert "`variance, mean`: removed otherwise than the random draws" in text


def test_a_nan_draw_makes_the_random_range_nan_wherever_it_is():
    """min and max over [30, nan, 40] gave 30-40 and over [nan, 30, 40] gave nan-nan."""
    for draws in ([30.0, float("nan"), 40.0], [float("nan"), 30.0, 40.0]):
        row = [line for line in sweep_markdown(_result([draws, draws])).splitlines() if line.startswith("| 0.30")][0]
        assert row.endswith("| nan | nan-nan |"), row


def test_the_heading_names_the_refits_damping_and_the_draws_layouts():
    """The heading gave neither the damping of the refit nor the draws' --gqa (both in sweep.json)."""
    result = {**_result([[12.0, 13.0], [20.0, 25.0]]), "settings": {"damping": 0.1}, "gqa": "query"}
    head = sweep_markdown(result).splitlines()[0]
    assert "kept heads refit by least squares (damping 0.1); random heads" in head and ", in --gqa query layouts" in head
    plain = sweep_markdown({**result, "gqa": "even"}).splitlines()[0]
    assert "--gqa" not in plain  # the default's layouts are not named
