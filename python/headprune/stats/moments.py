"""Second moments of what each site's output projection reads, for least-squares refits.

For site i with ``D = heads x head_dim`` inputs to its output projection, ``gram[i]`` is the
``[D + 1, D + 1]`` sum over the valid calibration tokens of ``x~ x~^T`` with ``x~ = [x, 1]``
(``x``: the heads' outputs side by side), so its last column holds the sums of ``x`` and the
token count; it is a sum over tokens, so collections merge by addition. ``projection[i]`` is
the output projection when the moments were collected, ``W~ = [W, b]`` (``[out, D + 1]``,
float32): with ``gram`` it says how much output a refit loses when columns go
(:mod:`headprune.ranking.reconstruction`).
"""

from __future__ import annotations

import numbers
from collections import Counter
from typing import Optional

import torch

__all__ = ["OutputMoments", "MOMENT_DTYPES", "DEFAULT_DAMPING", "check_damping", "check_finite", "ridge", "semidefinite"]

MOMENT_DTYPES = (torch.float64, torch.float32)
#: ridge damping of least-squares refits from these moments, relative to the mean squared
#: input (see ``headprune.prune.reconstruct``); the selection damps the same way
DEFAULT_DAMPING = 1e-2


def check_damping(damping) -> float:
    """``damping`` as a float, or ``ValueError`` naming it unless it is a finite non-negative number
    (numpy and 0-d tensor numbers too, as ratios are taken)."""
    if isinstance(damping, torch.Tensor) and damping.dim() == 0 and damping.dtype != torch.bool \
            and not damping.is_complex():
        damping = damping.item()
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not 0 <= damping < float("inf"):
        raise ValueError(f"damping: expected a finite non-negative number, got {damping!r}")
    return float(damping)


#: how far below zero, relative to the largest diagonal entry, the smallest eigenvalue of a
#: difference of second moments may round, by the dtype they were summed in. The subset's
#: moments are taken again in other batch shapes, whose float32 activations differ in their last
#: bits: with fewer tokens left than dimensions, SmolLM2's measured part left -1.2e-6 (float64
#: sums); another set of tokens' moments taken out instead of a subset's leaves it of the order
#: of the entries (-0.5 to -3 in random trials)
SEMIDEFINITE_RTOL = {torch.float64: 1e-4, torch.float32: 1e-3}


def semidefinite(a: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``a`` (symmetric, float64; sums in ``dtype``) is positive semi-definite up to
    :data:`SEMIDEFINITE_RTOL`."""
    shift = SEMIDEFINITE_RTOL.get(dtype, 1e-3) * float(a.diagonal().abs().max())
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return int(torch.linalg.cholesky_ex(a + shift * eye).info) == 0


def check_finite(arg: str, name: str, *mats) -> None:
    """``ValueError`` naming ``arg`` and the site ``name`` unless every matrix of ``mats`` (``None``
    skipped) is finite: moments summed from NaN or infinite activations would rank the site's
    heads first (a NaN cost compares as no cost) and refit its weights from nothing."""
    if any(m is not None and not bool(torch.isfinite(m).all()) for m in mats):
        raise ValueError(f"{arg}: the second moments of site {name} hold NaN or inf: the calibration's activations "
                         "there were not finite (the model's weights, or a compute dtype too narrow for them); "
                         "collect again once the model computes finite outputs")


def ridge(a: torch.Tensor, damping: float, k: int) -> torch.Tensor:
    """The ridge ``c = damping * mean(diag(a[:k, :k]))`` that the refit and the reconstruction
    score add to the first ``k`` diagonal entries of a second-moment matrix (0-d float64).
    Where those columns saw nothing but zeros (a mean below float64's smallest normal number)
    the ridge is ``damping`` itself: a floor scaled by ``damping`` would be subnormal, and its
    inverse infinite."""
    mean = a.diagonal()[:k].mean()
    return damping * (mean if mean >= torch.finfo(torch.float64).tiny else torch.ones_like(mean))


class OutputMoments:
    """Per-site second moments (see the module docstring); ``gram[i]`` is ``None`` for a
    site that saw no token. ``sequences``: an int64 digest of every calibration sequence the
    sums hold (``headprune.hf.batches.sequence_digests``; ``None``: not recorded), so a part
    of them taken out can be checked to be a part (:meth:`without`)."""

    def __init__(self, gram: list, projection: Optional[list] = None, sequences: Optional[torch.Tensor] = None):
        self.gram = list(gram)
        self.projection = None if projection is None else list(projection)
        if sequences is not None and (not isinstance(sequences, torch.Tensor) or sequences.dim() != 1
                                      or sequences.dtype != torch.int64):
            raise ValueError(f"sequences: expected a 1-D int64 tensor or None, got {getattr(sequences, 'shape', sequences)!r}")
        self.sequences = sequences
        #: per site, the output projection's weight before the masks applied while collecting
        #: (``headprune.hf.collection``), else ``None``: kept by a distributed all-reduce (every rank's
        #: weights are the same), not saved, merged or checkpointed
        self.unmasked: Optional[list] = None
        if self.projection is not None and len(self.projection) != len(self.gram):
            raise ValueError(f"projection: expected {len(self.gram)} entries (one per site), got {len(self.projection)}")
        for name, mats in (("gram", self.gram), ("projection", self.projection or [])):
            for i, g in enumerate(mats):
                square = name == "gram"
                if g is not None and (not isinstance(g, torch.Tensor) or g.dim() != 2
                                      or (square and g.shape[0] != g.shape[1])):
                    raise ValueError(f"{name}: site {i}: expected a {'square ' if square else ''}matrix, "
                                     f"got {getattr(g, 'shape', type(g))}")

    @property
    def num_sites(self) -> int:
        return len(self.gram)

    @property
    def nbytes(self) -> int:
        """Bytes held by the moments (both lists)."""
        mats = [g for g in self.gram + (self.projection or []) if g is not None]
        return sum(g.numel() * g.element_size() for g in mats)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The float type the sums are held in (``None`` where no site saw a token)."""
        return next((g.dtype for g in self.gram if g is not None), None)

    def tokens(self, site: int) -> float:
        """Calibration tokens site ``site`` saw."""
        g = self.gram[site]
        return 0.0 if g is None else float(g[-1, -1])

    def mean_gram(self, site: int) -> torch.Tensor:
        """``E[x~ x~^T]`` of a site in float64 (``[D + 1, D + 1]``)."""
        g = self.gram[site]
        if g is None or g[-1, -1] <= 0:
            raise ValueError(f"moments: site {site} saw no calibration token")
        g = g.double()
        return g / g[-1, -1]

    def merge(self, other: "OutputMoments") -> "OutputMoments":
        """Moments of the union of both collections' tokens."""
        if not isinstance(other, OutputMoments) or other.num_sites != self.num_sites:
            raise ValueError("other: moments of another layout; cannot merge")
        kinds = {g.dtype for g in self.gram + other.gram if g is not None}
        if len(kinds) > 1:  # the sum would take one side's precision silently
            raise ValueError(f"other: moments in {' and '.join(sorted(map(str, kinds)))}; collect both in one dtype")
        if self.projection is not None and other.projection is not None and any(
                (a is None) != (b is None) or a is not None and not torch.equal(a, b)
                for a, b in zip(self.projection, other.projection)):
            raise ValueError("other: moments taken under other output-projection weights (another model, or "
                             "another pruning); cannot merge")
        gram = []
        for i, (a, b) in enumerate(zip(self.gram, other.gram)):
            if a is not None and b is not None and a.shape != b.shape:
                raise ValueError(f"other: site {i} moments have shape {tuple(b.shape)}, expected {tuple(a.shape)}")
            gram.append(None if a is None and b is None else b.clone() if a is None else a.clone() if b is None
                        else a + b.to(a))
        both = self.sequences is not None and other.sequences is not None  # else which tokens is unknown
        return OutputMoments(gram, self.projection if self.projection is not None else other.projection,
                             torch.cat([self.sequences, other.sequences]) if both else None)

    def subset(self, idx: list) -> "OutputMoments":
        wg = None if self.projection is None else [self.projection[i] for i in idx]
        return OutputMoments([self.gram[i] for i in idx], wg, self.sequences)

    def without(self, part: "OutputMoments", names: list) -> "OutputMoments":
        """The moments of these sequences less ``part``, a part of them (sums over tokens, so
        the rest's moments are the difference); ``ValueError`` where ``part`` holds sequences
        these do not (where both recorded theirs), where it leaves a site no token, or where the
        difference is no second moment. ``names``: the sites', for the messages."""
        if missing := self._missing(part):
            raise ValueError(f"batches: {missing} of the first {len(part.sequences)} sequences, which the costs are "
                             "measured on, are not among the sequences the scores' second moments were collected "
                             "on; pass the calibration batches the scores were collected on")
        gram = []
        for i, (g, p) in enumerate(zip(self.gram, part.gram)):
            if g is None or p is None:
                gram.append(g)
                continue
            rest = g.double() - p.double()
            if rest[-1, -1] < 0.5:
                raise ValueError(f"sequences: site {i} ({names[i]}) saw no calibration token besides the "
                                 f"{int(p[-1, -1])} measured on, so no refit is left to measure; pass fewer sequences "
                                 "or more calibration batches")
            if not semidefinite(rest, g.dtype):
                raise ValueError(f"batches: site {i} ({names[i]}): the scores' second moments less those of the "
                                 "first batches' sequences are no second moments; pass the calibration batches the "
                                 "scores were collected on")
            gram.append(rest.to(g.dtype))
        return OutputMoments(gram, self.projection, self._rest_sequences(part))

    def _missing(self, part: "OutputMoments") -> int:
        """How many of ``part``'s sequences (with their repeats) these moments do not hold; 0
        where either recorded none."""
        if self.sequences is None or part.sequences is None:
            return 0
        return sum((Counter(part.sequences.tolist()) - Counter(self.sequences.tolist())).values())

    def _rest_sequences(self, part: "OutputMoments") -> Optional[torch.Tensor]:
        """These moments' sequences less ``part``'s, which it holds."""
        if self.sequences is None or part.sequences is None:
            return None
        rest = Counter(self.sequences.tolist()) - Counter(part.sequences.tolist())
        return torch.tensor(list(rest.elements()), dtype=torch.int64)

    # ---- files: safetensors, one tensor per site and kind ---------------------------------
    def state_dict(self) -> dict:
        out = {f"gram.{i}": g.contiguous() for i, g in enumerate(self.gram) if g is not None}
        for i, g in enumerate(self.projection or []):
            if g is not None:
                out[f"projection.{i}"] = g.contiguous()
        if self.sequences is not None:
            out["sequences"] = self.sequences.contiguous()
        return out

    @classmethod
    def from_state_dict(cls, state: dict, num_sites: int) -> "OutputMoments":
        unknown = [k for k in state if k.split(".")[0] not in ("gram", "projection") and k != "sequences"]
        if unknown:
            raise ValueError(f"moments: unexpected tensors {unknown[:5]}")
        sites = {k: k.partition(".")[2] for k in state if k != "sequences"}
        beyond = [k for k, i in sites.items() if not (i.isdigit() and int(i) < num_sites)]
        if beyond:  # they would be dropped
            raise ValueError(f"moments: tensors {beyond[:5]} are not of sites 0-{num_sites - 1} ({num_sites} sites)")
        gram = [state.get(f"gram.{i}") for i in range(num_sites)]
        wg = [state.get(f"projection.{i}") for i in range(num_sites)]
        return cls(gram, wg if any(w is not None for w in wg) else None, state.get("sequences"))

    def to_bytes(self) -> bytes:
        """The moments as a safetensors file's bytes."""
        from safetensors.torch import save

        return save({k: v.cpu() for k, v in self.state_dict().items()}, metadata={"sites": str(self.num_sites)})

    def save(self, path) -> None:
        """The moments as a safetensors file at ``path``, written atomically: a failed write
        leaves the file that was there (``OSError`` naming ``path``)."""
        from ..atomic import write_file

        try:
            write_file(path, self.to_bytes())
        except OSError as e:
            raise OSError(e.errno, f"moments: cannot write {path} ({e.strerror or e})") from e

    @classmethod
    def load(cls, path) -> "OutputMoments":
        """The moments :meth:`save` wrote; ``ValueError`` for a file that is not such moments
        (truncated, or another format), ``OSError`` for one that cannot be read."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                sites = (f.metadata() or {}).get("sites")
                state = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"moments: {path} is not a readable safetensors file ({e})") from e
        if sites is None or not sites.isdigit():
            raise ValueError(f"moments: {path} does not say how many sites it holds (metadata 'sites'); it was not "
                             "written by OutputMoments.save")
        sites = int(sites)
        return cls.from_state_dict(state, sites)

    def __repr__(self) -> str:
        return f"OutputMoments(sites={self.num_sites}, bytes={self.nbytes:,})"
