"""The state of one collection: per-site accumulators, filled from inside the model's forward
by the recording attention function (:mod:`.attention`) and by pre-hooks on the output
projections (the output statistics).

On CPU, a model in ``sdpa`` is by default (``fused=True``) served by the fused op instead of
its own attention: one streaming pass over the logits yields the attention output and the
statistics. It mirrors ``sdpa_attention_forward`` (see :mod:`.sdpa_mirror`); its outputs
equal SDPA's to float rounding rather than bit for bit.
"""

from __future__ import annotations

import threading
import types
from contextlib import ExitStack, contextmanager
from typing import Optional

import torch

from ..core import ops
from ..core.schema import NUM_OUTPUT_STATS, NUM_STATS, OutputStat
from ..stats.moments import OutputMoments
from ..stats.scores import HeadScores
from .adapters import get_adapter, head_counts, head_dim, o_column_norms, resolve_sites
from .attention import RECORDERS, attention_implementation, config_of, model_configs
from ..core.modules import eval_mode, refuse_meta
from ..prune.mask import unmasked_weight
from .prune import STATE_ATTR
from .sdpa_mirror import effective_mask, logit_scale, softcapped_stats

__all__ = ["Collection", "METHODS"]

METHODS = ("qk", "eager")

# Rows of an output projection's input converted to float64 at a time (output statistics).
_OUTPUT_CHUNK = 1024


class Collection:
    """Accumulators of one collection; ``record`` is called from inside the attention call."""

    def __init__(self, model, method: str, fused: bool = False, moments: Optional[torch.dtype] = None):
        self.model = model
        self.method = method
        self.fused = fused
        self.moments_dtype = moments  # None: no second moments
        self.adapter = get_adapter(model)
        self.sites = resolve_sites(model, self.adapter)
        self.counts = [head_counts(s, self.adapter) for s in self.sites]
        self.stats = [None] * len(self.sites)
        self.outputs = [None] * len(self.sites)  # [Hq, D, NUM_OUTPUT_STATS]: see HeadScores.outputs
        self.gram = [None] * len(self.sites)  # [Hq * D + 1] ** 2: see OutputMoments
        self.sequences: list = []  # with moments: each forward's sequence_digests
        self._projections: Optional[list] = None
        self.initial: Optional[HeadScores] = None  # the state a resumed collection starts from
        self.padding: dict = {}
        self.impl = {id(c): c._attn_implementation_internal for c in model_configs(model)}
        self.thread: Optional[int] = None  # the thread running the collection (see active)

    def _query_mask(self, site, batch: int, q_len: int, device):
        return query_mask(site, self.padding, batch, q_len, device)

    @contextmanager
    def paused(self):
        """Nothing this thread runs inside is recorded by the output hooks (as another thread's)."""
        thread, self.thread = self.thread, None
        try:
            yield
        finally:
            self.thread = thread

    def _start(self, i, query):
        """A site's accumulator, on the device its attention runs on (layers may be spread)."""
        if self.initial is not None:
            return self.initial.stats[i, : query.shape[1]].to(query.device, copy=True)
        return torch.zeros(query.shape[1], NUM_STATS, dtype=torch.float64, device=query.device)

    def output_hook(self, site):
        """Pre-hook of the site's output projection: its input is the heads' outputs side by
        side (``[..., Hq * D]``); their per-dimension sums go into ``self.outputs``."""
        hq, d = self.counts[site.index][0], head_dim(site, self.adapter)
        norms = o_column_norms(site, self.adapter).view(hq, d) if hq else None  # squared, per input column

        def hook(module, args):
            x = args[0] if args else None
            if threading.get_ident() != self.thread:  # a forward of this model in another thread
                return None
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != hq * d or hq == 0:
                return None
            acc = self.outputs[site.index]
            if acc is None:
                if self.initial is not None and self.initial.outputs is not None:
                    acc = self.initial.outputs[site.index, :hq, :d].to(x.device, copy=True)
                else:
                    acc = torch.zeros(hq, d, NUM_OUTPUT_STATS, dtype=torch.float64, device=x.device)
                self.outputs[site.index] = acc
            x = x.detach()
            qm = self._query_mask(site, x.shape[0], x.shape[1], x.device) if x.dim() == 3 else None
            rows = x.reshape(-1, hq * d)
            valid = None if qm is None else qm.reshape(-1)
            n = rows.shape[0] if valid is None else int(valid.sum())
            gram = self._gram(site.index, hq * d, x.device)
            for c in valid_chunks(rows, valid):  # copies, even of float64 rows: squared in place below
                if gram is not None:
                    _add_gram_(gram, c)
                acc[..., OutputStat.SUM] += c.sum(0).view(hq, d)
                acc[..., OutputStat.SUM_SQ] += c.square_().sum(0).view(hq, d)
            acc[..., OutputStat.COUNT] += n
            acc[..., OutputStat.COUNT_NORM] += n * norms.to(acc.device)
            return None

        return hook

    def _gram(self, i: int, width: int, device) -> Optional[torch.Tensor]:
        """Site ``i``'s second-moment accumulator (created on first use), or ``None``."""
        if self.moments_dtype is None:
            return None
        if self.gram[i] is None:
            start = None if self.initial is None or self.initial.moments is None else self.initial.moments.gram[i]
            self.gram[i] = (start.to(device, self.moments_dtype, copy=True) if start is not None else
                            torch.zeros(width + 1, width + 1, dtype=self.moments_dtype, device=device))
        return self.gram[i]

    def projections(self) -> list:
        """Every site's output projection as ``W~ = [W, b]`` (``[out, D + 1]``, float32; taken
        once: the weights do not change during a collection)."""
        if self._projections is not None:
            return self._projections
        self._projections = [projection(s, self.adapter).float().cpu() for s in self.sites]
        return self._projections

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
                with _named(site, probs=out[1]):
                    # eps 0: the rest's entropy divides by the mass after the first key, which made
                    # eps's 1e-8 up to log 2 nats where little is left (0 log 0 is taken as 0)
                    ops.entropy_stats_from_probs_accumulate_(stats, out[1].detach(), qm, eps=0.0)
                return
            if "scaling" not in kwargs and args:
                raise NotImplementedError(f"site {site.name}: attention called with positional options {args!r}")
            scale = logit_scale(query, kwargs)
            key, eff_mask, causal = effective_mask(self.impl[id(config_of(module))], module, query, key, mask, kwargs)
            with _named(site, query=query, key=key):
                if kwargs.get("softcap") is not None:
                    softcapped_stats(stats, query, key, scale, eff_mask, kwargs["softcap"], qm)
                else:
                    ops.entropy_stats_from_qk_accumulate_(stats, query.detach(), key.detach(), float(scale), eff_mask,
                                                          bool(causal), qm)

        def attend(module, query, key, value, mask, args, kwargs):
            """The fused op in place of ``sdpa_attention_forward`` (same return value), or
            ``None`` where it does not apply and the model's own attention must run."""
            if not self._fusable(module, query, key, value, mask, args, kwargs):
                return None
            stats, qm = self._site_state(site, query)
            key, eff_mask, causal = effective_mask("sdpa", module, query, key, mask, kwargs)
            value = value[:, :, : key.shape[2]]  # cropped with the keys (causal prefill)
            with _named(site, query=query, key=key):
                out = ops.attention_stats_accumulate_(stats, query, key, value, float(logit_scale(query, kwargs)),
                                                     eff_mask, bool(causal), qm)
            return out.transpose(1, 2).contiguous(), None

        return types.SimpleNamespace(record=record, attend=attend, thread=self.thread)

    def _site_state(self, site, query) -> tuple:
        """The site's accumulator (created on its first call) and this call's query mask."""
        if self.stats[site.index] is None:
            self.stats[site.index] = self._start(site.index, query)
        return self.stats[site.index], self._query_mask(site, query.shape[0], query.shape[2], query.device)

    def _fusable(self, module, query, key, value, mask, args, kwargs) -> bool:
        """Whether the fused op computes what ``sdpa_attention_forward`` would. Shapes and
        dtypes are the op's own checks (SDPA refuses the same inputs)."""
        if not self.fused or self.method != "qk" or args or self.impl[id(config_of(module))] != "sdpa":
            return False
        if query.device.type != "cpu" or kwargs.get("softcap") is not None or kwargs.get("dropout"):
            return False
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            return False
        return mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4)

    @contextmanager
    def active(self):
        ids = [id(s.module) for s in self.sites]
        if any(i in RECORDERS for i in ids):
            raise RuntimeError("model: a headprune collection is already active on this model")
        refuse_meta(self.model.parameters())  # offloaded by accelerate: the hooks would not be recorded
        hooks, stack = [], ExitStack()
        self.thread = threading.get_ident()  # only this thread's forwards are recorded
        try:  # dropout would change the statistics: collect in eval mode
            stack.enter_context(eval_mode(self.model))
            hooks = [s.o.register_forward_pre_hook(self.output_hook(s)) for s in self.sites]
            RECORDERS.update({id(s.module): self.recorder(s) for s in self.sites})
            with attention_implementation(self.model, "eager" if self.method == "eager" else None):
                yield self
        finally:
            for h in hooks:
                h.remove()
            for i in ids:
                RECORDERS.pop(i, None)
            stack.close()

    def scores(self) -> HeadScores:
        hq = [c[0] for c in self.counts]
        out = HeadScores.empty(
            hq, [c[1] for c in self.counts], [head_dim(s, self.adapter) for s in self.sites],
            [s.name for s in self.sites], [s.block.kind for s in self.sites],
            model_type=self.adapter.model_type, method=self.method, with_outputs=True,
            causal=[s.block.causal for s in self.sites], depth=[s.depth for s in self.sites],
            head_ids=_head_ids(self.model), kv_ids=_head_ids(self.model, "kv"),
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
        if self.moments_dtype is not None:
            start = None if self.initial is None else self.initial.moments
            gram = [g.cpu() if g is not None else (None if start is None else start.gram[i])
                    for i, g in enumerate(self.gram)]
            before = torch.zeros(0, dtype=torch.int64) if start is None else start.sequences  # None: unknown
            sequences = None if before is None else torch.cat([before, torch.tensor(self.sequences, dtype=torch.int64)])
            out.moments = OutputMoments(gram, self.projections(), sequences)
            out.moments.unmasked = self.unmasked()
        return out

    def unmasked(self) -> Optional[list]:
        """Each site's output-projection weight (``[out, in]``, float32) as it was before the
        masks still applied to the model changed it, ``None`` where none did (``None`` for all:
        no mask): a refit from these moments compares the model's weights with it, since the
        projection collected under a mask is not the model's once the mask is restored."""
        found = [unmasked_weight(self.model, s.o.weight) for s in self.sites]
        if all(w is None for w in found):
            return None
        return [None if w is None else (w.t() if self.adapter.conv1d else w).float().cpu() for w in found]


def padding_of(kw: dict) -> dict:
    """A batch's padding masks (forward keyword arguments), as :attr:`Collection.padding` holds them."""
    return {k: kw.get(k) for k in ("attention_mask", "decoder_attention_mask")}


def query_mask(site, padding: dict, batch: int, q_len: int, device):
    """``[batch, q_len]`` bool of the site's valid (unpadded) queries under ``padding``
    (:func:`padding_of`), or ``None``."""
    key = site.block.padding_key
    mask = padding.get(key) if key else None
    if mask is None:
        return None
    if mask.shape[0] != batch or mask.shape[1] < q_len:
        raise ValueError(
            f"batches: {key!r} has shape {tuple(mask.shape)} but site {site.name} attends with "
            f"{batch} sequences of {q_len} queries"
        )
    return mask[:, mask.shape[1] - q_len :].to(device=device, dtype=torch.bool)


def valid_chunks(rows: torch.Tensor, valid: Optional[torch.Tensor]):
    """``rows`` ``[n, D]`` as float64 copies of at most :data:`_OUTPUT_CHUNK` rows, those that
    ``valid`` (``[n]`` bool, or ``None``: all) marks: the temporaries stay small whatever the batch."""
    for start in range(0, rows.shape[0], _OUTPUT_CHUNK):
        c = rows[start : start + _OUTPUT_CHUNK]
        yield (c if valid is None else c[valid[start : start + _OUTPUT_CHUNK]]).to(torch.float64, copy=True)


def projection(site, adapter) -> torch.Tensor:
    """The site's output projection as ``W~ = [W, b]`` (``[out, D + 1]``, float64, on its
    weight's device; a zero column without a bias)."""
    w = site.o.weight.detach().double()
    w = w.t() if adapter.conv1d else w  # [out, in]
    b = getattr(site.o, "bias", None)
    b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if b is None else b.detach().double()
    return torch.cat([w, b[:, None]], 1)


def _head_ids(model, which: str = "kept"):
    """Original indices of the heads (``"kv"``: of each KV row's KV head) of a model an earlier
    pruning changed (``None``: unpruned)."""
    state = getattr(model, STATE_ATTR, None)
    return None if state is None else [list(k) for k in state[which]]


def _add_gram_(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """``gram += [rows, 1]^T [rows, 1]`` for float64 ``rows [n, D]`` (in gram's dtype)."""
    d = rows.shape[1]
    r = rows.to(gram.dtype)
    if d < 256:
        gram[:d, :d].addmm_(r.t(), r)
    else:  # symmetric: the top block row and the bottom-right block (3/4 of the product), mirrored
        h = d // 2
        gram[:h, :d].addmm_(r[:, :h].t(), r)
        gram[h:d, h:d].addmm_(r[:, h:].t(), r[:, h:])
        gram[h:d, :h] = gram[:h, h:d].t()
    s = r.sum(0)
    gram[:d, d] += s
    gram[d, :d] += s
    gram[d, d] += r.shape[0]


@contextmanager
def _named(site, **inputs):
    """An op's refusal of NaN or infinite entropies names the site and, where the attention's
    own inputs are not finite, says that the model computed them: transformers' eager attention
    of a float64 Llama, OPT, Mistral or Gemma 2 with padded batches does (its softmax runs in
    float32, where the float64 mask's minimum is -inf, so padded rows come out NaN and spread)."""
    try:
        yield
    except ValueError as e:
        if "NaN or infinite entropies" not in str(e):
            raise
        bad = [name for name, t in inputs.items() if not bool(torch.isfinite(t.detach()).all())]
        if not bad:
            raise ValueError(f"site {site.name}: {e}") from None
        raise ValueError(
            f"site {site.name}: the model's own attention {' and '.join(bad)} here hold NaN or inf, so its forward "
            f"computes them before headprune reads them ({e}); a float64 model in eager attention with padded "
            "batches does so inside transformers: use float32, or attn_implementation='sdpa' in a family that has "
            "it (Gemma 2 has not)") from None

