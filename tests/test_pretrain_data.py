"""The procedural pretraining data: deterministic, varied, disjoint from the task images."""

from __future__ import annotations

import numpy as np
import torch

from clipzoo.tasks import synthetic
from clipzoo.tasks.data import load_builtin
from clipzoo.bench.pretrain_tiny import _shift, contrastive_loss
from clipzoo.bench.pretrain_data import dataset, sample


def test_samples_are_deterministic_and_seed_dependent():
    a, b, c = sample(0, 5), sample(0, 5), sample(1, 5)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image)) or a.caption != c.caption


def test_dataset_shapes_and_variety():
    images, captions, keys = dataset(0, 300)
    assert images.shape == (300, synthetic.SIZE, synthetic.SIZE, 3) and images.dtype == np.uint8
    assert len(set(captions)) > 150 and len(set(keys)) > 100
    assert images.reshape(300, -1).std(1).min() > 0  # no blank images
    assert any(k.startswith("builtin/") for k in keys) and any("digit" in c for c in captions)


def test_pretraining_images_never_equal_task_images():
    images, _, keys = dataset(0, 400)
    task = {np.asarray(im).tobytes() for d in synthetic.DOMAINS
            for im in load_builtin(d, n_train=48, n_test=16).train.images + load_builtin(d, n_train=0, n_test=16).test.images}
    assert not any(img.tobytes() in task for img in images)


def test_shift_moves_pixels_and_keeps_shape():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    y = _shift(x, torch.Generator().manual_seed(0), max_shift=2)
    assert y.shape == x.shape
    assert not torch.equal(y, x) or not torch.equal(_shift(x, torch.Generator().manual_seed(1), 2), x)


def test_contrastive_loss_prefers_matching_pairs():
    e = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    keys = torch.arange(6)
    good = contrastive_loss(e, e, keys, torch.tensor(20.0))
    bad = contrastive_loss(e, e.roll(1, 0), keys, torch.tensor(20.0))
    assert good < bad
