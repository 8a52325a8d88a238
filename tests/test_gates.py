"""Differentiable head gates on tiny random models of every family and attention backend."""

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from hf_tiny import EAGER_ONLY, FAMILIES, tiny_batch, tiny_model
from numerics import assert_same_function, float64_output

import headprune
from headprune.hf import gates, mask_heads, prune_heads, resolve_sites
from headprune.hf.adapters import get_adapter, head_dim

BACKENDS = [(f, b) for f in FAMILIES for b in ("sdpa", "eager") if not (b == "sdpa" and f in EAGER_ONLY)]


def _first(out):
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _run(model, batch):
    return _first(model(**batch))


def _heads(family):
    """Uneven removal with a whole layer gone, as a ``{site: [heads]}`` dict."""
    if family == "t5":
        return {0: [1], 1: [0, 1, 2, 3], 2: [2, 3], 4: [0], 5: [0, 1, 2, 3]}
    return {0: [0, 1, 2, 3], 1: [1]}


def _binary(g, heads):
    gate = torch.ones(g.shape)
    for site, hs in heads.items():
        gate[site, hs] = 0.0
    return gate


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()))


def _assert_untouched(model, snapshot):
    state, hooks = snapshot
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("family, backend", BACKENDS)
def test_binary_gates_equal_masking_and_pruning(family, backend):
    model = tiny_model(family, attn_implementation=backend)
    batch, heads = tiny_batch(family), _heads(family)
    before = _snapshot(model)
    with torch.no_grad():
        original = _run(model, batch)
        with gates(model) as g:
            assert g.gate.shape == (len(resolve_sites(model)), 4) and g.gate.requires_grad
            assert torch.equal(_run(model, batch), original)  # all-one gates change nothing
            g.gate = _binary(g, heads)
            gated = _run(model, batch)
        _assert_untouched(model, before)
        assert torch.equal(_run(model, batch), original)
        with mask_heads(model, heads):
            masked = _run(model, batch)
        pruned = copy.deepcopy(model)
        prune_heads(pruned, heads)
        out = _run(pruned, batch)
    assert_same_function({"gated": gated, "masked": masked, "pruned": out},
                         float64_output(pruned, batch, _run))


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_soft_gates_scale_the_heads_output(family):
    """A gate c on a head computes what scaling its output-projection columns by c does."""
    model = tiny_model(family)
    batch = tiny_batch(family)
    adapter = get_adapter(model)
    scaled = copy.deepcopy(model)
    values = 0.25 + torch.rand(len(resolve_sites(model)), 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for site in resolve_sites(scaled, adapter):
            w, d = site.o.weight, head_dim(site, adapter)
            cols = values[site.index].repeat_interleave(d)
            w.mul_(cols[:, None] if adapter.conv1d else cols[None, :])
        with gates(model, values=values):
            gated = _run(model, batch)
        ref = _run(scaled, batch)
    assert_same_function({"gated": gated, "scaled": ref}, float64_output(scaled, batch, _run))


def _readout(out):
    w = torch.linspace(-1.0, 1.0, out.shape[-1], dtype=out.dtype)
    return (out * w).sin().sum()


# families computed wholly in float64 once converted: the RMS norms of Llama-like families and
# T5 round to float32 inside, ~1e-7 of noise on the loss that swamps a finite difference
@pytest.mark.parametrize("family, per_example", [("gpt2", False), ("bert", False), ("opt", False), ("opt", True)])
def test_gate_gradients_match_finite_differences(family, per_example):
    model = tiny_model(family).double()
    batch = tiny_batch(family, batch=2)
    sites = len(resolve_sites(model))
    shape = (2, sites, 4) if per_example else (sites, 4)
    values = (0.5 + torch.rand(shape, generator=torch.Generator().manual_seed(1))).double().requires_grad_()
    assert torch.autograd.gradcheck(_gated_loss(model, batch, per_example), (values,), eps=1e-6, atol=1e-6,
                                    rtol=1e-4)


def _gated_loss(model, batch, per_example):
    """``values -> readout`` of the model gated by ``values``."""
    def f(values):
        with gates(model, values=values, per_example=per_example):
            return _readout(_run(model, batch))

    return f


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_per_example_gates_act_row_by_row(family):
    """Row b of a per-example run is row b of a run with row b's gates for every row, and its
    gradient is that run's gradient restricted to row b's loss."""
    model = tiny_model(family)
    batch = tiny_batch(family, batch=3)
    sites = len(resolve_sites(model))
    values = torch.rand(3, sites, 4, generator=torch.Generator().manual_seed(2)).requires_grad_()
    with gates(model, per_example=True) as g:
        assert g.gate is None
        g.gate = values
        out = _run(model, batch)
    rows = [_readout(out[b]) for b in range(3)]
    for b in range(3):
        (grad,) = torch.autograd.grad(rows[b], values, retain_graph=True)
        assert (grad[[i for i in range(3) if i != b]] == 0).all()
        shared = values[b].detach().clone().requires_grad_()
        with gates(model, values=shared):
            ref = _run(model, batch)
        torch.testing.assert_close(out[b], ref[b], rtol=0, atol=0)
        _readout(ref[b]).backward()
        torch.testing.assert_close(grad[b], shared.grad, rtol=1e-5, atol=1e-6)
        other = ref[(b + 1) % 3]
        assert not torch.allclose(out[(b + 1) % 3], other)  # the other rows' gates differ


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "t5"])
def test_zero_gate_gives_the_masked_models_weight_gradients(family):
    model = tiny_model(family)
    batch, heads = tiny_batch(family), _heads(family)
    adapter = get_adapter(model)
    masked = copy.deepcopy(model)
    with gates(model) as g:
        g.gate = _binary(g, heads)
        _readout(_run(model, batch)).backward()
    with mask_heads(masked, heads):
        _readout(_run(masked, batch)).backward()
        removed = {}  # the masked model's zeroed o columns see the head's output; gated ones see 0
        for site, hs in heads.items():
            s = resolve_sites(model, adapter)[site]
            d, dim = head_dim(s, adapter), 0 if adapter.conv1d else 1
            cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in hs])
            removed[id(s.o.weight)] = (cols, dim)
    checked = 0
    for (name, p), q in zip(model.named_parameters(), masked.parameters()):
        if p.grad is None:  # unused by the output (BERT's pooler)
            assert q.grad is None, name
            continue
        if id(p) in removed:
            cols, dim = removed[id(p)]
            assert (p.grad.index_select(dim, cols) == 0).all(), name
            keep = torch.ones(p.shape[dim], dtype=torch.bool)
            keep[cols] = False
            p_grad, q_grad = (x.grad.index_select(dim, keep.nonzero()[:, 0]) for x in (p, q))
            checked += 1
        else:
            p_grad, q_grad = p.grad, q.grad
        assert torch.equal(p_grad, q_grad), name
    assert checked == sum(1 for hs in heads.values() if hs)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compiled_gated_model_equals_eager(family):
    """AOTAutograd traces forward and backward to ATen graphs (fullgraph: no break at the
    hooks); the graphs run eagerly, so the result is the eager one bit for bit."""
    model = tiny_model(family)
    batch = tiny_batch(family)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with gates(model) as g:
        for values in (0.5 + torch.rand(g.shape, generator=torch.Generator().manual_seed(3)), torch.ones(g.shape)):
            g.gate = values.clone().requires_grad_()
            eager = _run(model, batch)
            (eager_grad,) = torch.autograd.grad(_readout(eager), g.gate)
            out = _run(compiled, batch)
            (grad,) = torch.autograd.grad(_readout(out), g.gate)
            assert torch.equal(out, eager) and torch.equal(grad, eager_grad)
            assert eager_grad.abs().sum() > 0


def test_a_compiled_module_is_refused():
    """A torch.compile'd module run before the block kept its graph without the hooks: gates of 0
    gave the ungated output, with no gradient to the gates."""
    model = tiny_model("gpt2")
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(ValueError, match=r"^model: a torch.compile'd module runs the graph it compiled, which the "
                                         r"gates' hooks do not reach; pass the module it compiles \(model._orig_mod\)"):
        with gates(compiled):
            pass
    assert not model._forward_pre_hooks and all(not m._forward_pre_hooks for m in model.modules())
    for part in ("", "h.1"):  # compiled in place, the model or one layer: the same graph, run before
        model = tiny_model("gpt2")
        model.get_submodule(part).compile(backend="aot_eager")
        with pytest.raises(ValueError, match=rf"^model: {part or 'the model'} was compiled in place"):
            with gates(model):
                pass
        assert all(not m._forward_pre_hooks for m in model.modules())
    model = tiny_model("gpt2")
    model.h[1].mlp.compile(backend="aot_eager")  # holds no output projection of an attention: its graph is no matter
    with gates(model, init=0.0):
        pass


class _Boom(Exception):
    pass


def _boom(*args):
    raise _Boom


@pytest.mark.parametrize("where", ["entry", "block", "forward", "backward"])
def test_gates_are_removed_on_every_exit_path(where, monkeypatch):
    model = tiny_model("gpt2")
    batch = tiny_batch("gpt2")  # 3 rows
    before = _snapshot(model)
    with torch.no_grad():
        original = _run(model, batch)
    if where == "entry":  # the second site's hook fails to register: the first one's goes
        monkeypatch.setattr(resolve_sites(model)[1].o, "register_forward_pre_hook", _boom)
    with pytest.raises(ValueError if where == "forward" else _Boom):
        with gates(model, per_example=where == "forward") as g:
            if where == "block":
                raise _Boom
            if where == "forward":
                g.gate = torch.ones(2, *g.shape)
            out = _run(model, batch)
            g.gate.register_hook(_boom)
            _readout(out).backward()
    monkeypatch.undo()
    _assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(_run(model, batch), original)


def test_bad_gates_are_named():
    model = tiny_model("gpt2")
    batch = tiny_batch("gpt2")
    with pytest.raises(TypeError, match="init: expected a real number"):
        with gates(model, init="1"):
            pass
    for init in (float("nan"), 1e39):  # 1e39 overflowed float32 in torch.full
        with pytest.raises(ValueError, match=re.escape(f"init: expected a finite gate value within float32's range, got {init}")):
            with gates(model, init=init):
                pass
    with pytest.raises(TypeError, match="per_example: expected a bool"):
        with gates(model, per_example=3):
            pass
    with pytest.raises(ValueError, match=r"values: expected shape \[2, 4\] \(per_example=False\), got \[2, 3\]"):
        with gates(model, values=torch.ones(2, 3)):
            pass
    with pytest.raises(ValueError, match=r"values: expected shape \[batch, 2, 4\]"):
        with gates(model, values=torch.ones(2, 4), per_example=True):
            pass
    with gates(model, per_example=True) as g:
        with pytest.raises(TypeError, match="gate: expected a floating-point tensor"):
            g.gate = torch.ones(3, 2, 4, dtype=torch.long)
        with pytest.raises(ValueError, match=r"gate: per-example gates need a \[batch, 2, 4\] tensor"):
            _run(model, batch)
        g.gate = torch.ones(2, 2, 4)
        with pytest.raises(ValueError, match="gate: 2 per-example rows for a batch of 3 at site 0"):
            _run(model, batch)
    with pytest.raises(ValueError, match="model: unsupported model_type"):
        with gates(torch.nn.Linear(2, 2)):
            pass


def test_gates_are_exported_at_the_top_level():
    assert headprune.gates is gates and headprune.HeadGates is headprune.hf.HeadGates
    assert headprune.gradient_importance is headprune.hf.importance.gradient_importance
    assert {"gates", "HeadGates", "gradient_importance"} <= set(headprune.__all__)


def _head_mask_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "check_head_mask.py"
    spec = importlib.util.spec_from_file_location("check_head_mask", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gates_compute_transformers_4_head_mask():
    """transformers 4 (installed apart, see benchmarks/check_head_mask.py; absent in CI) on the same
    BERT and GPT-2 weights: the output and d/d(head_mask) equal the gates' to float64 rounding
    (a gate in the wrong place misses by the mask's effect, ~1e-1), and in float32 neither is
    further from the float64 result than the other's rounding allows."""
    check = _head_mask_check()
    if not Path(check.DEFAULT_TF4, "transformers").is_dir():
        pytest.skip(f"transformers 4 is not installed in {check.DEFAULT_TF4} (HEADPRUNE_TF4)")
    tensors, version = check.compute(check.DEFAULT_TF4)
    assert version.startswith("4.")
    rows = check.summary(tensors)
    assert len(rows) == 2 * 3 * 2
    for name, row in rows.items():
        bound = 1e-12 * max(1.0, row["reference_max_abs"])  # float64 rounding is ~1e-15 here
        assert row["float64_tf4_vs_sdpa"] <= bound and row["float64_tf4_vs_eager"] <= bound, (name, row)
        assert row.get("mask_effect", 1.0) > 1e3 * bound, (name, row)
    for key in [k[: -len(".tf4")] for k in tensors if k.endswith(".tf4") and ".float32." in k]:
        ref = tensors[f"{key}.sdpa".replace(".float32.", ".float64.")]
        assert_same_function({s: tensors[f"{key}.{s}"] for s in ("tf4", "sdpa", "eager")}, ref)


@pytest.mark.parametrize("bad, match", [
    (lambda b: {**b, "attention_mask": b["attention_mask"][:, :3]}, r"^batches: 'attention_mask' has shape \(3, 3\) "
                                                                    r"but 'input_ids' \(3, \d+\); they should match"),
    (lambda b: {**b, "input_ids": b["input_ids"].float()}, r"^batches: 'input_ids' are token ids, int64 or int32; got "
                                                           r"float32"),
    (lambda b: {**b, "input_ids": b["input_ids"].to(torch.uint8)}, r"^batches: 'input_ids' .* got uint8"),
])
def test_gradient_importance_and_learned_gates_name_a_bad_batch(bad, match):
    """They failed inside the model (a size mismatch, "Expected tensor for argument #1 'indices'")."""
    from headprune.hf import gradient_importance, learn_gates

    model = tiny_model("llama")
    batch = bad(tiny_batch("llama"))
    with pytest.raises((ValueError, TypeError), match=match):
        gradient_importance(model, [batch])
    with pytest.raises((ValueError, TypeError), match=match):
        learn_gates(model, [batch], ratio=0.5, steps=1)


def test_gradient_importance_of_int32_ids():
    """The causal loss's labels were the ids as given: int32 failed in the loss."""
    from headprune.hf import gradient_importance

    import transformers

    from hf_tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    batch = tiny_batch("llama")
    want = gradient_importance(model, [batch])
    got = gradient_importance(model, [{**batch, "input_ids": batch["input_ids"].int()}])
    assert torch.equal(got, want)


def test_gradient_importance_passes_segments_and_positions():
    """gradient_importance called the model with input_ids and attention_mask alone: a batch's
    token_type_ids and position_ids were dropped without a word (collect and learn_gates pass them)."""
    from headprune.hf import gates, gradient_importance

    bert = tiny_model("bert", type_vocab_size=2)
    b = tiny_batch("bert", batch=4, seq=12, pad=False)
    segments = torch.zeros_like(b["input_ids"])
    segments[:, 6:] = 1
    assert not torch.equal(gradient_importance(bert, [{**b, "token_type_ids": segments}]), gradient_importance(bert, [b]))
    shared = torch.arange(12)[None]  # [1, L] positions, broadcast over the batch as transformers takes them
    assert torch.equal(gradient_importance(bert, [{**b, "position_ids": shared}]), gradient_importance(bert, [b]))
    import transformers

    from hf_tiny import tiny_config

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    c = tiny_batch("llama", pad=False)
    positions = torch.arange(c["input_ids"].shape[1]).expand_as(c["input_ids"]) + 7
    got = gradient_importance(llama, [{**c, "position_ids": positions}])
    with gates(llama) as g:  # the model's own loss on the same inputs
        llama(**c, position_ids=positions, labels=c["input_ids"]).loss.backward()
        want = g.gate.grad.abs().double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_gradient_importance_of_a_left_padded_sequence_is_the_unpadded_ones():
    """With left padding the first real token was a target predicted from a padding position."""
    import transformers

    from headprune.hf import gradient_importance
    from hf_tiny import tiny_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama")).eval()
    ids = torch.randint(3, 100, (1, 10))
    padded = {"input_ids": torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1),
              "attention_mask": torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)}
    want = gradient_importance(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    torch.testing.assert_close(gradient_importance(model, [padded]), want, rtol=1e-4, atol=1e-7)
