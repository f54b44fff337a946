"""Contrastive pretraining of the embedded tiny CLIP on procedural image/caption data.

Run once by the maintainers (``clipzoo pretrain-tiny``); its output is the packaged
``zoo/assets/clipzoo-tiny.safetensors``. The pairs come from :mod:`clipzoo.bench.pretrain_data`
(compositional scenes, glyphs, textures, natural-image-like clutter and the built-in synthetic
domains' ``pretrain`` split, which never overlaps the ``train``/``test`` images that tasks use);
no real image is ever used. A pool of ``n_samples`` pairs is drawn once and shown ``epochs``
times, each time shifted by a few random pixels. Several pairs can share the same content (the
same built-in class, or the same caption), so the loss is a multi-positive InfoNCE: every pair
with the same content key counts as a positive.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from clipzoo.runtime import progress_bar

from clipzoo.zoo.backbone import ASSETS, TINY_MODEL
from clipzoo.bench.pretrain_data import dataset

DEFAULT_CONFIG = ASSETS / f"{TINY_MODEL}.json"


def _to_pixels(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)`` (what the eval preprocessing gives)."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge padding)."""
    n, _, h, w = x.shape
    pad = F.pad(x, [max_shift] * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, 3, h, w + 2 * max_shift)
    out = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, 3, h, w)
    return out.gather(3, cols)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE over unit-norm embeddings; ``keys`` equal = positive pair."""
    logits = scale * img @ txt.T
    pos = (keys[:, None] == keys[None, :]).float()
    pos = pos / pos.sum(1, keepdim=True)
    return 0.5 * (-(pos * logits.log_softmax(1)).sum(1).mean() - (pos * logits.log_softmax(0)).sum(0).mean())


def pretrain_tiny(out: Path, config: Path = DEFAULT_CONFIG, n_samples: int = 36_000, epochs: int = 6,
                  batch_size: int = 256, lr: float = 2e-3, seed: int = 0) -> Path:
    """Train the tiny CLIP of ``config`` from a seeded init and save fp16 safetensors weights to ``out``."""
    config = Path(config)
    name = config.stem
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = open_clip.create_model(name)
    tokenizer = open_clip.get_tokenizer(name)
    images, captions, keys = dataset(seed, n_samples)
    key_ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    keys_t = torch.tensor([key_ids[k] for k in keys])
    images_t = torch.from_numpy(images)
    tokens = tokenizer(captions)
    pcfg = model.visual.preprocess_cfg
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps = epochs * (n_samples // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = progress_bar(total=steps, desc=f"pretrain {name}")
    for _ in range(epochs):
        perm = torch.randperm(n_samples, generator=gen)
        for b in range(n_samples // batch_size):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            x = _shift(_to_pixels(images_t[idx], pcfg["mean"], pcfg["std"]), gen)
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
            loss = contrastive_loss(img, txt, keys_t[idx], model.logit_scale.exp())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": name, "seed": str(seed), "epochs": str(epochs), "n_samples": str(n_samples)}
    save_file(state, str(out), metadata=meta)
    return out
