"""The benchmark's methods by name, and how the harness builds them and feeds them.

- ``zero-shot`` and ``slda`` (training-free);
- ``adapter-*``: one shared CLIP-Adapter trained on cached frozen features
  (:mod:`clipzoo.bench.baselines`: naive, EWC, LwF, ZSCL-style distillation, and joint retraining);
- ``ft-naive``, ``ft-zscl``, ``clip-cite``: full fine-tuning of the backbone's towers in pixel
  space (:mod:`clipzoo.bench.finetune`); they read pixels (:mod:`clipzoo.bench.pixels`), the
  others cached features;
- ``avalanche-*``: avalanche-lib's own strategies as cross-checks (optional extra).
"""

from __future__ import annotations

import torch

from clipzoo.bench import baselines as B
from clipzoo.bench import finetune as FT
from clipzoo.bench import pixels as PX
from clipzoo.bench.slda import SLDA
from clipzoo.errors import ConfigError
from clipzoo.tasks.spec import TaskData
from clipzoo.tasks.synthetic import DOMAINS as REFERENCE_VOCAB
from clipzoo.zoo.backbone import Backbone
from clipzoo.zoo.train import TrainSettings

ADAPTER_METHODS = ("adapter-naive", "adapter-ewc", "adapter-lwf", "adapter-zscl", "adapter-joint")
FT_METHODS = tuple(FT.FT_METHODS)  # full fine-tuning in pixel space: ft-naive, ft-zscl, clip-cite
METHODS = ("zero-shot", "slda", *ADAPTER_METHODS, *FT_METHODS)
CROSS_CHECKS = ("avalanche-naive", "avalanche-ewc", "avalanche-lwf")


def on_pixels(method) -> bool:
    """Whether a method reads preprocessed pixels (the fine-tuning baselines) instead of features."""
    return getattr(method, "space", "features") == "pixels"


def inputs(method, j: int, feats: list, pix: list | None) -> torch.Tensor:
    """Task ``j``'s test inputs for ``method``: pixels for the fine-tuning baselines, else cached features."""
    return pix[j][2] if on_pixels(method) else feats[j][2]


def exclude(tasks: list[TaskData], held: tuple[str, torch.Tensor] | None) -> frozenset[str]:
    """Names and sources of every task of the sequence and the held-out domain: kept out of ZSCL's
    reference set."""
    return frozenset([t.name for t in tasks] + [t.source for t in tasks] + ([held[0]] if held else []))


def check_ft(s) -> None:
    """Validate a ``BenchSettings``' fine-tuning fields: ``ft_lr`` (AdamW), ``ft_steps`` (minibatches
    per task: a fixed iteration budget, sized for the 8-domain 3x2 run on 2 CPUs), ``ft_batch_size``,
    ``ft_zscl_weight`` / ``ft_cite_weight`` (distillation weights), ``ft_avg_every`` (ZSCL's
    weight-ensembling interval, at most ``ft_steps``), ``ft_ref_per_class`` (reference images per
    reference class), ``ft_threads`` (torch threads while fine-tuning; 0: the benchmark's)."""
    if min(s.ft_steps, s.ft_batch_size, s.ft_avg_every, s.ft_ref_per_class) < 1 or s.ft_lr <= 0 \
            or min(s.ft_zscl_weight, s.ft_cite_weight, s.ft_threads) < 0 or s.ft_avg_every > s.ft_steps:
        raise ConfigError("ft_steps, ft_batch_size, ft_avg_every and ft_ref_per_class must be >= 1, ft_lr > 0, "
                          "the ft weights and ft_threads >= 0, and ft_avg_every <= ft_steps")


def ft_settings(s, weight: float = 1.0) -> FT.FTSettings:
    """The fine-tuning baselines' settings from a ``BenchSettings``, with one distillation weight."""
    return FT.FTSettings(lr=s.ft_lr, steps=s.ft_steps, batch_size=s.ft_batch_size, weight=weight,
                         avg_every=s.ft_avg_every, ref_per_class=s.ft_ref_per_class, threads=s.ft_threads)


def build(names: list[str], embs: list[torch.Tensor], bb: Backbone, train: TrainSettings, s,
          texts: list[tuple[list[str], list[str]]] | None = None, excluded: frozenset[str] = frozenset()) -> list:
    """Fresh methods (``s``: the ``BenchSettings``) for tasks with class-text embeddings ``embs``;
    ``texts`` gives each task's (class names, templates) for the fine-tuning methods' text towers,
    ``excluded`` the task and held-out names and sources kept out of the reference set
    (:func:`clipzoo.bench.pixels.reference_set`; ``adapter-zscl`` uses its vocabulary too)."""
    scale = bb.logit_scale
    domains = PX.reference_domains(set(excluded))
    ref_texts = [PX.REFERENCE_TEMPLATE.format(c) for d in domains for c in REFERENCE_VOCAB[d]]
    reference = bb.encode_text(ref_texts) if "adapter-zscl" in names else None
    if texts is None and any(n in FT_METHODS for n in names):
        raise ConfigError("the fine-tuning baselines need each task's class names and templates")

    def zscl():
        px, rt, what = PX.reference_set(bb, set(excluded), s.ft_ref_per_class)
        return FT.FTZSCL(bb, embs, texts, ft_settings(s, s.ft_zscl_weight), px, rt, what)

    make = {
        "zero-shot": lambda: B.ZeroShot(embs, scale),
        "slda": lambda: SLDA(embs, scale, shrinkage=s.slda_shrinkage),
        "adapter-naive": lambda: B.NaiveSequential(embs, scale, train),
        "adapter-ewc": lambda: B.EWC(embs, scale, train, lam=s.ewc_lambda),
        "adapter-lwf": lambda: B.LwF(embs, scale, train, alpha=s.lwf_alpha),
        "adapter-zscl": lambda: B.ZSCL(embs, scale, train, reference=reference, beta=s.zscl_beta),
        "adapter-joint": lambda: B.Joint(embs, scale, train),
        "ft-naive": lambda: FT.FineTune(bb, embs, texts, ft_settings(s)),
        "ft-zscl": zscl,
        "clip-cite": lambda: FT.CLIPCITE(bb, embs, texts, ft_settings(s, s.ft_cite_weight)),
    }
    if any(n in CROSS_CHECKS for n in names):
        from clipzoo.bench.avalanche_check import make_cross_checks

        make.update(make_cross_checks(embs, scale, train, s))
    return [make[n]() for n in names]
