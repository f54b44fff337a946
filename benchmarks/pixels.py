"""Pixels for the full-fine-tuning baselines: each task's preprocessed images, decoded once per
process, and ZSCL's reference image set.

The fine-tuning baselines (:mod:`clipzoo.bench.finetune`) run the image tower on pixels instead of
reading cached features, so every image is opened and preprocessed (the backbone's own eval
transform, as ``Store.pixels`` does) exactly once per benchmark process and kept as one float32
tensor per split: never again per run, step or epoch.

The reference set (ZSCL distils on a reference image set and a reference vocabulary that belong
to no task of the sequence) is made of the built-in synthetic domains' ``pretrain`` split
(:func:`clipzoo.tasks.synthetic.render` with ``split="pretrain"``): images that are never a train
or test image of any task (disjoint index ranges), drawn from the distribution the embedded
backbone was pretrained on (as ZSCL's ImageNet / Conceptual Captions stand for CLIP's pretraining
data). Its vocabulary is those domains' class names in the prompt ``"a photo of a {}."``. Domains
that are part of the benchmark's sequence or its held-out domain are left out; only if that leaves
none are all four kept (their ``pretrain`` images still never overlap a task's train or test split).
"""

from __future__ import annotations

import torch

from clipzoo.tasks import synthetic
from clipzoo.tasks.data import open_image
from clipzoo.tasks.spec import TaskData
from clipzoo.zoo.backbone import Backbone

REFERENCE_TEMPLATE = "a photo of a {}."
_MEMO: dict[tuple, tuple[object, tuple[torch.Tensor, ...]]] = {}
_MEMO_MAX = 64


def encode_pixels(images, bb: Backbone) -> torch.Tensor:
    """Preprocessed pixels ``(N, 3, H, W)`` of images (paths or PIL images), float32."""
    if not len(images):
        return torch.empty(0, 3, *bb.preprocess_cfg.get("size", (32, 32)))
    return torch.stack([bb.preprocess(open_image(im)) for im in images])


def task_pixels(task: TaskData, bb: Backbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train pixels, train labels, test pixels, test labels) of a task, decoded once per process.

    Memoised by the identity of the task's image lists (kept alive by the memo, so an id is never
    reused while its entry exists) and the backbone's preprocessing."""
    key = (id(task.train.images), id(task.test.images), bb.preprocess_id)
    hit = _MEMO.get(key)
    if hit is not None:
        return hit[1]  # type: ignore[return-value]
    out = (encode_pixels(task.train.images, bb), torch.tensor(task.train.labels),
           encode_pixels(task.test.images, bb), torch.tensor(task.test.labels))
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = ((task.train.images, task.test.images), out)
    return out


def reference_domains(exclude: set[str]) -> list[str]:
    """The built-in domains used for the reference set: those not named in ``exclude`` (task names,
    held-out name, or ``builtin:<domain>`` sources of the sequence), or all when none is left."""
    keep = [d for d in synthetic.DOMAINS if d not in exclude and f"builtin:{d}" not in exclude]
    return keep or list(synthetic.DOMAINS)


def reference_set(bb: Backbone, exclude: set[str], per_class: int) -> tuple[torch.Tensor, list[str], str]:
    """(pixels, reference texts, a one-line description) of ZSCL's reference set."""
    domains = reference_domains(exclude)
    key = ("reference", tuple(domains), per_class, bb.preprocess_id)
    hit = _MEMO.get(key)
    if hit is None:
        images = [synthetic.render(d, c, i, "pretrain") for d in domains for c in synthetic.DOMAINS[d]
                  for i in range(per_class)]
        texts = [REFERENCE_TEMPLATE.format(c) for d in domains for c in synthetic.DOMAINS[d]]
        hit = (None, (encode_pixels(images, bb), texts))
        _MEMO[key] = hit
    px, texts = hit[1]
    what = (f"{len(px)} reference images ({per_class} per class) from the 'pretrain' split of the built-in "
            f"domains {', '.join(domains)} (never a task's train/test image), vocabulary: their {len(texts)} "
            f"class names as '{REFERENCE_TEMPLATE}'")
    return px, list(texts), what
