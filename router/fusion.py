"""AdapterFusion for the zoo (Pfeiffer et al., 2021): combine experts per input.

The layer. For a frozen image feature ``f`` and the adapted features ``h_e`` of a set of experts
(each expert's image side, in the joint space, :meth:`zoo.expert.Expert.adapted_features`)::

    q = Wq f,   k_e = Wk h_e,   v_e = Wv h_e,   a = softmax_e(q . k_e / sqrt(D)),
    z = normalize(sum_e a_e v_e)

``Wv`` starts at the identity (as in the paper; the zoo-wide layer of ``mode='fusion'`` keeps it
there, see :class:`GlobalFusion`), ``Wq``/``Wk`` at random; ``a`` are the per-input
fusion weights, ``z`` the one fused representation. Training is two-stage: experts are trained
first and stay frozen (their files are only ever read); only fusion parameters (and a new head)
are trained here.

Two uses:

* **Composed expert for a new task** (``add-task --kind fusion --from A,B``, :class:`FusionExpert`):
  the candidates are the fixed source experts plus, by default, the frozen feature itself
  (``include_base``: the identity "expert", like AdapterFusion's residual, so a source that does
  not fit the new domain can be ignored). ``logits = scale * z @ normalize(head)^T`` with ``head``
  initialised from the new task's class-name text embeddings. It is trained on the new task's own
  data, costs the fusion layer (3 D x D) plus the head, and is saved like any expert
  (``config.json``, ``weights.safetensors`` holding only its own tensors, ``stats.safetensors`` so
  the router can route to it). Its config records the sources and their weights' sha256; loading
  refuses a source whose weights changed.

* **Task-agnostic prediction over the routed top-k** (``mode='fusion'``, :class:`GlobalFusion`).
  The experts have disjoint class spaces, so the answer is a (task, class) pair scored as a
  mixture: ``p(e, c | x) = a_e(x) * softmax_c(scale_e * z @ W_e^T)`` over the router's top-k
  experts ``e`` (``W_e`` = expert e's adapted classifier). The fusion weights act as a learned task
  posterior and the fused feature is read by each candidate's own classifier. Here the attention
  logits also get the router's log-weight with a learned scale, ``q . k_e / sqrt(D) + beta log r_e``
  ("router top-k plus fusion"): without it the attention, trained on pseudo-features only, chose
  the task less often than the router itself did (0.78 vs 0.82 on mnist/fashion/cifar10/gtsrb with
  the tiny CLIP); with it, fusion starts from the router's belief and learns how far to trust it
  against the experts' features (beta settled near 0.3 there). The comparison
  modes use the same union: ``'avg'`` gives each of the top-k weight ``1/k`` and scores each
  expert's own adapted feature (uniform averaging of the experts' output distributions),
  ``'top1'`` answers with the router's first choice only.

  The global layer never needs old raw images and keeps ``add-task`` flat: it is trained lazily,
  the first time fusion mode is used on a given set of experts, on a fixed budget of
  *pseudo-features* drawn from each expert's stored class statistics (``class_means`` +
  ``class_cov`` of :mod:`router.stats`, unit-normalised like real features), routed by the
  zoo's router so the candidate sets look like those at test time. Cost: a fixed budget of
  samples and optimiser steps whatever the number of tasks (only routing the samples and reading
  the experts grow with it); ``add-task`` itself does no fusion work.
  Being a deterministic function of (expert files, k, settings, seed), it is a cache, stored as
  ``<cache root>/fusion/<key>.safetensors``, never inside the zoo directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load, load_file, save, save_file
from torch import nn

from router.gate import Routing
from router.stats import TaskStats, pseudo_features
from zoo import __version__
from zoo.errors import BackboneError, ConfigError, IntegrityError
from zoo.registry import atomic_write_bytes

MODES = ("top1", "avg", "fusion")
KIND = "fusion"
BASE = "<frozen>"  # name of the identity candidate in a composed expert's fusion weights
FORMAT_VERSION = 3  # of the global fusion's cache files: bump when GlobalFusion's tensors change
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"

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
                    pixels: PixelFn | None = None) -> torch.Tensor:
    """``H (B, K, D)``: candidate ``cand[b, j]``'s adapted feature of input ``b``; each expert runs
    once on the inputs that chose it."""
    H = feats.new_zeros(*cand.shape, feats.shape[1])
    with torch.no_grad():
        for e in cand.unique().tolist():
            rows, slots = (cand == e).nonzero(as_tuple=True)
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
@dataclass
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
        # features away from what each expert's classifier expects (task-agnostic accuracy on
        # mnist/fashion/cifar10/gtsrb: 0.444 with it learned, 0.463 frozen; top-1 0.47).
        self.fusion.value.weight.requires_grad_(False)
        self.prior_scale = nn.Parameter(torch.ones(()))

    def forward(self, f: torch.Tensor, h: torch.Tensor, log_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused feature and weights; ``log_r (B, K)``: the router's log-weights, a learned-scale prior."""
        return self.fusion(f, h, self.prior_scale * log_r)

    def predict(self, experts: Mapping[int, nn.Module], names: Sequence[str], cand: torch.Tensor,
                router_weights: torch.Tensor, feats: torch.Tensor, pixels: PixelFn | None = None
                ) -> dict[str, torch.Tensor]:
        """Mixture answer over the candidates: chosen slot, its label, ``p(e, c)`` and weights ``a``."""
        H = gather_features(experts, names, cand, feats, pixels)
        with torch.no_grad():
            z, a = self(feats, H, router_weights.clamp_min(1e-30).log())
        logp, label = slot_best(experts, cand, z[:, None].expand_as(H))
        return _mixture(a, logp, label)


def average_predict(experts: Mapping[int, nn.Module], names: Sequence[str], cand: torch.Tensor, feats: torch.Tensor,
                    pixels: PixelFn | None = None) -> dict[str, torch.Tensor]:
    """Uniform average of the candidates' own output distributions over the union of their classes."""
    H = gather_features(experts, names, cand, feats, pixels)
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
    :class:`router.gate.Routing` of ``x``.

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


def fusion_key(records: dict[str, dict], router: dict, top_k: int, s: FusionSettings) -> str:
    """Identifies a global fusion: every expert's weights hash, the router, ``k`` and the settings."""
    blob = json.dumps({"experts": sorted((n, r["sha256"]) for n, r in records.items()), "router": router, "k": top_k,
                       "settings": asdict(s), "version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load_or_train_global(cache_dir: Path, key: str, dim: int, train: Callable[[], tuple[GlobalFusion, dict]]
                         ) -> tuple[GlobalFusion, dict]:
    """The cached global fusion for ``key``, or a new one trained and written atomically."""
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        model = GlobalFusion(dim)
        try:
            model.load_state_dict(load(path.read_bytes()), strict=True)
            return model.eval(), {"cached": True}
        except (RuntimeError, ValueError, OSError):  # a damaged cache file: train it again
            pass
    model, info = train()
    cache_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"info": json.dumps(info)}))
    return model, {**info, "cached": False}


# ----- a composed expert for a new task ---------------------------------------------------------
class FusionExpert(nn.Module):
    """A new task served by fusing existing experts (the sources stay frozen and are not saved here)."""

    kind = KIND

    def __init__(self, sources: dict[str, nn.Module], classes: list[str], templates: list[str],
                 class_emb: torch.Tensor, logit_scale: float, fingerprint: str, include_base: bool = True,
                 source_sha256: dict[str, str] | None = None, seed: int = 0):
        super().__init__()
        if not sources and not include_base:
            raise ConfigError("a fusion expert needs at least one source expert (--from A,B)")
        self._sources = dict(sources)  # a plain dict: not submodules, so never trained nor saved here
        self.source_sha256 = dict(source_sha256 or {})
        self.classes = list(classes)
        self.templates = list(templates)
        self.logit_scale = logit_scale
        self.fingerprint = fingerprint
        self.include_base = include_base
        self.register_buffer("class_emb", class_emb.detach().clone().float())
        self.fusion = AdapterFusion(class_emb.shape[1], seed)
        self.head = nn.Parameter(class_emb.detach().clone().float())

    @property
    def sources(self) -> list[str]:
        return list(self._sources)

    @property
    def candidates(self) -> list[str]:
        return self.sources + ([BASE] if self.include_base else [])

    @property
    def needs_pixels(self) -> bool:
        return any(s.needs_pixels for s in self._sources.values())

    def fuse(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused feature ``(B, D)`` and fusion weights ``(B, K)`` over :attr:`candidates`."""
        with torch.no_grad():
            hs = [s.adapted_features(feats, pixels if s.needs_pixels else None) for s in self._sources.values()]
        hs += [feats] if self.include_base else []
        return self.fusion(feats, torch.stack(hs, dim=1))

    def adapted_features(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        return self.fuse(feats, pixels)[0]

    def class_weights(self) -> torch.Tensor:
        return F.normalize(self.head, dim=-1)

    def forward(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_scale * self.adapted_features(feats, pixels) @ self.class_weights().T

    def fusion_weights(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> list[dict[str, float]]:
        with torch.no_grad():
            a = self.fuse(feats, pixels)[1]
        return [{n: round(float(w), 6) for n, w in zip(self.candidates, row)} for row in a]

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save(self, folder: Path) -> list[str]:
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {"clipzoo_version": __version__, "kind": KIND, "sources": self.sources,
               "source_sha256": self.source_sha256, "include_base": self.include_base, "classes": self.classes,
               "templates": self.templates, "logit_scale": self.logit_scale, "backbone_fingerprint": self.fingerprint}
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "kind": KIND})
        return [CONFIG_FILE, WEIGHTS_FILE]


def load_fusion_expert(folder: Path, fingerprint: str, source: Callable[[str], nn.Module],
                       source_sha256: Callable[[str], str]) -> FusionExpert:
    """Load a :class:`FusionExpert`; ``source(name)`` gives a loaded source expert and
    ``source_sha256(name)`` its current weights hash (a changed source is refused)."""
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if cfg["backbone_fingerprint"] != fingerprint:
        raise BackboneError(f"fusion expert in {folder.name} was trained on backbone {cfg['backbone_fingerprint'][:12]}, "
                            f"not on the loaded {fingerprint[:12]}")
    for name, digest in cfg["source_sha256"].items():
        if source_sha256(name) != digest:
            raise IntegrityError(f"fusion expert {folder.name}: source expert {name!r} changed since it was "
                                 "composed; re-add the fusion expert")
    state = load_file(str(folder / WEIGHTS_FILE))
    exp = FusionExpert({n: source(n) for n in cfg["sources"]}, cfg["classes"], cfg["templates"], state["class_emb"],
                       cfg["logit_scale"], cfg["backbone_fingerprint"], cfg["include_base"], cfg["source_sha256"])
    exp.load_state_dict(state, strict=True)
    return exp.eval()
