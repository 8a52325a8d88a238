"""Learned hard-concrete gates (headprune.hf.learned): the relaxation's formulas, the budget
held by projection, training that moves only the gates, the selection it feeds, resume, the
gates' fill, and ``prune --score learned``."""

import json
import math
import re

import pytest
import torch

from hf_tiny import tiny_batch, tiny_model

from headprune.hf import collect, resolve_sites
from headprune.hf.gates import gates
from headprune.hf.learned import BETA, GAMMA, ZETA, learn_gates, open_probability, project, sample_gates
from headprune.ranking import select_heads

pytest.importorskip("transformers")


def _batches(family="llama", n=3):
    return [tiny_batch(family, seed=i, pad=False) for i in range(n)]


def test_open_probability_matches_sampling():
    """P(z > 0) in closed form against the fraction of positive draws (float64 reference)."""
    la = torch.tensor([-3.0, -1.0, 0.0, 1.5, 4.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_gates(la, g) for _ in range(20000)])
    assert ((draws >= 0) & (draws <= 1)).all()
    assert torch.allclose((draws > 0).double().mean(0), open_probability(la), atol=0.015)
    # the closed form: sigmoid(log_alpha - beta * log(-gamma / zeta))
    assert torch.allclose(open_probability(la), torch.sigmoid(la - BETA * math.log(-GAMMA / ZETA)))
    # hard zeros and ones both occur with positive probability
    assert (draws == 0).any() and (draws == 1).any()


def test_projection_holds_the_budget_and_the_order():
    # its own generator: with a mean open probability near 0.4 already (2 of 2,000 states of the
    # global one, so the suite's order decided), the tiny shift's float32 rounding broke allclose
    la = torch.randn(3, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(0)) * 3
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2, 3:] = False
    before = la.clone()
    project(la, valid, 0.4)
    assert open_probability(la[valid].double()).mean().item() == pytest.approx(0.4, abs=1e-5)
    shift = (la - before)[valid]
    assert torch.allclose(shift, shift[0].expand_as(shift))  # one constant: the ranking is unchanged
    assert torch.equal(la[~valid], before[~valid])


@pytest.mark.parametrize("family,fill", [("llama", True), ("bert", False), ("gpt2", True)])
def test_training_moves_only_the_gates(family, fill):
    model = tiny_model(family)
    batches = _batches(family)
    scores = collect(model, batches, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    r = learn_gates(model, batches, ratio=0.5, steps=12, lr=0.1, scores=scores if fill else None)
    assert r.steps == 12 and r.stopped == "steps" and r.open_fraction == pytest.approx(0.5, abs=1e-4)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert r.scores.shape == (len(resolve_sites(model)), max(scores.num_heads))
    assert torch.isfinite(r.scores[scores.valid()]).all()
    heads = select_heads(scores, ratio=0.5, score=r.scores, order="low")
    for site, hs in heads.items():  # each layer loses its lowest log_alpha
        row = r.scores[site, : scores.num_heads[site]]
        assert set(hs) == set(row.argsort()[: len(hs)].tolist())
    json.dumps(r.to_dict())


def test_gradient_reaches_the_gates_that_matter():
    """A head whose output projection columns are zero changes nothing: the distillation
    loss gives its gate no gradient, and the gates learn to close it first."""
    model = tiny_model("llama")
    site = resolve_sites(model)[1]
    d = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        site.o.weight[:, 2 * d : 3 * d] = 0
    batches = _batches()
    r = learn_gates(model, batches, ratio=0.25, steps=30, lr=0.2)
    assert r.scores[1, 2] == r.scores[~r.scores.isnan()].min()
    assert select_heads(collect(model, batches, progress=False), count=1, score=r.scores, scope="global",
                        gqa="query") == {1: [2]}


def test_resume_after_an_interrupt_and_after_the_end(tmp_path):
    """Interrupted after step 4: the periodic checkpoint of step 3 resumes to the same gates;
    resuming a finished run trains nothing and its report stays valid JSON."""
    model = tiny_model("llama")
    batches = _batches()
    full = learn_gates(model, batches, ratio=0.5, steps=8, lr=0.1)
    ck = tmp_path / "gates.pt"

    def stop(step, steps, loss):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn_gates(model, batches, ratio=0.5, steps=8, lr=0.1, checkpoint=ck, checkpoint_every=3, progress=stop)
    rest = learn_gates(model, batches, ratio=0.5, steps=8, lr=0.1, checkpoint=ck, resume=True)
    assert rest.resumed_from == 3 and rest.steps == 8
    assert torch.equal(rest.scores.nan_to_num(), full.scores.nan_to_num())
    done = learn_gates(model, batches, ratio=0.5, steps=8, lr=0.1, checkpoint=ck, resume=True)
    assert done.resumed_from == 8 and math.isnan(done.loss_first)  # no step ran
    text = json.dumps(done.to_dict(), allow_nan=False)
    assert json.loads(text)["loss_first"] is None


def test_resume_continues_exactly(tmp_path):
    model = tiny_model("llama")
    batches = _batches()
    full = learn_gates(model, batches, ratio=0.5, steps=10, lr=0.1)
    ck = tmp_path / "gates.pt"
    first = learn_gates(model, batches, ratio=0.5, steps=10, lr=0.1, checkpoint=ck, checkpoint_every=3,
                        time_budget_s=1e-9)
    assert first.stopped == "time_budget" and first.steps == 1
    rest = learn_gates(model, batches, ratio=0.5, steps=10, lr=0.1, checkpoint=ck, resume=True)
    assert rest.resumed_from == 1 and rest.steps == 10
    assert torch.equal(rest.scores.nan_to_num(), full.scores.nan_to_num())
    with pytest.raises(ValueError, match="checkpoint: .* was written for other ratio"):
        learn_gates(model, batches, ratio=0.4, steps=10, lr=0.1, checkpoint=ck, resume=True)


def test_resume_with_other_fill_values_is_refused(tmp_path):
    """Closed gates leave the heads' mean outputs: other means are another objective."""
    model = tiny_model("llama")
    batches = _batches()
    ck = tmp_path / "gates.pt"
    learn_gates(model, batches, ratio=0.5, steps=4, lr=0.1, scores=collect(model, batches[:1], progress=False),
                checkpoint=ck, time_budget_s=1e-9)
    with pytest.raises(ValueError, match="was written for other fill \\('mean [0-9a-f]+' in the checkpoint"):
        learn_gates(model, batches, ratio=0.5, steps=4, lr=0.1, scores=collect(model, batches[1:], progress=False),
                    checkpoint=ck, resume=True)


def test_every_module_keeps_its_mode_and_no_grad_is_no_obstacle():
    model = tiny_model("llama").train()
    model.layers[1].eval()  # a caller's own choice for one layer
    modes = {n: m.training for n, m in model.named_modules()}
    with torch.no_grad():
        r = learn_gates(model, _batches(), ratio=0.5, steps=3, lr=0.1)
    assert r.steps == 3 and {n: m.training for n, m in model.named_modules()} == modes


@pytest.mark.parametrize("kw,match", [({"ratio": 1.0}, "ratio"), ({"ratio": 0.5, "steps": 0}, "steps"),
                                      ({"ratio": 0.5, "lr": -1}, "lr"), ({"ratio": 0.5, "lr": 1e300}, "^lr: expected at most"),
                                      ({"ratio": 0.5, "warmup": 2}, "warmup"),
                                      ({"ratio": 0.5, "resume": True}, "resume"),
                                      ({"ratio": 0.5, "seed": None}, "seed"), ({"ratio": 0.5, "seed": 2**64}, "seed"),
                                      ({"ratio": 0.5, "time_budget_s": True}, "time_budget_s")])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        learn_gates(tiny_model("llama"), _batches(n=1), **kw)


def test_protected_layers_stay_open_and_each_layer_holds_its_budget():
    """One budget held over every head, the layers a selection keeps whole included, put closed
    gates there and left the layers it prunes with other fractions open than it removes."""
    model = tiny_model("llama", num_hidden_layers=3)
    for per_layer in (True, False):
        r = learn_gates(model, _batches(), ratio=0.5, steps=4, lr=0.5, protect_layers=[0], per_layer=per_layer)
        assert torch.equal(r.scores[0], torch.full_like(r.scores[0], 3.0))  # untrained: its init
        opens = open_probability(r.scores[1:]).mean(1)
        assert r.target_open == 0.5 and r.open_fraction == pytest.approx(0.5, abs=1e-5)
        assert opens.mean().item() == pytest.approx(0.5, abs=1e-5)
        if per_layer:
            assert opens.tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
    for kw, error, said in (({"protect_layers": [3]}, ValueError, r"protect_layers: expected site indices in \[0, 3\)"),
                            ({"protect_layers": [0, 1, 2]}, ValueError, "every one of the 3 sites is protected"),
                            ({"protect_layers": 0}, TypeError, "protect_layers: expected a sequence"),
                            ({"per_layer": "yes"}, TypeError, "per_layer: expected True or False")):
        with pytest.raises(error, match=said):
            learn_gates(model, _batches(n=1), ratio=0.5, steps=1, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_open_gates_with_a_fill_change_nothing(dtype):
    """At gate 1 the head's own output passes unchanged, bit for bit, whatever the fill."""
    model = tiny_model("llama").to(dtype).eval()
    batch = tiny_batch("llama", pad=False)
    sites = resolve_sites(model)
    fill = torch.randn(len(sites), model.config.num_attention_heads, 16) * 100
    with torch.no_grad():
        want = model(**batch).last_hidden_state
        with gates(model, values=torch.ones(len(sites), model.config.num_attention_heads), fill=fill):
            got = model(**batch).last_hidden_state
    assert torch.equal(got, want)


def test_fill_replaces_a_closed_head_by_the_fill():
    """gates(fill=F) at gate 0 puts F in the head's place: the same output as a model whose
    head outputs F, i.e. an o-projection bias of W_h F_h (float64)."""
    model = tiny_model("llama").double().eval()
    batch = tiny_batch("llama", pad=False)
    sites = resolve_sites(model)
    d = model.config.hidden_size // model.config.num_attention_heads
    fill = torch.randn(len(sites), model.config.num_attention_heads, d, dtype=torch.float64)
    g = torch.ones(len(sites), model.config.num_attention_heads, dtype=torch.float64)
    g[0, 1] = 0.0
    with torch.no_grad(), gates(model, values=g, fill=fill):
        got = model(**batch).last_hidden_state
    ref = tiny_model("llama").double().eval()
    o = resolve_sites(ref)[0].o
    with torch.no_grad():
        bias = o.weight[:, d : 2 * d] @ fill[0, 1]
        o.weight[:, d : 2 * d] = 0
        o.bias = torch.nn.Parameter(bias if o.bias is None else o.bias + bias)
        want = ref(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="fill: expected shape"):
        with gates(model, fill=fill[:, :1]):
            pass
    bad = fill.clone()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="fill: site 0"):
        with gates(model, fill=bad):
            pass


def test_t5_s_encoder_alone_is_an_encoder_and_t5_is_refused():
    """T5EncoderModel has one stack, as collect and gates take it: learned gates and recovery
    train it as an encoder; the encoder-decoder T5 is refused by both, by name."""
    import copy

    import transformers
    from hf_tiny import tiny_config

    from headprune.hf import prune_heads, recover

    torch.manual_seed(0)
    model = transformers.T5EncoderModel(tiny_config("t5")).eval()
    batches = [{k: v for k, v in tiny_batch("t5", seed=i).items() if not k.startswith("decoder")} for i in range(3)]
    learned = learn_gates(model, batches, ratio=0.5, steps=2)
    assert learned.scores.shape == (2, 4)
    student = copy.deepcopy(model)
    prune_heads(student, {0: [1]})
    assert recover(student, model, batches, steps=1, lr=1e-4).steps == 1
    t5 = tiny_model("t5")
    with pytest.raises(ValueError, match=r"model: learned gates handle causal LMs and encoders, not t5 \(seq2seq\)"):
        learn_gates(t5, [tiny_batch("t5")], ratio=0.5, steps=1)
    with pytest.raises(ValueError, match=r"student: recovery handles causal LMs and encoders, not t5 \(seq2seq\)"):
        recover(copy.deepcopy(t5), t5, [tiny_batch("t5")], steps=1, lr=1e-4)


def test_prune_score_learned(tmp_path, monkeypatch, capsys):
    from test_cli_save_dtype import _checkpoint
    from test_speed import _tokenizer_dir

    from headprune.app.cli import main

    monkeypatch.chdir(tmp_path)
    path = _checkpoint(tmp_path, _tokenizer_dir(tmp_path), "float32", config_names_it=True)
    out, ck = tmp_path / "o", tmp_path / "gates.pt"
    code = main([str(a) for a in ["prune", path, "--ratio", "0.3", "--score", "learned", "--learn-steps", "4",
                                  "--learn-checkpoint", ck, "--samples", "4", "--seq-len", "16", "--quiet",
                                  "--no-speed", "--out", out, "--seed", "7"]])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["score"] == "learned" and report["settings"]["learned"]["steps"] == 4
    assert report["settings"]["learned"]["seed"] == 7  # --seed was recorded, and the gates' noise drew from 0
    assert "hard-concrete gates" in report["recipe"] and ck.exists()
    assert report["heads_pruned"] == int(0.3 * report["heads_total"])
    assert "0" not in report["pruned_heads"]  # the default's first layer kept whole, as the sweep measures
    assert report["settings"]["protect_layers"] == [0] and "layer 0 kept whole" in report["recipe"]
    # the gates trained for the budget the selection applied: the first layer's stayed open, and the
    # others' open fraction is what the selection keeps of them (it was 1 - ratio over every head)
    learned, first = report["settings"]["learned"], report["settings"]["learned"]["scores"][0]
    assert first == [3.0] * len(first)
    others = report["heads_total"] - len(first)
    assert learned["target_open"] == pytest.approx(1 - report["heads_pruned"] / others)
    code = main([str(a) for a in ["prune", path, "--ratio", "0.5", "--score", "learned", "--min-heads-per-layer", "0",
                                  "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed", "--out", tmp_path / "o5"]])
    assert code == 2 and "--ratio 0.5: the selection removes every head of the layers it may prune (layers [0] are " \
        "kept whole), so learned gates have nothing to rank" in capsys.readouterr().err  # it named --count None
    code = main([str(a) for a in ["prune", path, "--ratio", "0.5", "--score", "learned", "--order", "high",
                                  "--quiet", "--no-speed", "--out", tmp_path / "o3"]])
    assert code != 0 and "--order: learned gates" in capsys.readouterr().err
    code = main([str(a) for a in ["prune", path, "--ratio", "0.5", "--learn-seconds", "5", "--samples", "4",
                                  "--seq-len", "16", "--quiet", "--no-speed", "--out", tmp_path / "o2"]])
    assert code != 0 and "only --score learned trains gates" in capsys.readouterr().err
    code = main([str(a) for a in ["prune", path, "--ratio", "0.5", "--learn-steps", "5", "--samples", "4",
                                  "--seq-len", "16", "--quiet", "--no-speed", "--out", tmp_path / "o2"]])
    assert code != 0 and "--learn-steps/--learn-seconds/--learn-checkpoint: only --score learned trains gates" in \
        capsys.readouterr().err  # it was ignored, without a word, where the other two were refused
    # a budget that ends the training before the gates reach it is said (the report held both numbers only)
    code = main([str(a) for a in ["prune", path, "--ratio", "0.3", "--score", "learned", "--learn-seconds", "0.001",
                                  "--samples", "4", "--seq-len", "16", "--quiet", "--no-speed", "--out", tmp_path / "o4"]])
    err = capsys.readouterr().err
    learned = json.loads((tmp_path / "o4" / "report.json").read_text())["settings"]["learned"]
    assert code == 0 and learned["stopped"] == "time_budget", (err, learned)
    assert learned["open_fraction"] > learned["target_open"] + 0.05, learned
    assert re.search(r"--learn-seconds: the gates' training stopped at step \d+, before their open fraction came "
                     rf"down to the budget \(\d\.\d\d against {learned['target_open']:.2f}\)", err), err


def test_sweep_compares_learned_gates_under_the_same_removal(monkeypatch):
    """The learned recipe trains once per ratio (shared across evaluation texts through the
    cache), keeps the default's protected layers and is evaluated like every recipe."""
    import headprune.app.sweep as S
    from headprune.app.load import Loaded

    model = tiny_model("llama", num_hidden_layers=3)
    batches = _batches()
    scores = collect(model, batches, progress=False, moments=True)
    seen = []
    monkeypatch.setattr(S, "quality", lambda *a, **k: {"perplexity": 1.0})
    cache = {}
    recipes = {k: {**kw, "learned": {"steps": 3, "cache": cache}} for k, kw in S.LEARNED_RECIPE.items()}
    config = S.SweepConfig(model="tiny", ratios=[0.25, 0.5], seeds=1, gqa="query", quiet=True, eval_windows=1)
    loaded = Loaded(model, None, "causal", "tiny")
    real = S.learned_scores
    monkeypatch.setattr(S, "learned_scores", lambda *a: seen.append(a[4]) or real(*a))
    first = S.run_sweep(config, loaded, scores, [], {"data": "x"}, recipes, batches=batches)
    again = S.run_sweep(config, loaded, scores, [], {"data": "x"}, recipes, batches=batches)
    assert seen == [0.25, 0.5, 0.25, 0.5] and len(cache) == 2  # trained twice, not four times
    (name,) = S.LEARNED_RECIPE
    assert first["heads"][name] == again["heads"][name]
    assert all("0" not in h for h in first["heads"][name])  # layer 0 protected, as the default
    assert [r["steps"] for r in first["learned"][name]] == [3, 3]
    heads = sum(scores.num_heads[1:])  # the gates of the protected first layer do not train
    assert [r["target_open"] for r in first["learned"][name]] == pytest.approx(
        [1 - sum(map(len, h.values())) / heads for h in first["heads"][name]])
    json.dumps(first["recipe_settings"])
    with pytest.raises(ValueError, match="needs the batches"):
        S.run_sweep(config, loaded, scores, [], {"data": "x"}, recipes)
    # the same cache on a model of another layout trains its own gates
    other = tiny_model("llama", num_hidden_layers=4)
    other_scores = collect(other, batches, progress=False, moments=True)
    S.run_sweep(config, Loaded(other, None, "causal", "tiny"), other_scores, [], {"data": "x"}, recipes, batches=batches)
    assert len(cache) == 4


def test_a_checkpoint_needs_the_batches_as_a_list(tmp_path):
    """A resume compares the batches' digest with the checkpoint's; batches that are no sequence
    gave none, so a checkpoint of other text was resumed on without a word (learn_gates and
    recover share the check)."""
    from headprune.hf import prune_heads, recover

    class Reiterable:
        def __iter__(self):
            return iter(batches)

    model, batches = tiny_model("llama"), _batches()
    student = tiny_model("llama")
    prune_heads(student, {0: [0]})
    before = {k: v.clone() for k, v in student.state_dict().items()}
    for call in (lambda: recover(student, model, Reiterable(), steps=2, checkpoint=tmp_path / "r.pt"),
                 lambda: learn_gates(model, Reiterable(), ratio=0.5, steps=2, checkpoint=tmp_path / "g.pt")):
        with pytest.raises(ValueError, match=r"batches: a (recovery|learned-gates) with a checkpoint needs its batches "
                                             r"as a list \(a sequence\)"):
            call()
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items()) and not list(tmp_path.iterdir())
