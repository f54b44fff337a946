"""How good are a tiny CLIP's frozen image features? Probe one or more (config, weights) pairs.

For each backbone, on the real domains of ``--data-dir`` (ImageFolder layout) it reports:
- ``probe`` / ``val_probe``: logistic-regression linear probe (training split less a 10% validation
  split -> test split / validation split) on the unit-norm image embedding, per domain and the mean;
  a backbone is chosen by the validation figures, never the test ones;
- ``routing`` / ``val_routing``: 8-way domain identification of the test (validation) images, one Gaussian per domain fitted
  on its train embeddings (Ledoit-Wolf covariance), prediction = argmax log-likelihood;
and on the built-in synthetic domains ``zeroshot``: accuracy of the text classifier built from
the default prompt templates (``tasks.spec.DEFAULT_TEMPLATES``) on each domain's test split.

Usage (pairs of --config/--weights, given in the same order)::

    python -m clipzoo.bench.backbone_probe --data-dir ../shared/data \\
        --config zoo/assets/clipzoo-tiny.json --weights zoo/assets/clipzoo-tiny.safetensors \\
        --config cand.json --weights cand.safetensors
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression

from clipzoo.tasks import synthetic
from clipzoo.tasks.data import load_builtin, load_imagefolder, open_image
from clipzoo.tasks.spec import DEFAULT_TEMPLATES
from clipzoo.tasks.validation import validation_indices

REAL_DOMAINS = ["mnist", "fashion_mnist", "cifar10", "gtsrb", "flowers", "dtd", "rsscn7", "skin_lesion"]


def load_model(config: Path, weights: Path, name: str) -> torch.nn.Module:
    """Register ``config`` under ``name`` and load ``weights`` through open_clip's pretrained path."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / f"{name}.json"
        shutil.copy(config, cfg)
        open_clip.add_model_config(cfg)
    model = open_clip.create_model(name, pretrained=str(weights), require_pretrained=True, weights_only=True)
    return model.eval()


def preprocess_of(model: torch.nn.Module):
    return image_transform_v2(PreprocessCfg(**dict(model.visual.preprocess_cfg)), is_train=False)


def pixels(images: list, preprocess) -> torch.Tensor:
    return torch.stack([preprocess(open_image(im)) for im in images])


def load_real(data_dir: Path, preprocess, domains: list[str] = REAL_DOMAINS) -> dict[str, tuple]:
    """``{domain: (train_pixels, train_labels, test_pixels, test_labels)}``."""
    out = {}
    for d in domains:
        task = load_imagefolder(data_dir / d)
        out[d] = (pixels(task.train.images, preprocess), np.array(task.train.labels),
                  pixels(task.test.images, preprocess), np.array(task.test.labels))
    return out


@torch.no_grad()
def embed(model: torch.nn.Module, px: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Unit-norm image embeddings."""
    return torch.cat([F.normalize(model.encode_image(px[i:i + batch]), dim=-1)
                      for i in range(0, len(px), batch)]).numpy()


def linear_probe(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, yte: np.ndarray) -> float:
    clf = LogisticRegression(max_iter=2000).fit(ftr, ytr)
    return float((clf.predict(fte) == yte).mean())


def domain_routing(train: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> float:
    """Accuracy of telling each test image's domain: per-domain Gaussian, argmax log-likelihood."""
    names = list(train)
    fits = [LedoitWolf().fit(train[d]) for d in names]
    logdets = [np.linalg.slogdet(f.covariance_)[1] for f in fits]
    correct = total = 0
    for true, d in enumerate(names):
        ll = np.stack([-0.5 * (f.mahalanobis(test[d]) + ld) for f, ld in zip(fits, logdets)], axis=1)
        correct += int((ll.argmax(1) == true).sum())
        total += len(test[d])
    return correct / total


@torch.no_grad()
def zeroshot(model: torch.nn.Module, tokenizer, preprocess, n_test: int = 40) -> dict[str, float]:
    """Zero-shot accuracy on each built-in synthetic domain's test split."""
    out = {}
    for domain in synthetic.DOMAINS:
        task = load_builtin(domain, n_train=0, n_test=n_test)
        texts = [t.format(c) for c in task.prompts_classes for t in DEFAULT_TEMPLATES]
        txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        cls = F.normalize(txt.view(len(task.classes), len(DEFAULT_TEMPLATES), -1).mean(1), dim=-1)
        img = torch.from_numpy(embed(model, pixels(task.test.images, preprocess)))
        out[domain] = float(((img @ cls.T).argmax(1).numpy() == np.array(task.test.labels)).mean())
    return out


def probe_backbone(model: torch.nn.Module, tokenizer, real: dict[str, tuple]) -> dict:
    """All three measurements for one model on preloaded real pixels. The probe and the domain
    Gaussians fit on each training split less its validation split (``clipzoo.tasks.validation``
    defaults); ``val_*`` figures are the ones to choose a backbone by, the test figures only report."""
    full = {d: embed(model, v[0]) for d, v in real.items()}
    cut = {d: validation_indices(real[d][1].tolist()) for d in real}
    tr = {d: full[d][cut[d][0]] for d in real}
    va = {d: full[d][cut[d][1]] for d in real}
    te = {d: embed(model, v[2]) for d, v in real.items()}
    probe = {d: linear_probe(tr[d], real[d][1][cut[d][0]], te[d], real[d][3]) for d in real}
    val = {d: linear_probe(tr[d], real[d][1][cut[d][0]], va[d], real[d][1][cut[d][1]]) for d in real}
    zs = zeroshot(model, tokenizer, preprocess_of(model))
    return {"probe": probe, "probe_mean": float(np.mean(list(probe.values()))),
            "val_probe": val, "val_probe_mean": float(np.mean(list(val.values()))),
            "routing": domain_routing(tr, te), "val_routing": domain_routing(tr, va),
            "zeroshot": zs, "zeroshot_mean": float(np.mean(list(zs.values())))}


def _table(results: dict[str, dict]) -> str:
    names = list(results)
    rows = [("probe " + d, [results[n]["probe"][d] for n in names]) for d in next(iter(results.values()))["probe"]]
    rows += [("probe mean", [results[n]["probe_mean"] for n in names]),
             ("probe mean, validation (the choice)", [results[n]["val_probe_mean"] for n in names]),
             ("routing (8-way)", [results[n]["routing"] for n in names]),
             ("routing (8-way), validation", [results[n]["val_routing"] for n in names])]
    rows += [("zero-shot " + d, [results[n]["zeroshot"][d] for n in names]) for d in synthetic.DOMAINS]
    rows += [("zero-shot mean", [results[n]["zeroshot_mean"] for n in names])]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for m, vals in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True, help="folder holding the real domains")
    ap.add_argument("--config", type=Path, action="append", required=True, help="open_clip model config JSON")
    ap.add_argument("--weights", type=Path, action="append", required=True, help="safetensors weights")
    ap.add_argument("--domains", default=",".join(REAL_DOMAINS), help="comma-separated real domains")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if len(args.config) != len(args.weights):
        ap.error("give one --config per --weights")
    torch.manual_seed(0)
    results, real_cache = {}, {}
    for i, (cfg, w) in enumerate(zip(args.config, args.weights)):
        model = load_model(cfg, w, f"probe{i}-{w.stem}")
        tokenizer = open_clip.get_tokenizer(f"probe{i}-{w.stem}")
        key = json.dumps(dict(model.visual.preprocess_cfg), sort_keys=True, default=str)
        if key not in real_cache:
            real_cache[key] = load_real(args.data_dir, preprocess_of(model), args.domains.split(","))
        label = w.stem if w.stem not in results else f"{w.stem}#{i}"
        results[label] = probe_backbone(model, tokenizer, real_cache[key])
    print(json.dumps(results, indent=2) if args.json else _table(results))


if __name__ == "__main__":
    main()
