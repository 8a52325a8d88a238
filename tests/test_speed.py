"""headprune.hf.speed: prefill and decode compared interleaved, the filled KV cache, the
verdict that refuses to sign a difference inside the spread, and the prune report's rows."""

import json

import pytest
import torch

from hf_tiny import tiny_model

from headprune.hf import prune_heads, resolve_sites
from headprune.hf.speed import _cache_arg, compare, filled_cache, parse_shape, position_limit, verdict

pytest.importorskip("transformers")


def _uneven(family="llama"):
    model = tiny_model(family)
    n = len(resolve_sites(model))
    prune_heads(model, {0: [0, 1], n - 1: [3]})  # a whole KV group in layer 0, a partly pruned one last
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_filled_cache_has_the_shapes_a_prefill_leaves(family):
    """Per layer, the zeros hold what a real prefill of the same length would cache."""
    from transformers import DynamicCache

    model = _uneven(family).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    real = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **{_cache_arg(model): real}, use_cache=True)
    filled = filled_cache(model, 2, 7)
    assert len(filled.layers) == len(real.layers)
    for a, b in zip(filled.layers, real.layers):
        assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
        assert a.keys.dtype == b.keys.dtype
    assert filled.get_seq_length() == 7


def test_decode_steps_extend_the_filled_cache():
    model = _uneven().eval()
    cache = filled_cache(model, 1, 5)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[4]]), **{_cache_arg(model): cache}, use_cache=True)
    assert torch.isfinite(out.last_hidden_state).all()
    assert cache.get_seq_length() == 6


def test_compare_rows_and_reference():
    a, b = tiny_model("llama").eval(), _uneven().eval()
    rows = compare({"base": a, "pruned": b}, prefill=[(1, 8), (2, 8)], decode=[(1, 16)], steps=2, rounds=3)
    assert [(r["kind"], r["batch"], r["tokens"], r["model"]) for r in rows] == [
        ("prefill", 1, 8, "base"), ("prefill", 1, 8, "pruned"), ("prefill", 2, 8, "base"), ("prefill", 2, 8, "pruned"),
        ("decode", 1, 16, "base"), ("decode", 1, 16, "pruned")]
    for r in rows:
        assert r["wall_s"] > 0 and r["cpu_s"] >= 0 and r["tokens_per_s"] > 0
        assert r["speedup_low"] <= r["speedup"] <= r["speedup_high"]
    assert all(r["speedup"] == 1.0 and r["verdict"] == "reference" for r in rows if r["model"] == "base")
    assert rows[-1]["steps"] == 2 and rows[-1]["tokens_per_s"] == pytest.approx(2 / rows[-1]["wall_s"])
    base = {(r["kind"], r["batch"], r["tokens"]): r["wall_s"] for r in rows if r["model"] == "base"}
    for r in rows:  # the ratio the tokens/s columns show
        assert r["speedup_of_medians"] == pytest.approx(base[r["kind"], r["batch"], r["tokens"]] / r["wall_s"])


def test_verdict_signs_only_outside_the_spread():
    assert verdict({"speedup": 1.02, "speedup_low": 0.97, "speedup_high": 1.06}) == \
        "no measurable difference (0.97-1.06x)"
    assert verdict({"speedup": 1.31, "speedup_low": 1.25, "speedup_high": 1.36}) == "1.31x (1.25-1.36x)"
    assert verdict({"speedup": 0.8, "speedup_low": 0.75, "speedup_high": 0.9}) == "0.80x (0.75-0.90x)"
    # uneven rounds: the per-round ratios say faster, the median times (the tokens/s columns) slower
    assert verdict({"speedup": 1.04, "speedup_low": 1.03, "speedup_high": 1.05, "speedup_of_medians": 0.34}) == \
        "no measurable difference (per round 1.03-1.05x, the median times 0.34x)"
    assert verdict({"speedup": 1.31, "speedup_low": 1.25, "speedup_high": 1.36, "speedup_of_medians": 1.2}) == \
        "1.31x (1.25-1.36x)"
    # a bound that rounds to 1.00 read as a spread covering no change beside a measured slowdown
    assert verdict({"speedup": 0.951, "speedup_low": 0.912, "speedup_high": 0.9987}) == "0.951x (0.912-0.999x)"
    # a control (the reference against itself): a spread reaching into the control's is no difference
    c = {"control_low": 0.97, "control_high": 1.08}
    assert verdict({"speedup": 1.12, "speedup_low": 1.06, "speedup_high": 1.15, **c}) == \
        "no measurable difference (1.06-1.15x; the unpruned model against itself 0.97-1.08x)"
    assert verdict({"speedup": 1.12, "speedup_low": 1.09, "speedup_high": 1.15, **c}) == \
        "1.12x (1.09-1.15x; the unpruned model against itself 0.97-1.08x)"
    c = {"control_low": 0.99, "control_high": 0.99}  # an A/A of 0.99x: a 0.99x is not a difference
    assert verdict({"speedup": 0.99, "speedup_low": 0.985, "speedup_high": 0.995, **c}).startswith("no measurable")
    assert verdict({"speedup": 0.9, "speedup_low": 0.88, "speedup_high": 0.92, **c}) == \
        "0.90x (0.88-0.92x; the unpruned model against itself 0.99-0.99x)"
    # bounds that print as the control's edge read as touching what they clear: more digits
    c = {"control_low": 0.99, "control_high": 1.012}
    assert verdict({"speedup": 1.02, "speedup_low": 1.0135, "speedup_high": 1.024, **c}) == \
        "1.020x (1.014-1.024x; the unpruned model against itself 0.990-1.012x)"  # it read 1.01-1.02x beside 0.99-1.01x
    assert verdict({"speedup": 1.02, "speedup_low": 1.0122, "speedup_high": 1.024, **c}) == \
        "1.0200x (1.0122-1.0240x; the unpruned model against itself 0.9900-1.0120x)"
    # a control 12-17% off one way: the same effect the other way is no difference either (it read 1.15x)
    c = {"control_low": 0.83, "control_high": 0.88}
    assert verdict({"speedup": 1.15, "speedup_low": 1.01, "speedup_high": 1.24, **c}).startswith("no measurable")
    assert verdict({"speedup": 1.3, "speedup_low": 1.25, "speedup_high": 1.36, **c}).startswith("1.30x")
    for c in ({"control_low": 0.0, "control_high": 0.5}, {"control_low": 0.9, "control_high": float("inf")}):
        verdict({"speedup": 1.6, "speedup_low": 1.55, "speedup_high": 1.65, **c})  # no ZeroDivisionError


def test_compare_speed_times_the_unpruned_model_against_itself_as_a_control(monkeypatch):
    """The report's rows carry the control's quartiles, taken in the same rounds, and their
    verdict uses them."""
    import itertools

    import headprune.hf.speed as speed
    from headprune.app.evaluate import compare_speed

    before, after = tiny_model("llama"), tiny_model("llama")
    made, times = [], {}
    real = speed._prefill

    def prefill(model, batch, tokens):  # the timed calls are made first: before, after, control
        setup, run = real(model, batch, tokens)
        made.append(run)
        return setup, run

    def clock(fn, *args, devices=()):  # the two timings of the unpruned model alternate 1.0 s and 1.1 s, out of step
        i = made.index(fn)
        n = len(times.setdefault(i, []))
        t = 0.5 if i == 1 else (1.0, 1.1)[(n + i // 2) % 2]
        times[i].append(t)
        return t, t

    monkeypatch.setattr(speed, "_clock", clock)
    monkeypatch.setattr(speed, "_prefill", prefill)
    (row,) = compare_speed(before, after, prefill=((1, 8),), decode=(), rounds=5)
    assert row["control_low"] < 1.0 < row["control_high"]  # the noise the control saw
    assert row["speedup_low"] > row["control_high"] and row["verdict"].endswith(
        f"; the unpruned model against itself {row['control_low']:.2f}-{row['control_high']:.2f}x)")


@pytest.mark.parametrize("bad", ["512", "1x", "ax2", "0x5", "2x-1"])
def test_shapes_are_checked_by_name(bad):
    with pytest.raises(ValueError, match="--decode: expected"):
        parse_shape(bad, "--decode")


def test_compare_refuses_nothing_to_time():
    with pytest.raises(ValueError, match="models"):
        compare({}, prefill=[(1, 4)])
    with pytest.raises(ValueError, match="rounds"):
        compare({"a": tiny_model("llama")}, prefill=[(1, 4)], rounds=0)



@pytest.mark.parametrize("family,limit", [("gpt2", 64), ("bert", 64), ("roberta", 62), ("opt", 64),
                                          ("llama", None), ("t5", None)])
def test_position_limit_is_the_learned_table_usable_length(family, limit):
    """RoBERTa's positions start after its padding row, OPT's after an offset of 2; rotary and
    relative positions have no table."""
    model = tiny_model(family)
    assert position_limit(model) == limit
    if limit is not None:  # the limit itself runs, one more does not (the model's own error)
        ids = torch.randint(3, 90, (1, limit))
        with torch.no_grad():
            model(input_ids=ids, **({"decoder_input_ids": ids} if family == "t5" else {}))
            with pytest.raises(Exception):
                model(input_ids=torch.randint(3, 90, (1, limit + 1)))


def test_compare_refuses_shapes_past_learned_positions_before_timing(monkeypatch):
    import headprune.hf.speed as speed

    gpt2, llama = tiny_model("gpt2"), tiny_model("llama")
    monkeypatch.setattr(speed, "_clock", lambda *a: pytest.fail("timed before the shapes were checked"))
    with pytest.raises(ValueError, match=r"prefill: 1x65 needs 65 positions, more than the 64 learned positions "
                                         r"of model 'b' \(gpt2\)"):
        compare({"a": llama, "b": gpt2}, prefill=[(1, 8), (1, 65)], rounds=3)
    with pytest.raises(ValueError, match=r"decode: 1x60 with 8 decode steps needs 68 positions"):
        compare({"a": gpt2}, decode=[(1, 60)], steps=8, rounds=3)
    monkeypatch.undo()
    rows = compare({"a": gpt2}, prefill=[(1, 64)], decode=[(1, 56)], steps=8, rounds=3)  # exactly the table
    assert [r["tokens"] for r in rows] == [64, 56]
    assert compare({"a": llama}, decode=[(1, 64)], steps=2, rounds=3)[0]["tokens"] == 64  # rotary runs past

def _tokenizer_dir(tmp_path):
    """A word-level tokenizer saved in ``tmp_path/tok`` (no download)."""
    import transformers

    tokenizers = pytest.importorskip("tokenizers")
    words = "the a of and to in was her she it he had not be".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tok"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    return path


def test_prune_report_has_prefill_and_decode_rows(tmp_path, monkeypatch, capsys):
    """``prune --speed``: a prefill and a decode row, interleaved, in report.json and report.md;
    an encoder gets the prefill row only (--speed-decode is refused there: it has no decode)."""
    import transformers
    from test_cli_save_dtype import _checkpoint

    from headprune.app.cli import main

    monkeypatch.chdir(tmp_path)
    tok_dir = _tokenizer_dir(tmp_path)
    llama = _checkpoint(tmp_path, tok_dir, "float32", config_names_it=True)
    bert = tmp_path / "bert"
    tiny_model("bert").save_pretrained(bert)
    transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(bert)
    for path, kinds in ((llama, ["prefill", "decode"]), (bert, ["prefill"])):
        out = tmp_path / f"out-{path.name}"
        decode = ["--speed-decode", "1x24"] if "decode" in kinds else []
        code = main([str(a) for a in ["prune", path, "--count", "2", "--samples", "4", "--seq-len", "16", "--quiet",
                                      "--speed-prefill", "1x16", *decode, "--out", out]])
        assert code == 0, capsys.readouterr().err
        speed = json.loads((out / "report.json").read_text())["speed"]
        assert [r["kind"] for r in speed] == kinds
        assert speed[0]["tokens"] == 16 and speed[0]["batch"] == 1
        md = (out / "report.md").read_text()
        assert "prefill tokens/s (batch 1, 16 tokens, interleaved)" in md
        assert ("decode tokens/s (batch 1, 24-token context, interleaved)" in md) == ("decode" in kinds)


def test_fewer_than_five_rounds_spread_over_their_range():
    """The quartiles of 3 rounds are midpoints of neighbours: 0.95, 1.06 and 1.07 read as a
    measurable 1.06x (1.005-1.065x) although one round was slower."""
    from headprune.hf.speed import quartiles, verdict

    assert quartiles([0.95, 1.06, 1.07]) == (0.95, 1.07)
    assert quartiles([1.0, 1.1, 1.2, 1.3, 1.4]) == (1.1, 1.3)
    row = {"speedup": 1.06, "speedup_low": 0.95, "speedup_high": 1.07}
    assert verdict(row).startswith("no measurable difference")


def test_timings_wait_for_every_gpu_the_model_is_on(monkeypatch):
    """The timed runs waited for the current CUDA device only: a model on another GPU (--device
    cuda:1), or spread over several, was timed while its kernels still ran; eval's throughput did
    not wait after its warm-up."""
    from headprune.app import evaluate
    from headprune.hf import speed

    assert speed.cuda_devices(tiny_model("llama")) == []  # a model on the CPU: none to wait for
    waited = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    speed.synchronize([torch.device("cuda:1"), torch.device("cuda:2")])
    assert waited == [None, torch.device("cuda:1"), torch.device("cuda:2")]  # the current device, then each
    monkeypatch.setattr(speed, "cuda_devices", lambda *models: [torch.device("cuda:1")])
    waited.clear()
    evaluate.throughput(tiny_model("llama"), seq_len=8, repeat=3)
    assert waited == [None, torch.device("cuda:1")] * 4  # after the warm-up and after each timed run
