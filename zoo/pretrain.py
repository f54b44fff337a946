"""Contrastive pretraining of the embedded tiny CLIP on the built-in synthetic image/caption data.

Run once by the maintainers (``clipzoo pretrain-tiny``); its output is the packaged
``zoo/assets/clipzoo-tiny.safetensors``. Images come from the synthetic domains' ``pretrain``
split, which never overlaps the ``train``/``test`` images that tasks use. Captions are the class
names in varied templates. Because a batch holds many images of one class, the loss is a
multi-positive InfoNCE: every caption of the same class counts as a positive.
"""

from __future__ import annotations

import random
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from tasks import synthetic
from zoo.backbone import TINY_MODEL

CAPTION_TEMPLATES = [
    "a photo of a {}.", "an image of a {}.", "a {}.", "a picture of a {}.", "a drawing of a {}.",
    "a close-up of a {}.", "a rendering of the {}.", "this is a {}.", "the {}.", "a small {}.",
]


def pretrain_tiny(out: Path, per_class: int = 240, epochs: int = 12, batch_size: int = 128, seed: int = 0) -> Path:
    """Train the tiny CLIP from a seeded init and save fp16 safetensors weights to ``out``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_MODEL)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    names, pixels, labels = [], [], []
    for domain, classes in synthetic.DOMAINS.items():
        for cls in classes:
            names.append(cls)
            for i in range(per_class):
                pixels.append(preprocess(synthetic.render(domain, cls, i, "pretrain")))
                labels.append(len(names) - 1)
    pixels_t, labels_t = torch.stack(pixels), torch.tensor(labels)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    steps = epochs * (len(labels) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(total=steps, desc="pretrain tiny CLIP")
    for _ in range(epochs):
        perm = torch.randperm(len(labels))
        for b in range(len(labels) // batch_size):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            y = labels_t[idx]
            caps = [rng.choice(CAPTION_TEMPLATES).format(names[i]) for i in y.tolist()]
            img = F.normalize(model.encode_image(pixels_t[idx]), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(caps)), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            pos = (y[:, None] == y[None, :]).float()
            pos = pos / pos.sum(1, keepdim=True)
            loss = 0.5 * (-(pos * logits.log_softmax(1)).sum(1).mean() - (pos * logits.log_softmax(0)).sum(0).mean())
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
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"model": TINY_MODEL, "seed": str(seed), "epochs": str(epochs)})
    return out
