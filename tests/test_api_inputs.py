"""The Python API's refusals of statistics, batches, paths and modes that do not fit the call:
each names its argument, and the model and files stay as they were."""

import copy
import json

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import headprune
from headprune.app import texts

SMALL = dict(vocab_size=100, num_hidden_layers=2, max_position_embeddings=64)


def _llama(kv=2, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_key_value_heads=kv, **SMALL)).eval()


def _bert(seed=0):
    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, **SMALL)).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 16, dtype=torch.long)
        mask[1, -3:] = 0
        out.append({"input_ids": torch.randint(0, 100, (4, 16), generator=g), "attention_mask": mask})
    return out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


HEADS = {0: [1, 2], 1: [0, 3]}


def test_statistics_of_another_model_are_refused():
    """Only the head counts were compared: a BERT refit from GPT-2's or another BERT's moments
    was accepted, and its outputs were those of neither."""
    batches = _batches()
    own = headprune.collect(_bert(), batches, moments=True)
    gpt2 = headprune.collect(_gpt2(), batches, moments=True)
    other = headprune.collect(_bert(seed=7), batches, moments=True)
    for call in (lambda m, s: headprune.prune_heads(m, HEADS, reconstruct=s),
                 lambda m, s: headprune.mask_heads(m, HEADS, reconstruct=s),
                 lambda m, s: headprune.mask_heads(m, HEADS, compensate=s)):
        model = _bert()
        before = _state(model)
        with pytest.raises(ValueError, match=r"^(reconstruct|compensate): the scores were collected on a gpt2, not on"):
            call(model, gpt2)
        with pytest.raises(ValueError, match=r"site 0's output projection differs from the one the scores were "
                                             r"collected with \(relative change 1\.\d+\)"):
            call(model, other)
        assert _same(model, before)
    with pytest.raises(ValueError, match=r"^scores: the scores were collected on a gpt2"):
        headprune.select_measured(_bert(), batches, gpt2, ratio=0.25, gqa="query")
    with pytest.raises(ValueError, match=r"^scores: the scores were collected on a gpt2"):
        headprune.learn_gates(_bert(), batches, ratio=0.25, steps=1, scores=gpt2)
    llama2 = headprune.collect(_llama(kv=2), batches, moments=True)
    with pytest.raises(ValueError, match=r"another head layout \(\(query heads, KV heads, head size\) per site: "
                                         r"\[\(4, 2, 8\), \(4, 2, 8\)\]\) than the model's \(\[\(4, 4, 8\)"):
        headprune.prune_heads(_llama(kv=4), {1: [1]}, reconstruct=llama2)
    # its own statistics, after a cast to bfloat16 and while another site is masked, still fit
    model = _bert().to(torch.bfloat16)
    with headprune.mask_heads(model, {0: [1]}, reconstruct=own):
        headprune.mask_heads(model, {1: [0]}, reconstruct=own).restore()
    headprune.prune_heads(model, HEADS, reconstruct=own)


def test_statistics_without_moments_of_another_model_are_refused():
    """collect's default keeps no projection: another BERT's output means were accepted for mean
    compensation, further from the model's own than zeroing. Their columns' squared norms
    (which the output statistics hold) tell; a bfloat16 cast and a head masked at collection
    (an iterative round) still fit."""
    batches = _batches()
    own, other = headprune.collect(_bert(), batches), headprune.collect(_bert(seed=7), batches)
    for call in (lambda m, s: headprune.prune_heads(m, HEADS, compensate=s),
                 lambda m, s: headprune.mask_heads(m, HEADS, compensate=s)):
        model = _bert()
        before = _state(model)
        with pytest.raises(ValueError, match=r"^compensate: site 0's output projection differs from the one the "
                                             r"scores were collected with \(relative change of its columns' squared"):
            call(model, other)
        assert _same(model, before)
    model = _bert()
    with headprune.mask_heads(model, {0: [1]}, compensate=own):
        masked = headprune.collect(model, batches)
    headprune.mask_heads(model.to(torch.bfloat16), {0: [1, 2]}, compensate=masked).restore()
    headprune.prune_heads(model, HEADS, compensate=own)


def test_value_moments_of_another_model_are_refused():
    """Value moments were checked against the heads and the layout only: another BERT's were
    accepted, and the refit rewrote the kept heads' value rows from them."""
    batches = _batches()
    own = headprune.collect(_bert(), batches, moments=True)
    values = headprune.collect_values(_bert(), batches, HEADS)
    foreign = headprune.collect_values(_bert(seed=7), batches, HEADS)
    for call in (headprune.prune_heads, headprune.mask_heads):
        model = _bert()
        before = _state(model)
        with pytest.raises(ValueError, match=r"^values: site 0's output projection differs from the one the value "
                                             r"moments were collected with \(a relative change of 1\.\d+\)"):
            call(model, HEADS, reconstruct=own, values=foreign)
        assert _same(model, before)
    model = _bert()
    model.encoder.layer[1].attention.self.value.weight.data.mul_(1.5)  # the value rows changed since
    with pytest.raises(ValueError, match=r"^values: site 1's value projection differs .* \(a relative change of 0\.5\)"):
        headprune.mask_heads(model, HEADS, reconstruct=own, values=values)
    model = _bert()  # its own moments, on weights cast to bfloat16 and back, still fit
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    headprune.prune_heads(model, HEADS, reconstruct=own, values=values)


def test_a_config_edited_after_the_model_was_built_is_refused_before_pruning(tmp_path):
    """num_attention_heads = 8 on a built 4-head model: pruning recorded that config as the
    original, save_pruned wrote it, and load_pruned then refused the directory."""
    for build in (_llama, _bert):
        model = build()
        model.config.num_attention_heads = 8
        before = _state(model)
        with pytest.raises(ValueError, match=r"^model: its config describes \(query heads, KV heads, head size\) per "
                                             r"site \[\(8, .*its attention modules hold \[\(4, "):
            headprune.prune_heads(model, {0: [1]})
        assert _same(model, before) and not hasattr(model, "_headprune_state")
        model.config.num_attention_heads = 4  # restored: pruned, saved and loaded as before
        headprune.prune_heads(model, {0: [1]})
        headprune.save_pruned(model, tmp_path / build.__name__)
        assert _same(headprune.load_pruned(tmp_path / build.__name__), model.state_dict())


class _Scaled(LlamaForCausalLM):
    """A subclass that its config alone does not build."""

    def __init__(self, config, scale):
        super().__init__(config)
        self.scale = scale


def test_a_model_its_config_alone_does_not_build_is_still_pruned_in_memory():
    """The config check of the first pruning builds the model from its config; a subclass
    taking other arguments cannot be built so, and was refused, where it pruned before."""
    torch.manual_seed(0)
    model = _Scaled(_llama().config, scale=2.0).eval()
    ids = torch.randint(0, 100, (2, 8))
    with headprune.mask_heads(model, {0: [1]}):
        masked = model(input_ids=ids).logits
    headprune.prune_heads(model, {0: [1]})
    torch.testing.assert_close(model(input_ids=ids).logits, masked, rtol=1e-5, atol=1e-5)


def test_measured_costs_refuse_batches_other_than_the_calibration():
    """The measured sequences' moments are taken out of the scores'; another text's made the
    refit's moments indefinite, and the costs stopped growing with the heads removed."""
    model, batches = _bert(), _batches()
    scores = headprune.collect(model, batches, moments=True)
    headprune.layer_costs(model, batches, scores)
    with pytest.raises(ValueError, match=r"^batches: 4 of the first 4 sequences, which the costs are measured on, are "
                                         r"not among the sequences the scores' second moments were collected on"):
        headprune.layer_costs(model, _batches(seed=99), scores)
    scores.moments.sequences = None  # moments that do not say which sequences: the remainder is checked
    with pytest.raises(ValueError, match=r"^batches: site \d+ .* are no second moments; pass the calibration batches"):
        headprune.layer_costs(model, _batches(seed=99), scores)


def test_calibration_batches_name_their_arguments(tiny_tokenizer):
    """A bare string was split into characters; sizes of the wrong type failed deep inside."""
    tok = tiny_tokenizer
    kw = dict(causal=True, samples=2, seq_len=4)
    with pytest.raises(TypeError, match=r"^paragraphs: expected a list of str .* got str"):
        texts.calibration_batches(tok, "one paragraph of text", **kw)
    for bad, match in ((dict(samples=2.0), r"^samples \(--samples\): expected an int, got float"),
                       (dict(samples=None), r"^samples \(--samples\): expected an int, got NoneType"),
                       (dict(seq_len=1), r"^seq_len \(--seq-len\): expected at least 2, got 1"),
                       (dict(batch_size=0), r"^batch_size: expected at least 1, got 0"),
                       (dict(causal="yes"), r"^causal: expected a bool, got str")):
        with pytest.raises((TypeError, ValueError), match=match):
            texts.calibration_batches(tok, ["a b c d e f g h i j"] * 4, **{**kw, **bad})
    with pytest.raises(ValueError, match=r"^samples \(--samples\): expected at least 0, got -1"):
        texts.reference_batches(tok, samples=-1, seq_len=4, causal=True)
    assert texts.reference_batches(tok, samples=0, seq_len=4, causal=True) == []


@pytest.fixture
def tiny_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a b c d e f g h i j one paragraph of text".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")


def test_a_checkpoint_path_holding_another_file_is_refused(tmp_path):
    """Without resume the file was written over, whatever it was."""
    batches = _batches(2)
    path = tmp_path / "notes.json"
    runs = {"collect": lambda **kw: headprune.collect(_llama(), batches, checkpoint=path, **kw),
            "learned-gates": lambda **kw: headprune.learn_gates(_llama(), batches, ratio=0.3, steps=1, checkpoint=path,
                                                                **kw),
            "recovery": lambda **kw: headprune.recover(_pruned(), _llama(), batches, steps=1, checkpoint=path, **kw)}
    for what, run in runs.items():
        path.write_text('{"my": "notes"}')
        kind = "headprune" if what == "collect" else what
        with pytest.raises(ValueError, match=rf"^checkpoint: .*notes.json exists and is not a {kind} checkpoint"):
            run()
        assert path.read_text() == '{"my": "notes"}'
        path.unlink()
        run()  # written
        run()  # its own checkpoint is written over without resume, as before
        path.unlink()


def _pruned():
    model = _llama()
    headprune.prune_heads(model, {1: [1, 2]})
    return model


def test_arguments_of_the_wrong_kind_are_named():
    model, batches = _llama(), _batches(2)
    for call in (lambda b: headprune.collect(model, b), lambda b: headprune.gradient_importance(model, b),
                 lambda b: headprune.collect_values(_bert(), b, {0: [1]}),
                 lambda b: headprune.layer_costs(model, b, headprune.collect(model, batches, moments=True))):
        with pytest.raises(TypeError, match=r"^batches: expected an iterable of batches .* got NoneType"):
            call(None)
    with pytest.raises(TypeError, match=r"^fused: expected a bool, got str"):
        headprune.collect(model, batches, fused="no")
    with pytest.raises(TypeError, match=r"^causal: expected True, False or None, got str"):
        headprune.gradient_importance(model, batches, causal="no")
    with pytest.raises(ValueError, match=r"^max_bytes: expected a positive number of bytes, got 'x'"):
        headprune.collect_values(_bert(), batches, {0: [1]}, max_bytes="x")
    scores = headprune.collect(model, batches, moments=True)
    for damping in ("x", float("inf")):  # ignored with compensate=; inf failed in the solve
        with pytest.raises(ValueError, match=r"^damping: expected a finite non-negative number"):
            headprune.mask_heads(model, {1: [1]}, compensate=scores, damping=damping)
        with pytest.raises(ValueError, match=r"^damping: expected a finite non-negative number"):
            headprune.prune_heads(model, {1: [1]}, reconstruct=scores, damping=damping)


def test_prune_heads_inside_gates_is_refused():
    """The gates are sized to the heads at the block's entry: the next forward failed."""
    model = _llama()
    before = _state(model)
    with headprune.gates(model):
        with pytest.raises(ValueError, match=r"^model: is inside a headprune.gates block"):
            headprune.prune_heads(model, {1: [1]})
    assert _same(model, before)
    headprune.prune_heads(model, {1: [1]})


def test_collection_inside_gates_is_refused():
    """collect and collect_values recorded the gated model (a head at gate 0 with mean output 0),
    which the refit and compensation then took for the ungated model's statistics."""
    model, batches = _llama(), _batches(1)
    with headprune.gates(model):
        with pytest.raises(ValueError, match=r"^model: is inside a headprune.gates block, whose gates would scale"):
            headprune.collect(model, batches)
        with pytest.raises(ValueError, match=r"^model: is inside a headprune.gates block; collect_values after"):
            headprune.collect_values(model, batches, {1: [1]})
    headprune.collect(model, batches)


def test_saving_inside_gates_is_refused(tmp_path):
    """save_pruned and export_gguf wrote the ungated weights of a model evaluated gated."""
    from headprune.hf.gguf_export import export_gguf

    model = _llama()
    with headprune.gates(model, init=0.0):
        with pytest.raises(ValueError, match=r"^model: is inside a headprune.gates block, whose gates the saved"):
            headprune.save_pruned(model, tmp_path / "out")
        with pytest.raises(ValueError, match=r"^model: is inside a headprune.gates block, whose gates the written"):
            export_gguf(model, tmp_path / "out.gguf")
    assert not list(tmp_path.iterdir())
    headprune.save_pruned(model, tmp_path / "out")


def test_pruning_nothing_leaves_the_model_unpruned(tmp_path):
    """prune_heads(m, {}) (select_heads' answer at ratio 0) marked the model as pruned, so
    statistics collected after it were refused as not of the unpruned model."""
    model, batches = _llama(), _batches(2)
    reference = copy.deepcopy(model)
    report = headprune.prune_heads(model, {})
    assert report.removed == {} and not hasattr(model, "_headprune_state")
    scores = headprune.collect(model, batches, moments=True)
    assert scores.head_ids is None
    headprune.measure_uniform(model, batches, scores, {1: [1, 2]}, sequences=1)
    # heads named twice failed after every measuring forward; a bool was taken as head 1
    for heads, match in (({1: [1, 1, 3]}, r"^heads: site 1 names a head more than once"),
                         ({1: [True, 3]}, r"^heads: layer 1: expected a list of head indices"),
                         ({1: [1, 9]}, r"^heads: layer 1 has 4 heads, got indices \[9\]")):
        with pytest.raises((TypeError, ValueError), match=match):
            headprune.measure_uniform(model, batches, scores, heads, sequences=1)
    ids = batches[0]["input_ids"]
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_subset_s_moments_taken_again_in_other_batch_shapes_still_leave_second_moments():
    """With fewer calibration tokens left than dimensions, the difference of the scores' moments
    and those of the measured sequences (taken again, in other batch shapes: their float32
    activations differ in the last bits) has eigenvalues near zero that the rounding pushes
    below it, -1.2e-6 of the largest diagonal entry on SmolLM2: still second moments; another
    text's tokens taken out leave eigenvalues of the order of the entries, refused."""
    from headprune.stats.moments import semidefinite

    torch.manual_seed(0)
    x = torch.randn(128, 576, dtype=torch.float64) * torch.rand(576, dtype=torch.float64) * 5
    part = x[:32].float()
    part = (part + part * torch.randn_like(part) * 6e-7).double()  # as SmolLM2 left: -1.2e-6 of the largest entry
    rest = x.T @ x - part.T @ part
    assert torch.linalg.eigvalsh(rest).min() < 0 and semidefinite(rest, torch.float64)
    other = torch.randn(32, 576, dtype=torch.float64) * torch.rand(576, dtype=torch.float64) * 5
    assert not semidefinite(x.T @ x - other.T @ other, torch.float64)


def test_records_on_a_module_inside_the_model_are_seen_by_calls_on_the_model(tmp_path):
    """A pruning's and a mask's records live on the module pruned or masked. The classifier
    pruned as a whole and its encoder saved wrote the unpruned config over pruned weights (a
    directory nothing loads); a compensated mask of the LM's base model saved through the LM
    left out the biases' record (plain from_pretrained dropped them); pruning the LM under that
    mask went ahead, and the mask's restore then restored nothing; so did pruning the base model
    of a masked LM."""
    import transformers

    from hf_tiny import tiny_config

    classifier = transformers.BertForSequenceClassification(tiny_config("bert")).eval()
    headprune.prune_heads(classifier, {0: [1], 1: [0, 3]})
    for call in (lambda: headprune.save_pruned(classifier.bert, tmp_path / "bert"),
                 lambda: headprune.kept_heads(classifier.bert), lambda: headprune.mask_heads(classifier.bert, {0: [2]})):
        with pytest.raises(ValueError, match=r"^model: is part of a model pruned or masked as a whole"):
            call()
    assert not (tmp_path / "bert").exists()
    assert headprune.kept_heads(torch.compile(classifier, backend="eager"))[0] == [0, 2, 3]  # the compiled model's own
    lm = _llama()
    before = _state(lm)
    handle = headprune.mask_heads(lm.model, {0: [1]})
    for call in (lambda: headprune.save_pruned(lm, tmp_path / "lm"), lambda: headprune.prune_heads(lm, {0: [3]}),
                 lambda: headprune.mask_heads(lm, {1: [0]}), lambda: headprune.kept_heads(lm)):
        with pytest.raises(ValueError, match=r"^model: its module 'model' was pruned or masked on its own"):
            call()
    handle.restore()
    assert _same(lm, before) and not (tmp_path / "lm").exists()
    headprune.save_pruned(lm, tmp_path / "lm")  # nothing left on the module: saved as a model never pruned
    handle = headprune.mask_heads(lm, {0: [1]})  # and the other way round: the whole masked, a part pruned
    with pytest.raises(ValueError, match=r"^model: is part of a model pruned or masked as a whole"):
        headprune.prune_heads(lm.model, {0: [3]})
    handle.restore()
    assert _same(lm, before)
    headprune.prune_heads(lm, {0: [0, 1], 1: [0, 1]})  # a pruned model's copy, and its plain directory loaded
    headprune.save_pruned(lm, tmp_path / "uniform")
    assert json.loads((tmp_path / "uniform" / "headprune.json").read_text())["plain_loadable"]
    for model in (copy.deepcopy(lm), headprune.load_pruned(tmp_path / "uniform")):
        with pytest.raises(ValueError, match=r"^model: is part of a model pruned or masked as a whole"):
            headprune.kept_heads(model.model)
        assert headprune.kept_heads(model) == headprune.kept_heads(lm)
        headprune.prune_heads(model, {1: [2]})  # the whole, as ever
