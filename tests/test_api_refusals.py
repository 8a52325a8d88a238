"""Refusals by name of what reached torch or transformers before: no model, a model on the meta
device, batches of numpy arrays or longer than a learned position table, arguments of the wrong
type; a string read as a true flag. Each refused before the model or any file changes."""

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import headprune
from headprune.hf.generated import generated_batches
from test_api_inputs import _batches, _bert, _gpt2, _llama, _same, _state

META = "parameters are on the meta device"


def _meta_llama():
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                            num_key_value_heads=2, vocab_size=100, num_hidden_layers=2))


def test_no_model_is_refused_by_name(tmp_path):
    for call in (lambda: headprune.collect(None, _batches(1)), lambda: headprune.mask_heads(None, {0: [1]}),
                 lambda: headprune.prune_heads("llama", {0: [1]}), lambda: headprune.kept_heads(None),
                 lambda: headprune.save_pruned(None, tmp_path / "out"),
                 lambda: headprune.gates(None).__enter__()):
        with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module \(a transformers model\), got "):
            call()
    assert list(tmp_path.iterdir()) == []


def test_a_model_on_the_meta_device_is_refused_by_name(tmp_path):
    meta, batches = _meta_llama(), _batches(1)
    calls = {"model": [lambda: headprune.gradient_importance(meta, batches),
                       lambda: headprune.learn_gates(meta, batches, ratio=0.5, steps=1),
                       lambda: headprune.gates(meta).__enter__(),
                       lambda: headprune.save_pruned(meta, tmp_path / "out"),
                       lambda: generated_batches(meta, samples=1, seq_len=4, start=0)],
             "teacher": [lambda: headprune.recover(_llama(), meta, batches, steps=1, lr=1e-3)]}
    for name, fns in calls.items():
        for call in fns:
            with pytest.raises(ValueError, match=f"^{name}: {META}"):
                call()
    assert list(tmp_path.iterdir()) == []


def test_batches_torch_cannot_take_are_refused_by_name():
    ids = _batches(1)[0]["input_ids"]
    model, gpt2 = _llama(), GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    before = _state(model)
    cases = [({"input_ids": ids.numpy()}, TypeError, r"'input_ids' must be a torch tensor .* got ndarray"),
             ({"input_ids": ids.tolist()}, TypeError, r"'input_ids' must be a torch tensor .* got list"),
             ({"input_ids": ids, "attention_mask": np.ones(ids.shape)}, TypeError, "'attention_mask' must be a torch"),
             ({"input_ids": ids.to("meta")}, ValueError, "'input_ids' is on the meta device")]
    for batch, exc, match in cases:
        with pytest.raises(exc, match=f"^batches: {match}"):
            headprune.collect(model, [batch], progress=False)
        with pytest.raises(exc, match=f"^batches: {match}"):
            headprune.gradient_importance(model, [{"attention_mask": torch.ones_like(ids), **batch}])
    with pytest.raises(ValueError, match=r"^batches: token ids run from"):
        headprune.gradient_importance(model, [{"input_ids": ids + 1000, "attention_mask": torch.ones_like(ids)}])
    assert _same(model, before)
    long = {"input_ids": torch.randint(0, 100, (2, 17)), "attention_mask": torch.ones(2, 17, dtype=torch.long)}
    for call in (lambda: headprune.collect(gpt2, [long], progress=False),
                 lambda: headprune.learn_gates(gpt2, [long], ratio=0.5, steps=1),
                 lambda: headprune.gradient_importance(gpt2, [long]),
                 lambda: headprune.collect(_bert(), [{**long, "input_ids": torch.randint(0, 100, (2, 65)),
                                                      "attention_mask": torch.ones(2, 65, dtype=torch.long)}])):
        with pytest.raises(ValueError, match=r"^batches: sequences of (17|65) tokens are more than the (16|64) "
                                             "learned positions"):
            call()
    with pytest.raises(ValueError, match=r"^batches: a batch needs input_ids"):
        headprune.layer_costs(model, [{"inputs": ids}], headprune.collect(model, _batches(1), moments=True))


def test_arguments_of_the_wrong_type_are_refused_before_the_work():
    model, batches = _llama(), _batches(2)
    with pytest.raises(ValueError, match=r"^context: expected a positive int, got -1"):
        headprune.measure(model, context=-1)
    for bad in (2.5, True, float("nan"), "8"):
        with pytest.raises(ValueError, match=r"^context: expected a positive int"):
            headprune.measure(model, context=bad)
    got = headprune.measure(model, context=np.int64(8))
    assert got == headprune.measure(model, context=8) and type(got["context"]) is int
    with pytest.raises(TypeError, match=r"^dtype: expected a torch float type"):
        headprune.measure(model, dtype="float16")
    with pytest.raises(TypeError, match=r"^keep_start: expected a bool, got int"):
        generated_batches(model, samples=1, seq_len=4, start=0, keep_start=3)
    with pytest.raises(ValueError, match=r"^seed: expected an int in \[-2\*\*63, 2\*\*64\), got 1.5"):
        generated_batches(model, samples=1, seq_len=4, start=0, seed=1.5)
    for kw, match in [({"scores": "x"}, r"^scores: expected HeadScores"), ({"collect_fn": "x"}, r"^collect_fn: expected a"),
                      ({"on_step": "x"}, r"^on_step: expected a callable"),
                      ({"compensate": "no"}, r"^compensate: expected a bool, got str")]:
        with pytest.raises(TypeError, match=match):
            headprune.select_iteratively(model, batches, ratio=0.5, steps=2, **kw)
    with pytest.raises(TypeError, match=r"^checkpoint: expected a file path, got int"):
        headprune.collect(model, batches, checkpoint=3)
    with pytest.raises(TypeError, match=r"^allow_empty: expected a bool, got str"):
        headprune.collect(model, batches, allow_empty="no")


def test_numbers_of_numpy_and_torch_are_taken_as_python_numbers():
    scores = headprune.collect(_gpt2(), _batches(2), moments=True, progress=False)
    want = headprune.select_heads(scores, ratio=0.5, protect_layers=[], damping=0.05)
    assert headprune.select_heads(scores, ratio=0.5, protect_layers=[], damping=torch.tensor(0.05, dtype=torch.float64)) == want
    with pytest.raises(ValueError, match="damping: expected a finite non-negative number"):
        headprune.select_heads(scores, ratio=0.5, protect_layers=[], damping=torch.tensor([0.05]))
    teacher, batches = _llama(), _batches(2)
    report = headprune.recover(headprune.prune_heads(s := _llama(), {0: [1]}) and s, teacher, batches, steps=None,
                               lr=1e-3, time_budget_s=np.float32(0.5))
    assert report.steps >= 1
    for bad in (np.float32("nan"), torch.tensor([1.0]), True, 0):
        with pytest.raises(ValueError, match="time_budget_s: expected a positive number"):
            headprune.recover(s, teacher, batches, steps=1, lr=1e-3, time_budget_s=bad)


def test_batches_of_padding_alone_are_refused():
    """Every statistic was NaN (rows=0), refused later by whatever read them, less clearly."""
    ids = torch.randint(0, 100, (2, 8))
    for model in (_llama(), _bert()):
        with pytest.raises(ValueError, match="^batches: every query position is padding"):
            headprune.collect(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}], progress=False)
        empty = headprune.collect(model, [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}],
                                  progress=False, allow_empty=True)
        assert int(empty.count.sum()) == 0


def test_a_uniform_budget_the_kept_minimum_rules_out_names_the_minimum():
    from headprune.app.cli import _message

    scores = headprune.collect(_llama(), _batches(1), progress=False)
    with pytest.raises(ValueError, match="removes none; lower min_heads_per_layer$") as e:
        headprune.select_heads(scores, count=2, uniform=True, min_heads_per_layer=4, protect_layers=[])
    assert "keeps --min-heads-per-layer 4 heads per layer" in _message(e.value, "prune")


@pytest.mark.parametrize("offloaded", ["layer 1", "layer 0", "embeddings", "all (cpu_offload)"])
def test_a_model_accelerate_offloaded_is_no_meta_model(tmp_path, offloaded):
    """Its offloaded weights are on the meta device and accelerate's hooks load them for each
    forward: recovery (from a teacher too large for memory), gates, gradient importance, learned
    gates and sampling run on it (the meta-device refusal stopped them; inputs and gates were put
    on the meta device where the first parameter is offloaded)."""
    accelerate = pytest.importorskip("accelerate")
    from hf_tiny import tiny_batch, tiny_config

    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_config("llama")).eval()
    teacher = LlamaForCausalLM(tiny_config("llama")).eval()
    teacher.load_state_dict(plain.state_dict())
    if offloaded.startswith("all"):
        teacher = accelerate.cpu_offload(teacher, execution_device="cpu")
    else:
        where = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
                 "model.rotary_emb": "cpu", "lm_head": "cpu"}
        where[{"layer 1": "model.layers.1", "layer 0": "model.layers.0", "embeddings": "model.embed_tokens"}[offloaded]] \
            = "disk"
        teacher = accelerate.dispatch_model(teacher, device_map=where, offload_dir=str(tmp_path))
    assert any(p.is_meta for p in teacher.parameters())
    batch = tiny_batch("llama")
    with pytest.raises(ValueError, match=r"^model: parameters are on the meta device \(offloaded by accelerate"):
        headprune.collect(teacher, [batch], progress=False)  # collection needs them loaded: said as such
    torch.testing.assert_close(headprune.gradient_importance(teacher, [batch]),
                               headprune.gradient_importance(plain, [batch]), equal_nan=True)
    with headprune.gates(teacher):
        torch.testing.assert_close(teacher(**batch).logits, plain(**batch).logits)
    got = generated_batches(teacher, samples=1, seq_len=4, start=0)
    assert got[0]["input_ids"].device.type == "cpu"
    assert torch.equal(got[0]["input_ids"], generated_batches(plain, samples=1, seq_len=4, start=0)[0]["input_ids"])
    assert headprune.learn_gates(teacher, [batch], ratio=0.25, steps=1).steps == 1
    student = LlamaForCausalLM(tiny_config("llama")).eval()
    student.load_state_dict(plain.state_dict())
    headprune.prune_heads(student, {1: [0]})
    assert headprune.recover(student, teacher, [batch], steps=1, lr=1e-3).steps == 1
    # the command line's evaluation and speed comparison put their inputs where the forward runs
    from headprune.app import evaluate as E
    from headprune.hf.speed import compare

    class Tok:
        def __call__(self, text, add_special_tokens=False, verbose=True):
            return {"input_ids": [int(w) for w in text.split()]}

    text = [" ".join(str(i % 50) for i in range(40))]
    assert E.perplexity(teacher, Tok(), text, window=16, stride=16) == E.perplexity(plain, Tok(), text, window=16,
                                                                                     stride=16)
    assert E.throughput(teacher, seq_len=4, repeat=1)["tokens_per_s"] > 0
    rows = compare({"plain": plain, "offloaded": teacher}, prefill=[(1, 4)], decode=[(1, 4)], steps=1, rounds=3)
    assert {r["kind"] for r in rows} == {"prefill", "decode"}


def test_positions_are_counted_as_the_model_numbers_them():
    """RoBERTa and OPT number the real tokens only, and explicit position_ids (packed sequences)
    are what a table is indexed with: padded or packed batches longer than the table collect as
    before; only positions past the table are refused."""
    from hf_tiny import tiny_model

    for family in ("roberta", "opt"):
        model = tiny_model(family)
        limit = headprune.hf.speed.position_limit(model)
        ids = torch.randint(5, 90, (2, limit + 2))
        mask = torch.ones_like(ids)
        ids[:, limit:], mask[:, limit:] = model.config.pad_token_id, 0
        assert int(headprune.collect(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
                   .count.sum()) > 0
        with pytest.raises(ValueError, match=f"^batches: sequences of {limit + 1} tokens are more than the {limit} "):
            headprune.collect(model, [{"input_ids": ids[:, : limit + 1].clamp(min=5),
                                       "attention_mask": torch.ones_like(ids[:, : limit + 1])}], progress=False)
    gpt2 = tiny_model("gpt2")
    limit = headprune.hf.speed.position_limit(gpt2)
    ids = torch.randint(5, 90, (2, limit + 8))
    packed = torch.arange(limit + 8).remainder(limit // 2).expand(2, -1)
    assert int(headprune.collect(gpt2, [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "position_ids": packed}], progress=False).count.sum()) > 0
    with pytest.raises(ValueError, match=f"^batches: 'position_ids' run to {limit + 7}, more than the {limit} "):
        headprune.collect(gpt2, [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                  "position_ids": torch.arange(limit + 8).expand(2, -1)}], progress=False)


def test_roberta_positions_are_counted_from_its_padding_id():
    """RoBERTa numbers the tokens that are not its padding id (not the attention mask's), every
    position of inputs_embeds, and takes given position_ids as table rows: its own position ids
    of a full-length sequence were refused, and a mask zeroing real tokens let a raw index error
    through."""
    from hf_tiny import tiny_model

    model = tiny_model("roberta")
    rows, limit, pad = model.config.max_position_embeddings, headprune.hf.speed.position_limit(model), \
        model.config.pad_token_id
    ids = torch.randint(5, 90, (2, limit))
    own = torch.cumsum(ids.ne(pad), 1) + pad  # what RoBERTa computes itself: up to limit + pad = rows - 1
    assert int(own.max()) == rows - 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": own}
    assert int(headprune.collect(model, [batch], progress=False).count.sum()) > 0
    longer = torch.randint(5, 90, (2, limit + 2))
    mask = torch.ones_like(longer)
    mask[:, -2:] = 0  # real tokens the mask leaves out: RoBERTa numbers them all the same
    for bad in ({"input_ids": longer, "attention_mask": mask},
                {"inputs_embeds": torch.randn(2, limit + 2, model.config.hidden_size), "attention_mask": mask}):
        with pytest.raises(ValueError, match=f"^batches: sequences of {limit + 2} tokens are more than the {limit} "):
            headprune.collect(model, [bad], progress=False)


def test_what_an_offloaded_model_cannot_do_is_refused_by_name(tmp_path):
    """An offloaded student was trained (its weights are reloaded for each forward, and the run
    failed inside on them); a pruned layout that load_pruned rebuilds was written from memory and
    failed inside safetensors; a meta model with a device map set by hand passed as offloaded."""
    accelerate = pytest.importorskip("accelerate")
    from hf_tiny import tiny_batch, tiny_config

    where = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}
    student = LlamaForCausalLM(tiny_config("llama")).eval()
    headprune.prune_heads(student, {0: [1]})  # an uneven layout: written by headprune, not save_pretrained
    student = accelerate.dispatch_model(student, device_map=where, offload_dir=str(tmp_path / "off"))
    batch = tiny_batch("llama")
    with pytest.raises(ValueError, match=f"^student: {META}"):
        headprune.recover(student, LlamaForCausalLM(tiny_config("llama")).eval(), [batch], steps=1, lr=1e-3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("kept")
    with pytest.raises(ValueError, match="^model: has weights accelerate offloaded"):
        headprune.save_pruned(student, tmp_path / "out", overwrite=True)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    meta = _meta_llama()
    meta.hf_device_map = {"": "cpu"}
    for call in (lambda: headprune.gradient_importance(meta, [batch]), lambda: headprune.gates(meta).__enter__()):
        with pytest.raises(ValueError, match=f"^model: {META}"):
            call()
    for seed in (torch.tensor(True), torch.tensor([3])):
        with pytest.raises(ValueError, match="^seed: expected an int"):
            generated_batches(_llama(), samples=1, seq_len=4, start=0, seed=seed)


def test_offloaded_by_hooks_alone_and_negative_positions_are_refused_by_name(tmp_path):
    """cpu_offload leaves no device map, so save_pretrained writes the meta placeholders and
    failed inside safetensors; negative position_ids (a cumulative sum minus one under left
    padding) failed inside the embedding."""
    accelerate = pytest.importorskip("accelerate")
    from hf_tiny import tiny_model

    model = accelerate.cpu_offload(_gpt2(), execution_device="cpu")
    with pytest.raises(ValueError, match="^model: has weights accelerate offloaded"):
        headprune.save_pruned(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    ids = torch.randint(5, 90, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for family in ("gpt2", "bert"):
        with pytest.raises(ValueError, match="^batches: 'position_ids' go down to -1, below the position table"):
            headprune.collect(tiny_model(family), [{"input_ids": ids, "attention_mask": mask,
                                                    "position_ids": mask.cumsum(1) - 1}], progress=False)


def test_an_accelerator_index_is_read_as_accelerate_reads_it(monkeypatch):
    """An integer execution device was always taken as CUDA's (accelerate maps it to the host's
    accelerator: xpu, npu, ...)."""
    pytest.importorskip("accelerate")
    import accelerate.utils.modeling as am

    from headprune.core.modules import _execution_device

    class Hook:
        execution_device = 1

    here = am.normalize_device(1)  # this host's reading (1: CUDA's index)
    assert _execution_device(Hook()) == (f"cuda:{here}" if isinstance(here, int) else here)
    monkeypatch.setattr(am, "normalize_device", lambda d: f"xpu:{d}")
    assert _execution_device(Hook()) == "xpu:1"
    assert _execution_device(type("Seq", (), {"hooks": [type("H", (), {"execution_device": None})(), Hook()]})()) \
        == "xpu:1"
