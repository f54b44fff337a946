"""AdapterFusion for the zoo (Pfeiffer et al., 2021): combine experts per input.

The layer. For a frozen image feature ``f`` and the adapted features ``h_e`` of a set of experts
(each expert's adapted image feature, in the joint space)::

    q = Wq f,   k_e = Wk h_e,   v_e = Wv h_e,   a = softmax_e(q . k_e / sqrt(D)),
    z = normalize(sum_e a_e v_e)

``Wv`` starts at the identity (as in the paper; the zoo-wide layer of ``mode='fusion'`` keeps it
there, see :class:`GlobalFusion`), ``Wq``/``Wk`` at random; ``a`` are the per-input
fusion weights, ``z`` the one fused representation. Training is two-stage: experts are trained
first and stay frozen (their files are only ever read); only fusion parameters (and a new head)
are trained here.

Two uses:

* **Composed expert for a new task** (``add-task --kind fusion --from A,B``): the layer inside
  :class:`clipzoo.zoo.experts.fusion.FusionExpert`, trained on the new task's own data.

* **Task-agnostic prediction over the routed top-k** (``mode='fusion'``, :class:`GlobalFusion`).
  The experts have disjoint class spaces, so the answer is a (task, class) pair scored as a
  mixture: ``p(e, c | x) = a_e(x) * softmax_c(scale_e * z @ W_e^T)`` over the router's top-k
  experts ``e`` (``W_e`` = expert e's adapted classifier). The fusion weights act as a learned task
  posterior and the fused feature is read by each candidate's own classifier. Here the attention
  logits also get the router's log-weight with a learned scale, ``q . k_e / sqrt(D) + beta log r_e``
  ("router top-k plus fusion"): without it the attention, trained on pseudo-features only, chose
  the task less often than the router itself did; with it, fusion starts from the router's belief
  and learns how far to trust it against the experts' features. The comparison
  modes use the same union: ``'avg'`` gives each of the top-k weight ``1/k`` and scores each
  expert's own adapted feature (uniform averaging of the experts' output distributions),
  ``'top1'`` answers with the router's first choice only.

  The global layer never needs old raw images: it is trained the first time fusion mode is used
  on a zoo, and after that at each ``add-task`` (see :mod:`clipzoo.zoo.predict`), on a fixed budget of
  *pseudo-features* drawn from each expert's stored class statistics (``class_means`` +
  ``class_cov`` of :mod:`clipzoo.router.stats`, unit-normalised like real features), routed by the
  zoo's router so the candidate sets look like those at test time. Cost: a fixed budget of
  samples and optimiser steps whatever the number of tasks (only routing the samples and reading
  the experts grow with it).
  Being a deterministic function of (expert files, k, settings, seed), it is cached outside the
  zoo directory by :mod:`clipzoo.zoo.predict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.errors import ConfigError
from clipzoo.router.gate import Routing
from clipzoo.router.stats import TaskStats, pseudo_features

MODES = ("top1", "avg", "fusion")
FORMAT_VERSION = 3  # of the global fusion's tensors: bump when GlobalFusion's parameters change

PixelFn = Callable[[list[int]], torch.Tensor]


class AdapterFusion(nn.Module):
    """Attention over candidate features: query from the frozen feature, keys/values from ``h``."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            bound = 1 / math.sqrt(dim)
            self.query.weight.uniform_(-bound, bound, generator=g)
            self.key.weight.uniform_(-bound, bound, generator=g)
            self.value.weight.copy_(torch.eye(dim))

    def forward(self, f: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f (B, D)``, ``h (B, K, D)`` -> fused ``z (B, D)`` (unit norm), weights ``a (B, K)``;
        ``bias (B, K)`` is added to the attention logits."""
        s = torch.einsum("bd,bkd->bk", self.query(f), self.key(h)) / math.sqrt(f.shape[1])
        a = (s if bias is None else s + bias).softmax(dim=1)
        return F.normalize(torch.einsum("bk,bkd->bd", a, self.value(h)), dim=-1), a


def _pixels_for(exp: nn.Module, name: str, rows: list[int], pixels: PixelFn | None) -> torch.Tensor | None:
    if not exp.needs_pixels:
        return None
    if pixels is None:
        raise ConfigError(f"expert {name!r} ({exp.kind}) needs images, not only cached features")
    return pixels(rows)


def gather_features(experts: Mapping[int, nn.Module], names: Sequence[str], cand: torch.Tensor, feats: torch.Tensor,
                    pixels: PixelFn | None = None, encoded: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
    """``H (B, K, D)``: candidate ``cand[b, j]``'s adapted feature of input ``b``; each expert runs
    once on the inputs that chose it. ``encoded[e]``: for an in-encoder expert, the output of a
    tower pass with its adapters on its rows (in ``(cand == e).nonzero()`` order), shared with
    the other candidates' rows; without it the expert runs the tower on its rows' pixels."""
    H = feats.new_zeros(*cand.shape, feats.shape[1])
    with torch.no_grad():
        for e in cand.unique().tolist():
            rows, slots = (cand == e).nonzero(as_tuple=True)
            if encoded is not None and e in encoded:
                H[rows, slots] = experts[e].adapted_features(feats[rows], encoded=encoded[e])
                continue
            px = _pixels_for(experts[e], names[e], rows.tolist(), pixels)
            H[rows, slots] = experts[e].adapted_features(feats[rows], px)
    return H


def slot_best(experts: Mapping[int, nn.Module], cand: torch.Tensor, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best class per slot: log-probability and label ``(B, K)`` of expert ``cand[b, j]``'s
    classifier on ``Z[b, j]``."""
    logp = Z.new_zeros(cand.shape)
    label = torch.zeros(cand.shape, dtype=torch.long)
    with torch.no_grad():
        for e in cand.unique().tolist():
            rows, slots = (cand == e).nonzero(as_tuple=True)
            lp = (experts[e].logit_scale * Z[rows, slots] @ experts[e].class_weights().T).log_softmax(1)
            logp[rows, slots], label[rows, slots] = lp.max(1)
    return logp, label


# ----- the global fusion over the routed top-k ------------------------------------------------
@dataclass(frozen=True)
class FusionSettings:
    n_pseudo: int = 4096
    epochs: int = 40
    lr: float = 1e-2
    batch_size: int = 1024
    seed: int = 0


class GlobalFusion(nn.Module):
    """The zoo-wide fusion layer used by ``mode='fusion'`` (see the module docstring)."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        self.fusion = AdapterFusion(dim, seed)
        # The value projection stays the identity here: trained on pseudo-features it moved real
        # features away from what each expert's classifier expects (lower task-agnostic accuracy).
        self.fusion.value.weight.requires_grad_(False)
        self.prior_scale = nn.Parameter(torch.ones(()))

    def forward(self, f: torch.Tensor, h: torch.Tensor, log_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused feature and weights; ``log_r (B, K)``: the router's log-weights, a learned-scale prior."""
        return self.fusion(f, h, self.prior_scale * log_r)

    def predict(self, experts: Mapping[int, nn.Module], names: Sequence[str], cand: torch.Tensor,
                router_weights: torch.Tensor, feats: torch.Tensor, pixels: PixelFn | None = None,
                encoded: Mapping[int, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Mixture answer over the candidates: chosen slot, its label, ``p(e, c)`` and weights ``a``
        (``encoded``: see :func:`gather_features`)."""
        H = gather_features(experts, names, cand, feats, pixels, encoded)
        with torch.no_grad():
            z, a = self(feats, H, router_weights.clamp_min(1e-30).log())
        logp, label = slot_best(experts, cand, z[:, None].expand_as(H))
        return _mixture(a, logp, label)


def average_predict(experts: Mapping[int, nn.Module], names: Sequence[str], cand: torch.Tensor, feats: torch.Tensor,
                    pixels: PixelFn | None = None, encoded: Mapping[int, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Uniform average of the candidates' own output distributions over the union of their classes
    (``encoded``: see :func:`gather_features`)."""
    H = gather_features(experts, names, cand, feats, pixels, encoded)
    logp, label = slot_best(experts, cand, H)
    return _mixture(torch.full(cand.shape, 1.0 / cand.shape[1]), logp, label)


def _mixture(a: torch.Tensor, logp: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
    joint = a.clamp_min(1e-12).log() + logp
    score, slot = joint.max(1)
    rows = torch.arange(len(slot))
    return {"slot": slot, "label": label[rows, slot], "score": score.exp(), "weights": a}


def sample_pseudo(stats: Sequence[TaskStats], n_total: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-norm pseudo-features from each task's class Gaussians (class mean, pooled within-class
    covariance), the same number per class; returns features, task index, class index."""
    g = torch.Generator().manual_seed(seed)
    n_classes = sum(len(s.class_means) for s in stats)
    per = max(1, n_total // max(1, n_classes))
    xs, ts, cs = [], [], []
    for t, s in enumerate(stats):
        L = torch.linalg.cholesky(s.class_cov.double())
        for c in range(len(s.class_means)):
            xs.append(pseudo_features(s.class_means.double(), L, torch.full((per,), c), g).float())
            ts.append(torch.full((per,), t))
            cs.append(torch.full((per,), c))
    return torch.cat(xs), torch.cat(ts), torch.cat(cs)


def train_global_fusion(experts: Mapping[int, nn.Module], names: Sequence[str], stats: Sequence[TaskStats],
                        route: Callable[[torch.Tensor], Routing], dim: int,
                        s: FusionSettings = FusionSettings()) -> tuple[GlobalFusion, dict]:
    """Fit a :class:`GlobalFusion` on pseudo-features; ``route(x)`` is the zoo's top-k
    :class:`clipzoo.router.gate.Routing` of ``x``.

    Loss: ``-log p(true task, true class)`` of the mixture, on samples whose true task the router
    put in the top-k (others have no right answer to learn). Experts stay frozen.
    """
    for name, exp in zip(names, (experts[e] for e in range(len(names)))):
        if exp.needs_pixels:
            raise ConfigError(f"fusion mode trains on feature statistics, but expert {name!r} ({exp.kind}) "
                              "works inside the image encoder: use --mode top1 or avg")
    x, t, c = sample_pseudo(stats, s.n_pseudo, s.seed)
    routing = route(x)
    cand, r = routing.indices, routing.weights
    hit = cand == t[:, None]
    keep = hit.any(1)
    x, t, c, cand, slot = x[keep], t[keep], c[keep], cand[keep], hit[keep].float().argmax(1)
    log_r = r[keep].clamp_min(1e-30).log()
    H = gather_features(experts, names, cand, x)
    W, valid = _padded_classifiers([experts[e] for e in range(len(names))])
    scale = torch.tensor([float(experts[e].logit_scale) for e in range(len(names))])
    model = GlobalFusion(dim, s.seed)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)
    loss = torch.tensor(float("nan"))
    for _ in range(s.epochs if len(x) else 0):
        perm = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), s.batch_size):
            i = perm[b:b + s.batch_size]
            z, a = model(x[i], H[i], log_r[i])
            logits = scale[t[i], None] * torch.einsum("bd,bcd->bc", z, W[t[i]])
            logp = logits.masked_fill(~valid[t[i]], float("-inf")).log_softmax(1)
            nll = -a.gather(1, slot[i, None]).clamp_min(1e-12).log()[:, 0] - logp.gather(1, c[i, None])[:, 0]
            loss = nll.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    info = {"n_pseudo": int(keep.numel()), "n_used": int(keep.sum()), "final_loss": round(float(loss.detach()), 6),
            "prior_scale": round(float(model.prior_scale.detach()), 6)}
    return model, info


def _padded_classifiers(experts: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's classifier padded to ``(E, C_max, D)`` and the mask of real classes."""
    ws = [exp.class_weights().detach() for exp in experts]
    c_max = max(len(w) for w in ws)
    W = torch.zeros(len(ws), c_max, ws[0].shape[1])
    valid = torch.zeros(len(ws), c_max, dtype=torch.bool)
    for e, w in enumerate(ws):
        W[e, :len(w)], valid[e, :len(w)] = w, True
    return W, valid
