"""The learned sparse router: a small gate on frozen CLIP image features, grown one task at a time.

No old images are needed. Each task keeps (in :class:`clipzoo.router.stats.TaskStats`) its class means,
class counts and pooled within-class shrunk covariance; the router copies what it needs (class
means, counts, the covariance's Cholesky factor, the OOD calibration) into its own file, so
routing and updating read one file whatever the number of experts.

The gate's logit for task ``t`` is ``MLP(x)_t``, or with ``prior=True`` ``log p_t(x) + MLP(x)_t``
(the task's class-mixture Gaussian log-likelihood from the kept statistics plus a learned
correction). Training samples pseudo-features from every task's class Gaussians
``N(mu_c, Sigma_t)`` (projected onto the unit sphere, like real CLIP features) and fits the MLP by
cross-entropy over tasks, plus an optional Switch-style load-balancing term. The prior is off by
default: the correction, trained on samples of the very Gaussians the prior scores, learns
nothing the prior lacks, and the sum routed worse than either part (the README's router section
has the figures). Adding a task appends one output row and fine-tunes
from the previous gate on a pool of fixed size (``pool`` samples shared by all tasks) for at most
``steps`` optimiser steps, stopping once the loss levels off (after ``min_steps``, the mean loss of
the last ``check_every`` steps improved on the window before by less than ``tol`` of it), so the
update cost is bounded and flat as experts are added. Optional real-feature
exemplars per task (``exemplars``, off by default) replace that many of the task's pseudo-features.

Routing: top-k of the gate's softmax; the "none" outcome is the calibrated OOD score of
:mod:`clipzoo.router.ood` (``ood_score > 0`` -> zero-shot fallback).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from clipzoo.router.gate import Routing, top_k
from clipzoo.router.ood import DEFAULT_QUANTILE, OODDetector
from clipzoo.router.stats import TaskStats, pseudo_features
from clipzoo.errors import ConfigError, RegistryError

KIND = "learned"


@dataclass
class RouterConfig:
    """Settings of the learned gate (saved in the router's JSON file)."""

    hidden: int = 128            # hidden width of the gate MLP; 0 = a linear gate
    prior: bool = False          # add each task's class-mixture Gaussian log-likelihood to its logit
    pool: int = 8192             # pseudo-features sampled per update, shared by all tasks
    min_per_task: int = 32       # ... but at least this many per task
    steps: int = 500             # at most this many optimiser steps when a task is added (warm start)
    min_steps: int = 100         # ... at least this many, then stop when the loss levels off
    check_every: int = 50        # window of steps whose mean loss is compared with the window before
    tol: float = 0.005           # levelled off: a window improves on the one before by less than this share
    cold_steps: int = 1200       # optimiser steps when the gate is built from scratch
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    balance: float = 0.0         # weight of the load-balancing term (Switch Transformer, eq. 4)
    exemplars: int = 0           # real features kept per task (off by default)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 0 or self.pool < 1 or self.min_per_task < 1 or self.steps < 1 or self.cold_steps < 1:
            raise ConfigError("router hidden must be >= 0 and pool, min_per_task, steps, cold_steps >= 1")
        if self.batch_size < 1 or self.lr <= 0 or self.balance < 0 or self.exemplars < 0:
            raise ConfigError("router batch_size must be >= 1, lr > 0, balance and exemplars >= 0")
        if self.min_steps < 1 or self.check_every < 1 or self.tol < 0:
            raise ConfigError("router min_steps and check_every must be >= 1, tol >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "RouterConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown router settings {', '.join(unknown)}: known are {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class TaskGaussians:
    """What the router keeps of one task: its class Gaussians, OOD calibration and exemplars
    (float32; the quantiles float64; router files of older versions in float64 are cast on load)."""

    class_means: torch.Tensor    # (C, D)
    class_counts: torch.Tensor   # (C,)
    chol: torch.Tensor           # (D, D) Cholesky factor of the pooled within-class covariance
    ood_quantiles: torch.Tensor  # (101,)
    exemplars: torch.Tensor      # (M, D), M may be 0

    def __post_init__(self) -> None:
        self.class_means, self.class_counts = self.class_means.float(), self.class_counts.float()
        self.chol, self.exemplars = self.chol.float(), self.exemplars.float()
        self.ood_quantiles = self.ood_quantiles.double()

    @classmethod
    def from_stats(cls, s: TaskStats, exemplars: torch.Tensor | None = None) -> "TaskGaussians":
        ex = exemplars if exemplars is not None else torch.empty(0, s.class_means.shape[1])
        return cls(s.class_means, s.class_counts, torch.linalg.cholesky(s.class_cov.double()),
                   s.ood_quantiles, F.normalize(ex.double(), dim=-1))

    def log_likelihood(self, dists: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` under the class mixture (up to a constant shared by all tasks), from the
        squared Mahalanobis distances ``(B, C)`` to the class means."""
        log_prior = torch.log(self.class_counts.clamp_min(1e-9) / self.class_counts.clamp_min(1e-9).sum())
        return torch.logsumexp(log_prior[None] - 0.5 * dists, 1) - 0.5 * logdet

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` features: the exemplars (up to ``n``) then pseudo-features, unit-normed."""
        real = self.exemplars[:n]
        m = n - len(real)
        cls = torch.multinomial(self.class_counts.clamp_min(1e-9), m, replacement=True, generator=gen)
        return torch.cat([real, pseudo_features(self.class_means, self.chol, cls, gen)])  # float32


class Gate(nn.Module):
    """Features (unit-normed, scaled by sqrt(D)) -> [MLP] -> one logit per expert."""

    def __init__(self, dim: int, hidden: int, n_out: int, seed: int = 0):
        super().__init__()
        self.scale = math.sqrt(dim)
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's random state alone
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Linear(dim, hidden), nn.GELU()) if hidden else nn.Identity()
        self.head = nn.Linear(hidden or dim, n_out)
        nn.init.zeros_(self.head.weight)   # a fresh gate adds nothing to the prior
        nn.init.zeros_(self.head.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(F.normalize(feats.float(), dim=-1) * self.scale))

    def resized(self, keep: list[int], extra: int) -> "Gate":
        """A copy whose output rows are ``keep`` (old indices) followed by ``extra`` new rows, which
        start at zero weight and the mean old bias."""
        new = copy.deepcopy(self)
        new.head = nn.Linear(self.head.in_features, len(keep) + extra)
        with torch.no_grad():
            new.head.weight.zero_()
            new.head.bias.fill_(float(self.head.bias[keep].mean()) if keep else 0.0)
            new.head.weight[:len(keep)] = self.head.weight[keep]
            new.head.bias[:len(keep)] = self.head.bias[keep]
        return new


class SparseRouter:
    """Learned top-k gate over the experts, with the calibrated OOD detector as the "none" outcome."""

    name = KIND

    def __init__(self, dim: int, config: RouterConfig = RouterConfig(), ood_quantile: float = DEFAULT_QUANTILE):
        self.dim, self.config, self.ood_quantile = dim, config, ood_quantile
        self.names: list[str] = []
        self.tasks: list[TaskGaussians] = []
        self.gate: Gate | None = None
        self._ood: OODDetector | None = None
        self.info: dict = {}

    # ----- building and updating -------------------------------------------------------------
    @classmethod
    def from_stats(cls, stats: dict[str, TaskStats], config: RouterConfig = RouterConfig(),
                   ood_quantile: float = DEFAULT_QUANTILE, exemplars: dict[str, torch.Tensor] | None = None
                   ) -> "SparseRouter":
        """A gate trained from scratch on every task's statistics."""
        if not stats:
            raise RegistryError("a learned router needs at least one task's statistics")
        dim = next(iter(stats.values())).class_means.shape[1]
        r = cls(dim, config, ood_quantile)
        ex = exemplars or {}
        r.names = list(stats)
        r.tasks = [TaskGaussians.from_stats(s, r._cap(ex.get(n))) for n, s in stats.items()]
        r.gate = Gate(dim, config.hidden, len(r.names), config.seed)
        r._train(config.cold_steps, early_stop=False)
        return r

    def add(self, name: str, stats: TaskStats, exemplars: torch.Tensor | None = None) -> None:
        """Give a new task its slot and fine-tune from the current gate (old tasks: pseudo-features)."""
        if name in self.names:
            raise RegistryError(f"the router already has a slot for {name!r}")
        if stats.class_means.shape[1] != self.dim:
            raise ConfigError(f"task {name!r} has {stats.class_means.shape[1]}-d features, the router {self.dim}-d")
        if self.gate is None:
            self.gate = Gate(self.dim, self.config.hidden, 1, self.config.seed)
        else:
            self.gate = self.gate.resized(list(range(len(self.names))), 1)
        self.names.append(name)
        self.tasks.append(TaskGaussians.from_stats(stats, self._cap(exemplars)))
        self._ood = None
        self._train(self.config.steps)

    def remove(self, name: str) -> None:
        """Drop a task's slot (its output row); the other rows are unchanged, so no training."""
        if name not in self.names:
            raise RegistryError(f"the router has no slot for {name!r}")
        i = self.names.index(name)
        keep = [j for j in range(len(self.names)) if j != i]
        self.gate = self.gate.resized(keep, 0) if keep else None
        del self.names[i], self.tasks[i]
        self._ood = None

    def _cap(self, exemplars: torch.Tensor | None) -> torch.Tensor | None:
        if exemplars is None or not self.config.exemplars:
            return None
        idx = torch.randperm(len(exemplars), generator=torch.Generator().manual_seed(self.config.seed))
        return exemplars[idx[:self.config.exemplars]]

    def pool(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training features and task labels: ``pool`` samples split evenly over the tasks."""
        per = max(self.config.min_per_task, self.config.pool // max(1, len(self.tasks)))
        xs = [t.sample(per, gen) for t in self.tasks]
        return torch.cat(xs).float(), torch.arange(len(xs)).repeat_interleave(per)

    def _train(self, steps: int, early_stop: bool = True) -> None:
        """At most ``steps`` optimiser steps on a fresh pool; with ``early_stop``, stop once the
        loss levels off (see :class:`RouterConfig`)."""
        t0 = time.perf_counter()
        c = self.config
        if len(self.tasks) < 2:  # one expert: its softmax weight is 1 whatever the gate says
            self.info = {"update_seconds": round(time.perf_counter() - t0, 4), "steps": 0, "pool": 0}
            return
        gen = torch.Generator().manual_seed(c.seed + 1000 * len(self.names))
        with one_thread():
            x, y = self.pool(gen)
            prior = self._prior(x)
            opt = torch.optim.AdamW(self.gate.parameters(), lr=c.lr, weight_decay=c.weight_decay, foreach=True)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
            self.gate.train()
            losses = torch.zeros(steps)
            done, stop_at, lr_end = 0, steps, c.lr
            while done < stop_at:
                idx = torch.randint(len(x), (min(c.batch_size, len(x)),), generator=gen)
                logits = self.gate(x[idx]) + prior[idx]
                loss = F.cross_entropy(logits, y[idx])
                if c.balance:
                    loss = loss + c.balance * balance_loss(logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[done] = loss.detach()
                done += 1
                if stop_at < steps:  # levelled off: the learning rate decays linearly to 0, then stop
                    for grp in opt.param_groups:
                        grp["lr"] = lr_end * (stop_at - done) / c.check_every
                    continue
                sched.step()
                if early_stop and done >= max(c.min_steps, 2 * c.check_every) and done % c.check_every == 0:
                    w = c.check_every
                    cur, prev = float(losses[done - w:done].mean()), float(losses[done - 2 * w:done - w].mean())
                    if prev - cur < c.tol * prev:
                        stop_at, lr_end = min(steps, done + w), opt.param_groups[0]["lr"]
            self.gate.eval()
            with torch.no_grad():
                acc = float(((self.gate(x) + prior).argmax(1) == y).float().mean())
        self.info = {"update_seconds": round(time.perf_counter() - t0, 4), "steps": done, "max_steps": steps,
                     "pool": len(x), "pool_acc": round(acc, 6), "final_loss": round(float(losses[done - 1]), 6)}

    # ----- routing ---------------------------------------------------------------------------
    @property
    def ood(self) -> OODDetector:
        """The calibrated OOD detector over the router's tasks (built once per set of tasks)."""
        if self._ood is None:
            self._ood = OODDetector([t.class_means for t in self.tasks], [t.chol for t in self.tasks],
                                    [t.ood_quantiles for t in self.tasks], self.ood_quantile)
        return self._ood

    def _prior(self, feats: torch.Tensor, padded: torch.Tensor | None = None) -> torch.Tensor:
        """Each task's class-mixture log-likelihood ``(B, E)``, or zeros with ``prior=False``;
        ``padded``: :meth:`OODDetector.padded_distances` of ``feats`` if already computed."""
        if not self.config.prior:
            return torch.zeros(len(feats), len(self.tasks))
        dists = self.ood.distances(feats, padded)
        return torch.stack([t.log_likelihood(d, ld) for t, d, ld in zip(self.tasks, dists, self.ood.logdets.float())],
                           1).float()

    @torch.no_grad()
    def logits(self, feats: torch.Tensor, padded: torch.Tensor | None = None) -> torch.Tensor:
        """Gate logits ``(B, E)``: prior log-likelihood + learned correction."""
        return self.gate(feats) + self._prior(feats, padded)

    def scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the experts ``(B, E)``."""
        return self.logits(feats).log_softmax(1)

    def route(self, feats: torch.Tensor, k: int = 1) -> Routing:
        """Top-k of the gate and the OOD score, all tasks scored in one batched float32 pass."""
        padded = self.ood.padded_distances(feats)
        return top_k(self.logits(feats, padded).log_softmax(1), self.names, k, self.ood.score(feats, padded))

    # ----- files -----------------------------------------------------------------------------
    def save(self, folder: Path, stem: str) -> list[str]:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` into ``folder``; return their names."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"gate.{k}": v.detach().contiguous() for k, v in self.gate.state_dict().items()}
        for i, t in enumerate(self.tasks):
            tensors.update({f"task.{i}.{k}": v.contiguous() for k, v in t.__dict__.items()})
        save_file(tensors, str(folder / f"{stem}.safetensors"))
        meta = {"kind": KIND, "names": self.names, "dim": self.dim, "ood_quantile": self.ood_quantile,
                "config": asdict(self.config), "last_update": self.info}
        (folder / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
        return [f"{stem}.safetensors", f"{stem}.json"]

    @classmethod
    def load(cls, weights: Path, meta_file: Path, ood_quantile: float | None = None) -> "SparseRouter":
        """Load a router saved by :meth:`save` (``ood_quantile`` overrides the saved one)."""
        meta = json.loads(meta_file.read_text())
        r = cls(meta["dim"], RouterConfig.from_dict(meta["config"]),
                meta["ood_quantile"] if ood_quantile is None else ood_quantile)
        state = load_file(str(weights))
        r.names = list(meta["names"])
        r.tasks = [TaskGaussians(**{f.name: state[f"task.{i}.{f.name}"] for f in fields(TaskGaussians)})
                   for i in range(len(r.names))]
        r.gate = Gate(r.dim, r.config.hidden, len(r.names))
        r.gate.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("gate.")}, strict=True)
        r.gate.eval()
        r.info = meta.get("last_update", {})
        return r


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the gate's ops are too small to gain from more, and on a shared
    machine a second thread that waits for a busy core makes them many times slower."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def balance_loss(logits: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e * P_e`` (1 when perfectly balanced):
    ``f_e`` = share of the batch whose top-1 is ``e``, ``P_e`` = mean gate probability of ``e``."""
    probs = logits.softmax(1)
    f = F.one_hot(probs.argmax(1), probs.shape[1]).float().mean(0)
    return probs.shape[1] * (f * probs.mean(0)).sum()
