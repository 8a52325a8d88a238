"""Per-head attention entropies of a Hugging Face model, measured during its ordinary forward.

The hook is an attention function registered in transformers' ``AttentionInterface`` under
``headprune_<impl>``: it calls the implementation the model would have used (``sdpa``, the
family's own ``eager_attention_forward``, ...) with the untouched arguments, so outputs are
bit-identical, and feeds ``query``/``key``/mask/``scaling`` to the streaming entropy op. The
mask factory registered under the same name is the original one, so the mask the model
builds is exactly the one it would have built.

On CPU, a model in ``sdpa`` is by default (``fused=True``) served by the fused op instead:
one streaming pass over the logits yields the attention output and the statistics, so the
statistics cost little more than the attention itself. It mirrors
``transformers.integrations.sdpa_attention.sdpa_attention_forward`` (masks, causality, key
cropping, position bias, grouped-query attention); its outputs equal SDPA's to float
rounding rather than bit for bit.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import sys
import tempfile
import threading
import types
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Iterable, Optional, Union

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.integrations.sdpa_attention import create_position_bias_mask
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..distributed import layout_fingerprint
from ..scores import HeadScores, NUM_STATS, accumulate_attention_, accumulate_probs_, accumulate_qk_
from .adapters import get_adapter, head_counts, head_dim, resolve_sites

__all__ = ["collect", "METHODS"]

PREFIX = "headprune_"
METHODS = ("qk", "eager")

# id(attention module) -> recorder; the registered function is shared by every model, so
# it only records for modules inside an active collection.
_RECORDERS: dict = {}

# Softcapped logits cannot be expressed as q.k plus a mask; they are formed per chunk of
# queries of at most this many elements.
_SOFTCAP_CHUNK = 1 << 24
# Rows of an output projection's input converted to float64 at a time (output statistics).
_OUTPUT_CHUNK = 1024


def _inner_function(impl: str, module):
    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise NotImplementedError(f"{type(module).__name__}: no eager_attention_forward in its modeling file")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _make_wrapper(impl: str):
    def headprune_attention(module, query, key, value, attention_mask, *args, **kwargs):
        recorder = _RECORDERS.get(id(module))
        if recorder is not None:
            fused = recorder.attend(module, query, key, value, attention_mask, args, kwargs)
            if fused is not None:
                return fused
        out = _inner_function(impl, module)(module, query, key, value, attention_mask, *args, **kwargs)
        if recorder is not None:
            recorder.record(module, query, key, attention_mask, args, kwargs, out)
        return out

    return headprune_attention


_REGISTRY_LOCK = threading.Lock()
_REGISTRY_USERS: dict = {}  # wrapper name -> active collections using it
_REGISTRY_ADDED: dict = {}  # wrapper name -> the global mappings this module added it to


def registered_name(impl: str) -> str:
    """Register the recording wrapper of ``impl`` and its mask factory, for one user; every
    call is paired with :func:`release_name`, and the last release removes what was added."""
    name = PREFIX + impl
    with _REGISTRY_LOCK:
        if _REGISTRY_USERS.get(name, 0) == 0:
            added = []
            if name not in AttentionInterface._global_mapping:
                AttentionInterface.register(name, _make_wrapper(impl))
                added.append(AttentionInterface._global_mapping)
            mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl)
            if mask_fn is not None and name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
                AttentionMaskInterface.register(name, mask_fn)
                added.append(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
            _REGISTRY_ADDED[name] = added
        _REGISTRY_USERS[name] = _REGISTRY_USERS.get(name, 0) + 1
    return name


def release_name(name: str) -> None:
    """One user of ``name`` is done; the last one removes the entries it registered."""
    with _REGISTRY_LOCK:
        left = _REGISTRY_USERS.get(name, 0) - 1
        if left > 0:
            _REGISTRY_USERS[name] = left
            return
        _REGISTRY_USERS.pop(name, None)
        for mapping in _REGISTRY_ADDED.pop(name, []):
            mapping.pop(name, None)


def _configs(model) -> list:
    """Every distinct config object the model's modules read (T5's stacks hold copies)."""
    found, todo = {}, [getattr(m, "config", None) for m in model.modules()]
    while todo:
        c = todo.pop()
        if isinstance(c, PreTrainedConfig) and id(c) not in found:
            found[id(c)] = c
            todo.extend(getattr(c, k, None) for k in getattr(c, "sub_configs", {}))
    return list(found.values())


@contextmanager
def attention_implementation(model, impl: Optional[str] = None):
    """Switch every config of ``model`` to the recording wrapper of its implementation (or
    of ``impl``); restores the originals on any exit."""
    configs = _configs(model)
    saved = [(c, c._attn_implementation_internal) for c in configs]
    names = []
    try:
        for c, orig in saved:
            target = impl or orig or "eager"
            if target.startswith(PREFIX):
                raise RuntimeError("model: a headprune collection is already active on this model")
            names.append(registered_name(target))
            c._attn_implementation_internal = names[-1]
        yield
    finally:
        for c, orig in saved:
            c._attn_implementation_internal = orig
        for name in names:
            release_name(name)


def _fix_half_mask(mask):
    """Half-precision additive masks use ``finfo.min`` (-65504 in fp16), which the op would
    read as a finite logit: turn masked entries into ``-inf``."""
    if mask is not None and mask.dtype in (torch.float16, torch.bfloat16):
        mask = mask.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))
    return mask


def _effective_mask(impl, module, query, key, mask, kwargs):
    """``(key, attn_mask, is_causal)`` exactly as ``impl`` applies them."""
    q_len, k_len = query.shape[2], key.shape[2]
    bias = kwargs.get("position_bias")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 4):
        raise NotImplementedError(
            f"attention implementation {impl!r} hands a {getattr(mask, 'dim', lambda: '?')()}-D or non-tensor mask; "
            "collect with the model in 'sdpa' or 'eager'"
        )
    if impl == "eager":  # eager adds its (always explicit) mask and bias, nothing implicit
        if bias is not None:
            mask = bias if mask is None else (torch.where(mask, bias, float("-inf")) if mask.dtype == torch.bool else bias + mask)
        return key, _fix_half_mask(mask), False
    # mirrors transformers.integrations.sdpa_attention.sdpa_attention_forward
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    is_causal = bool(q_len > 1 and mask is None and is_causal)
    if is_causal and k_len > q_len:  # SDPA aligns is_causal top-left; transformers crops keys
        key = key[:, :, :q_len]
        bias = None if bias is None else bias[..., :q_len]
    if bias is not None:
        mask = create_position_bias_mask(bias, mask, is_causal, query, key)
        is_causal = False
    return key, _fix_half_mask(mask), is_causal


def _scale(query, kwargs) -> float:
    """The logit scale an attention call uses: its ``scaling``, else ``head_dim ** -0.5``."""
    scale = kwargs.get("scaling")
    return query.shape[-1] ** -0.5 if scale is None else scale


def _softcapped_stats(stats, query, key, scale, mask, softcap, query_mask):
    """Gemma-2 style ``tanh`` soft-capping, formed per chunk of queries and handed to the op
    as an additive mask over zero-dimensional q/k (exact; memory bounded by the chunk)."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1) if group > 1 else key
    b, h, q_len, _ = query.shape
    step = max(1, _SOFTCAP_CHUNK // max(1, b * h * k.shape[2]))
    for s in range(0, q_len, step):
        qc = query[:, :, s : s + step]
        z = torch.matmul(qc, k.transpose(-1, -2)) * scale
        z = torch.tanh(z / softcap) * softcap
        if mask is not None:
            mc = mask[..., s : s + step, :] if mask.shape[-2] > 1 else mask
            z = z.masked_fill(~mc, float("-inf")) if mc.dtype == torch.bool else z + mc
        zq = query.new_zeros(b, h, qc.shape[2], 1)
        zk = query.new_zeros(b, h, k.shape[2], 1)
        qm = None if query_mask is None else query_mask[:, s : s + step]
        accumulate_qk_(stats, zq, zk, 1.0, _fix_half_mask(z), False, qm)


class _Collection:
    """Accumulators of one collection; ``record`` is called from inside the attention call."""

    def __init__(self, model, method: str, fused: bool = False):
        self.model = model
        self.method = method
        self.fused = fused
        self.adapter = get_adapter(model)
        self.sites = resolve_sites(model, self.adapter)
        self.counts = [head_counts(s, self.adapter) for s in self.sites]
        self.stats = [None] * len(self.sites)
        self.outputs = [None] * len(self.sites)  # [Hq, D, 4]: see HeadScores.outputs
        self.initial: Optional[HeadScores] = None  # the state a resumed collection starts from
        self.padding: dict = {}
        self.impl = {id(c): c._attn_implementation_internal for c in _configs(model)}

    def _query_mask(self, site, batch: int, q_len: int, device):
        """``[batch, q_len]`` bool of the site's valid (unpadded) queries, or ``None``."""
        key = site.block.padding_key
        mask = self.padding.get(key) if key else None
        if mask is None:
            return None
        if mask.shape[0] != batch or mask.shape[1] < q_len:
            raise ValueError(
                f"batches: {key!r} has shape {tuple(mask.shape)} but site {site.name} attends with "
                f"{batch} sequences of {q_len} queries"
            )
        return mask[:, mask.shape[1] - q_len :].to(device=device, dtype=torch.bool)

    def _start(self, i, query):
        """A site's accumulator, on the device its attention runs on (layers may be spread)."""
        if self.initial is not None:
            return self.initial.stats[i, : query.shape[1]].to(query.device, copy=True)
        return torch.zeros(query.shape[1], NUM_STATS, dtype=torch.float64, device=query.device)

    def output_hook(self, site):
        """Pre-hook of the site's output projection: its input is the heads' outputs side by
        side (``[..., Hq * D]``); their per-dimension sums go into ``self.outputs``."""
        hq, d = self.counts[site.index][0], head_dim(site, self.adapter)
        w = site.o.weight.detach()
        norms = (w.double() ** 2).sum(1 if self.adapter.conv1d else 0) if hq else None
        norms = None if norms is None else norms.view(hq, d)  # squared norm of each input column

        def hook(module, args):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != hq * d or hq == 0:
                return None
            acc = self.outputs[site.index]
            if acc is None:
                if self.initial is not None and self.initial.outputs is not None:
                    acc = self.initial.outputs[site.index, :hq, :d].to(x.device, copy=True)
                else:
                    acc = torch.zeros(hq, d, 4, dtype=torch.float64, device=x.device)
                self.outputs[site.index] = acc
            x = x.detach()
            qm = self._query_mask(site, x.shape[0], x.shape[1], x.device) if x.dim() == 3 else None
            rows = x.reshape(-1, hq * d)
            valid = None if qm is None else qm.reshape(-1)
            n = rows.shape[0] if valid is None else int(valid.sum())
            # float64 in chunks of rows: the temporaries stay small whatever the batch
            for start in range(0, rows.shape[0], _OUTPUT_CHUNK):
                c = rows[start : start + _OUTPUT_CHUNK]
                if valid is not None:
                    c = c[valid[start : start + _OUTPUT_CHUNK]]
                c = c.double()
                acc[..., 1] += c.sum(0).view(hq, d)
                acc[..., 2] += c.square_().sum(0).view(hq, d)
            acc[..., 0] += n
            acc[..., 3] += n * norms.to(acc.device)
            return None

        return hook

    @property
    def recorded(self) -> bool:
        if any(s is not None for s in self.stats):
            return True
        return self.initial is not None and bool((self.initial.count > 0).any())

    def recorder(self, site):
        def record(module, query, key, mask, args, kwargs, out):
            stats, qm = self._site_state(site, query)
            if self.method == "eager":
                if not isinstance(out, tuple) or len(out) < 2 or out[1] is None:
                    raise RuntimeError(f"site {site.name}: the eager attention returned no probabilities")
                accumulate_probs_(stats, out[1].detach(), qm)
                return
            if "scaling" not in kwargs and args:
                raise NotImplementedError(f"site {site.name}: attention called with positional options {args!r}")
            scale = _scale(query, kwargs)
            key, eff_mask, causal = _effective_mask(self.impl[id(module.config)], module, query, key, mask, kwargs)
            if kwargs.get("softcap") is not None:
                _softcapped_stats(stats, query, key, scale, eff_mask, kwargs["softcap"], qm)
            else:
                accumulate_qk_(stats, query.detach(), key.detach(), scale, eff_mask, causal, qm)

        def attend(module, query, key, value, mask, args, kwargs):
            """The fused op in place of ``sdpa_attention_forward`` (same return value), or
            ``None`` where it does not apply and the model's own attention must run."""
            if not self._fusable(module, query, key, value, mask, args, kwargs):
                return None
            stats, qm = self._site_state(site, query)
            key, eff_mask, causal = _effective_mask("sdpa", module, query, key, mask, kwargs)
            value = value[:, :, : key.shape[2]]  # cropped with the keys (causal prefill)
            out = accumulate_attention_(stats, query, key, value, _scale(query, kwargs), eff_mask, causal, qm)
            return out.transpose(1, 2).contiguous(), None

        return types.SimpleNamespace(record=record, attend=attend)

    def _site_state(self, site, query) -> tuple:
        """The site's accumulator (created on its first call) and this call's query mask."""
        if self.stats[site.index] is None:
            self.stats[site.index] = self._start(site.index, query)
        return self.stats[site.index], self._query_mask(site, query.shape[0], query.shape[2], query.device)

    def _fusable(self, module, query, key, value, mask, args, kwargs) -> bool:
        """Whether the fused op computes what ``sdpa_attention_forward`` would. Shapes and
        dtypes are the op's own checks (SDPA refuses the same inputs)."""
        if not self.fused or self.method != "qk" or args or self.impl[id(module.config)] != "sdpa":
            return False
        if query.device.type != "cpu" or kwargs.get("softcap") is not None or kwargs.get("dropout"):
            return False
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            return False
        return mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4)

    @contextmanager
    def active(self):
        ids = [id(s.module) for s in self.sites]
        if any(i in _RECORDERS for i in ids):
            raise RuntimeError("model: a headprune collection is already active on this model")
        if any(p.is_meta for p in self.model.parameters()):
            raise ValueError("model: parameters are on the meta device; load real weights before collecting")
        # Dropout would change the statistics: collect in eval mode, then put every module's
        # own training flag back.
        training = {m: m.training for m in self.model.modules()}
        hooks = []
        try:
            self.model.eval()
            hooks = [s.o.register_forward_pre_hook(self.output_hook(s)) for s in self.sites]
            _RECORDERS.update({id(s.module): self.recorder(s) for s in self.sites})
            with attention_implementation(self.model, "eager" if self.method == "eager" else None):
                yield self
        finally:
            for h in hooks:
                h.remove()
            for i in ids:
                _RECORDERS.pop(i, None)
            for m, flag in training.items():
                m.training = flag

    def scores(self) -> HeadScores:
        hq = [c[0] for c in self.counts]
        out = HeadScores.empty(
            hq, [c[1] for c in self.counts], [head_dim(s, self.adapter) for s in self.sites],
            [s.name for s in self.sites], [s.block.kind for s in self.sites],
            model_type=self.adapter.model_type, method=self.method, with_outputs=True,
        )
        if self.initial is not None:
            out.stats.copy_(self.initial.stats)
            if self.initial.outputs is not None:
                out.outputs.copy_(self.initial.outputs)
        for i, st in enumerate(self.stats):
            if st is not None:
                out.stats[i, : st.shape[0]] = st.cpu()
        for i, acc in enumerate(self.outputs):
            if acc is not None:
                out.outputs[i, : acc.shape[0], : acc.shape[1]] = acc.cpu()
        return out


def _forward_kwargs(model, batch) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches: expected dicts of tensors (e.g. a tokenizer's output), got {type(batch).__name__}")
    if not any(k in batch for k in ("input_ids", "pixel_values", "inputs_embeds")):
        raise ValueError(f"batches: a batch needs input_ids, inputs_embeds or pixel_values; got keys {sorted(batch)}")
    for k in ("input_ids", "pixel_values", "inputs_embeds"):
        v = batch.get(k)
        if isinstance(v, torch.Tensor) and (v.dim() < 2 or 0 in v.shape[:2]):
            raise ValueError(f"batches: a batch's {k!r} is empty or not batched (shape {tuple(v.shape)})")
    device = next(model.parameters()).device
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params and "use_cache" not in kw:
        kw["use_cache"] = False  # a KV cache would only cost memory here
    if "logits_to_keep" in params and "logits_to_keep" not in kw and "labels" not in kw:
        kw["logits_to_keep"] = 1  # [B, S, vocab] logits would be computed and dropped
    return kw


def _progress(batches, enabled, done=0, total=None):
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return batches
    return tqdm(batches, desc="headprune: collecting", unit="batch", initial=done, total=total)


CHECKPOINT_FORMAT = "headprune.checkpoint/1"


class _Checkpoint:
    """A JSON file holding a collection's state after ``batches_done`` batches: the
    ``HeadScores.to_dict()`` (float64 values round-trip exactly), the layout fingerprint of
    the model and the caller's fingerprint of the calibration settings. Written atomically."""

    def __init__(self, path, fingerprint: str, layout: str):
        self.path, self.fingerprint, self.layout = os.fspath(path), fingerprint, layout

    def _refuse(self, why: str):
        return ValueError(f"checkpoint {self.path} {why}; delete it or drop --resume")

    def load(self) -> Optional[tuple]:
        """``(HeadScores, batches_done)``, or ``None`` when there is no file yet."""
        try:
            with open(self.path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._refuse(f"is not a readable headprune checkpoint ({type(e).__name__}: {e})") from e
        if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
            raise self._refuse(f"is not a headprune checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        if d.get("layout") != self.layout or d.get("fingerprint") != self.fingerprint:
            what = "model layout" if d.get("layout") != self.layout else "calibration settings"
            raise self._refuse(f"was written for another model/data (the {what} differ)")
        done = d.get("batches_done")
        try:
            scores = HeadScores.from_dict(d.get("scores"))
            ok = layout_fingerprint(scores) == self.layout and isinstance(done, int) and done >= 0
        except (TypeError, ValueError, RuntimeError, KeyError) as e:
            raise self._refuse(f"is corrupt ({type(e).__name__}: {e})") from e
        if not ok:
            raise self._refuse("is corrupt (its scores or batches_done do not match its header)")
        return scores, done

    def save(self, scores: HeadScores, done: int) -> None:
        data = {"format": CHECKPOINT_FORMAT, "batches_done": done, "layout": self.layout,
                "fingerprint": self.fingerprint, "scores": scores.to_dict()}
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def _skip(it, n: int, path) -> None:
    """Advance ``it`` past the ``n`` batches a checkpoint already holds."""
    skipped = sum(1 for _ in itertools.islice(it, n))
    if skipped < n:
        raise ValueError(f"checkpoint {path} records {n} batches done but batches has only {skipped}; "
                         "delete it or drop --resume")


def _canonical(fingerprint) -> str:
    if isinstance(fingerprint, Mapping):
        return json.dumps(fingerprint, sort_keys=True, default=str)
    if not isinstance(fingerprint, str):
        raise TypeError(f"fingerprint: expected a str or a dict, got {type(fingerprint).__name__}")
    return fingerprint


_END = object()


def _collect_modules(model, batches, method, progress, allow_empty):
    from ..torch_modules import _Session, collect_modules

    it = iter(batches)
    first = next(it, _END)
    if first is _END and allow_empty and method == "qk":
        return _Session(model).scores(method)
    return collect_modules(model, itertools.chain([] if first is _END else [first], it), method=method,
                           progress=progress)


def collect(
    model,
    batches: Iterable,
    *,
    method: str = "qk",
    progress: bool = True,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    fingerprint: Union[str, Mapping] = "",
    allow_empty: bool = False,
    fused: bool = True,
) -> HeadScores:
    """Mean attention entropy per attention site and query head over ``batches``.

    Args:
        model: a ``transformers`` model of a supported family (any head: ``AutoModel``,
            ``...ForCausalLM``), or a plain ``torch.nn`` model with ``nn.MultiheadAttention``.
        batches: iterable of dicts with ``input_ids`` + ``attention_mask`` (and
            ``decoder_input_ids`` / ``decoder_attention_mask`` for T5) or ``pixel_values``.
            Padded query positions (mask 0) are excluded.
        method: ``"qk"`` streams from query/key through the model's own attention
            implementation; ``"eager"`` is the reference: the family's eager attention and
            its probabilities (materialised, slower).
        progress: show a progress bar.
        checkpoint: a JSON file (transformers models only) rewritten atomically after every
            ``checkpoint_every`` batches and at the end, with the state so far.
        resume: continue from ``checkpoint`` if it exists (else start afresh): its first
            ``batches_done`` batches are skipped unread by the model. The result equals an
            uninterrupted run's exactly. Refused (``ValueError``) when the file is corrupt or
            was written for another model layout, method or ``fingerprint``.
        fingerprint: the caller's description of the calibration settings (data, samples,
            sequence length, model name and revision, ...); a dict is canonicalised as JSON.
        allow_empty: return all-zero scores instead of raising when nothing was recorded
            (a data-parallel rank with an empty shard).
        fused: with ``method="qk"``, serve a CPU model's ``sdpa`` attention calls with the
            fused op (``headprune.ops.attention_stats_accumulate_``): the attention output
            and the statistics from one pass over the logits, instead of the attention
            followed by a second pass. Its outputs equal SDPA's to float rounding (the
            statistics likewise); ``False`` keeps the model's own attention, bit for bit.

    Returns ``HeadScores`` (entropies in nats). The model's outputs are unchanged (up to
    float rounding where ``fused`` applies) and, on any exit (including
    ``KeyboardInterrupt``), its attention implementation is restored.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if isinstance(batches, Mapping) or isinstance(batches, torch.Tensor):
        raise TypeError("batches: expected an iterable of batches (e.g. a list of dicts), got a single batch")
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: expected a positive int, got {checkpoint_every!r}")
    if resume and checkpoint is None:
        raise ValueError("resume: needs a checkpoint path")
    if not hasattr(model, "config"):
        if checkpoint is not None:
            raise ValueError("checkpoint: resumable collection needs a transformers model")
        return _collect_modules(model, batches, method, progress, allow_empty)
    session = _Collection(model, method, fused=bool(fused))
    ckpt, done = _open_checkpoint(session, checkpoint, fingerprint, resume)
    _run(model, session, batches, progress, ckpt, checkpoint_every, done)
    if not session.recorded and not allow_empty:
        raise ValueError("batches: no attention call was recorded (empty iterable?)")
    return session.scores()


def _open_checkpoint(session, path, fingerprint, resume) -> tuple:
    """``(checkpoint or None, batches already done)``; a resumed state goes into ``session``."""
    if path is None:
        return None, 0
    ckpt = _Checkpoint(path, _canonical(fingerprint), layout_fingerprint(session.scores()))
    state = ckpt.load() if resume else None
    if state is None:
        return ckpt, 0
    session.initial, done = state
    return ckpt, done


def _run(model, session, batches, progress, ckpt, every, done) -> None:
    """Forward the batches after the first ``done``, saving ``ckpt`` every ``every`` batches
    and at the end; the model is restored on any exit."""
    saved, total = done, (len(batches) if hasattr(batches, "__len__") else None)
    with session.active(), torch.no_grad():
        it = iter(batches)
        _skip(it, done, None if ckpt is None else ckpt.path)
        for batch in _progress(it, progress, done, total):
            kw = _forward_kwargs(model, batch)
            session.padding = {k: kw.get(k) for k in ("attention_mask", "decoder_attention_mask")}
            model(**kw)
            done += 1
            if ckpt is not None and done % every == 0:
                ckpt.save(session.scores(), done)
                saved = done
    if ckpt is not None and saved != done:
        ckpt.save(session.scores(), done)
