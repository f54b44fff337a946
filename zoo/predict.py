"""Answering with a zoo: route each input, run each chosen expert once on its inputs, fall back
to zero-shot CLIP for inputs of no known task, or combine the routed top-k (average or fusion).

:class:`Predictor` is the part of :class:`clipzoo.zoo.zoo.Zoo` that answers; it only reads the
:class:`clipzoo.zoo.store.Store`. The zoo-wide fusion layer (:class:`clipzoo.router.fusion.GlobalFusion`)
is a deterministic function of the experts' files, ``k`` and its settings, so it is cached under
the cache root (never inside the zoo) by :func:`load_or_train_global`. The cache root also records
the ``k`` fusion mode was used with on each zoo, and ``add_task`` trains those ahead, so a
``predict --mode fusion`` after an add finds its fusion ready.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load, save

from clipzoo.errors import ConfigError, DataError, RegistryError
from clipzoo.router.fusion import (FORMAT_VERSION, MODES, FusionSettings, GlobalFusion, average_predict,
                                   train_global_fusion)
from clipzoo.router.gate import Routing
from clipzoo.router.groups import Groups
from clipzoo.router.ranpac import RanpacRouter
from clipzoo.runtime import cache_root
from clipzoo.tasks.data import check_image, load_task
from clipzoo.tasks.spec import DEFAULT_TEMPLATES, ImageSource, TaskData
from clipzoo.zoo.encoders import RowHooks, encode_image
from clipzoo.zoo.registry import atomic_write_bytes

PixelFn = Callable[[list[int]], torch.Tensor]


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


class Predictor:
    """Routing, prediction, fallback, fusion and evaluation over a store (mixed into ``Zoo``)."""

    fusion_settings: FusionSettings = FusionSettings()  # frozen; assign another to an instance to change it

    def __init__(self) -> None:
        self.fusion_info: dict = {}  # how the last global fusion was obtained (trained: loss, samples; or cached)
        self._fusions: dict[str, GlobalFusion] = {}
        self._zero_shot_emb: dict[tuple[str, ...], torch.Tensor] = {}

    def _require_experts(self) -> None:
        if not self.names:
            raise RegistryError(f"the zoo at {self.root} has no experts yet: add one with 'clipzoo add-task'")

    def route(self, feats: torch.Tensor, top_k: int = 1) -> Routing:
        self._require_experts()
        return self.router().route(feats, top_k)

    def predict(self, images: Sequence[ImageSource], task: str | None = None, top_k: int = 1,
                mode: str = "top1", fallback: bool = True, classes: Sequence[str] | None = None) -> list[dict]:
        """Answers for images (paths or PIL images), routed unless ``task`` is given; see
        :meth:`predict_features` and :meth:`predict_fused` for the keys.

        An image that cannot be read (missing, not an image, a decompression bomb, truncated: see
        :func:`clipzoo.tasks.data.open_image`) does not stop the others: its place in the list holds
        ``{"path": ..., "error": "<one line>"}``. Its header is checked before anything is encoded."""
        self._require_experts()
        if task is not None:
            self.record(task)
        errors: dict[int, str] = {}
        for i, img in enumerate(images):
            try:
                check_image(img)
            except DataError as e:
                errors[i] = str(e)
        good = [i for i in range(len(images)) if i not in errors]
        if good:  # the decoder can still find a truncated file: recorded in errors, skipped
            found: dict[int, str] = {}
            feats = self.features([images[i] for i in good], "encode", errors=found)
            errors.update({good[j]: msg for j, msg in found.items()})
            good = [i for j, i in enumerate(good) if j not in found]
        answers: dict[int, dict] = {}
        if good:
            pixels = lambda idx: self.pixels([images[good[j]] for j in idx])  # noqa: E731
            preds = self.predict_features(feats, task, top_k, pixels=pixels, mode=mode, fallback=fallback,
                                          classes=classes)
            self._add_source_weights(feats, preds, pixels)
            answers = dict(zip(good, preds))
        out = []
        for i, img in enumerate(images):
            path = str(img) if isinstance(img, (str, Path)) else f"<image {i}>"
            out.append({"path": path, "error": errors[i]} if i in errors else {"path": path, **answers[i]})
        return out

    def predict_features(self, feats: torch.Tensor, task: str | None = None, top_k: int = 1,
                         pixels: PixelFn | None = None, mode: str = "top1",
                         fallback: bool = True, classes: Sequence[str] | None = None) -> list[dict]:
        """Predictions for frozen features; each input runs only through its chosen expert
        (inputs grouped by expert). ``pixels(indices)`` supplies preprocessed pixels for experts
        that work inside the encoder. ``mode`` 'avg' / 'fusion' combine the routed top-k
        (:meth:`predict_fused`); a given ``task`` ignores it.

        Routed inputs that belong to no known task (calibrated OOD score > 0) are answered by
        zero-shot CLIP over ``classes`` (default: every expert's classes) with ``task`` None and
        ``fallback`` True, unless ``fallback=False``. A router that models classes (ranpac) adds its
        class posterior within the task to the expert's log-probabilities, routed or not
        (:mod:`clipzoo.router.ranpac`). Each answer has task, label, score, routing
        (top-k weights), fallback, and ``ood_score`` when routed."""
        if mode != "top1" and task is None:
            return self.predict_fused(feats, top_k, pixels, mode, fallback, classes)
        if task is not None:  # no routing: only the task's class posterior, where the router has one
            self._require_experts()
            self.record(task)
            router = self.router()
            extra, weight = (router.posteriors(feats), router.config.answer_weight) \
                if isinstance(router, RanpacRouter) else (None, 0.0)
            chosen = [task] * len(feats)
            routing = [{task: 1.0}] * len(feats)
            fell, ood = [False] * len(feats), None
        else:
            r = self.route(feats, top_k)
            extra, weight = r.class_logp, r.answer_weight
            chosen = [r.names[int(i)] for i in r.indices[:, 0]]
            routing = r.as_dicts()
            fell, ood = (r.fallback.tolist() if fallback else [False] * len(feats)), r.ood_score
        out: list[dict] = [{"routing": routing[i]} for i in range(len(feats))]
        groups: dict[str, list[int]] = {}
        for i, (c, f) in enumerate(zip(chosen, fell)):
            if not f:
                groups.setdefault(c, []).append(i)
        experts = {n: self.expert(n) for n in groups}
        for name, exp in experts.items():  # checked before any work
            if exp.needs_pixels and pixels is None:
                raise ConfigError(f"expert {name!r} ({exp.kind}) needs images, not only cached features")
        encoded = self._encode_shared(groups, experts, pixels)
        names = list(groups)
        owner = torch.tensor([j for j, idx in enumerate(groups.values()) for _ in idx], dtype=torch.long)
        rows = torch.tensor([i for idx in groups.values() for i in idx], dtype=torch.long)
        for g in Groups.of(owner, rows).parts() if len(rows) else []:
            part = [names[j] for j in g.owners.tolist()]
            with torch.no_grad():
                logp = self._group_logits(g, part, experts, groups, feats, pixels, encoded).log_softmax(-1)
                if extra is not None and weight:
                    logp = (logp + weight * extra.padded(part, g)).log_softmax(-1)
                score, label = logp.max(-1)
            for i, j, lab, sc in zip(g.rows.tolist(), g.group.tolist(), g.take(label).tolist(),
                                     g.take(score.exp()).tolist()):
                out[i] = {"task": part[j], "label": experts[part[j]].classes[lab], "score": round(sc, 6),
                          "routing": routing[i], "fallback": False}
        return self._fall_back(out, feats, fell, ood, classes)

    @staticmethod
    def _group_logits(g: Groups, names: list[str], experts: dict, rows: dict[str, list[int]], feats: torch.Tensor,
                      pixels: PixelFn | None, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of expert ``names[j]`` on the rows of group ``j`` (``rows[names[j]]``): ``(G, width,
        C_max)``, ``-inf`` past an expert's classes. Experts of one :meth:`~clipzoo.zoo.experts.base.Expert.group_key`
        run as one grouped call; the others one by one (in-encoder experts on their rows of the
        shared tower pass)."""
        same: dict = {}
        for j, n in enumerate(names):
            same.setdefault(experts[n].group_key(), []).append(j)
        if len(same) == 1 and None not in same:  # the common case: one config, one call
            return type(experts[names[0]]).grouped_logits([experts[n] for n in names], g.pad(feats))
        out = torch.full((len(names), g.width, max(len(experts[n].classes) for n in names)), float("-inf"))
        x = g.pad(feats) if any(k is not None for k in same) else None
        for key, js in same.items():
            if key is not None:
                y = type(experts[names[js[0]]]).grouped_logits([experts[names[j]] for j in js], x[js])
                out[js, :, :y.shape[2]] = y
                continue
            for j in js:
                exp, idx = experts[names[j]], rows[names[j]]
                if names[j] in encoded:
                    y = exp(feats[idx], encoded=encoded[names[j]])
                else:
                    y = exp(feats[idx], pixels(idx)) if exp.needs_pixels else exp(feats[idx])
                out[j, :len(idx), :y.shape[1]] = y
        return out

    def _encode_shared(self, groups: dict[str, list[int]], experts: dict, pixels: PixelFn | None
                       ) -> dict[str, torch.Tensor]:
        """One image-tower pass over the rows of every routed in-encoder expert, each row with its
        own expert's hooks (:class:`clipzoo.zoo.encoders.RowHooks`): the frozen blocks run once
        for the batch however many experts share it. Expert name -> its rows' tower output."""
        hooked = {n: (idx, h) for n, idx in groups.items() if (h := experts[n].encoder_hooks()) is not None}
        if not hooked or pixels is None:
            return {}
        parts, start = [], 0
        for idx, h in hooked.values():
            parts.append((torch.arange(start, start + len(idx)), h))
            start += len(idx)
        with torch.no_grad():
            enc = encode_image(self.backbone.model, pixels([i for idx, _ in hooked.values() for i in idx]),
                               RowHooks(parts))
        return {n: enc[rows] for n, (rows, _) in zip(hooked, parts)}

    def _fall_back(self, preds: list[dict], feats: torch.Tensor, fell: list[bool], ood: torch.Tensor | None,
                   classes: Sequence[str] | None) -> list[dict]:
        """Answer the inputs marked in ``fell`` with zero-shot CLIP (task None, fallback True) and
        add each input's ``ood_score`` when routed."""
        idx = [i for i, f in enumerate(fell) if f]
        if idx:
            names, probs = self.zero_shot(feats[idx], classes)
            score, label = probs.max(1)
            for j, i in enumerate(idx):
                preds[i].update(task=None, label=names[int(label[j])], score=round(float(score[j]), 6), fallback=True)
        for p, o in zip(preds, ood.tolist() if ood is not None else []):
            p["ood_score"] = round(o, 4)
        return preds

    def zero_shot(self, feats: torch.Tensor, classes: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
        """Zero-shot CLIP over ``classes`` (default: every expert's classes, each once): the class
        names and probabilities ``(B, C)``."""
        names = list(dict.fromkeys(classes if classes is not None else
                                   [c for rec in self.registry["experts"].values() for c in rec["classes"]]))
        if not names or not all(isinstance(c, str) and c.strip() for c in names):
            raise ConfigError("zero-shot fallback needs non-empty class names: pass classes (--classes a,b,c)")
        bb = self.backbone
        key = tuple(names)
        if key not in self._zero_shot_emb:  # the text tower runs once per class list, not per call
            self._zero_shot_emb[key] = bb.class_embeddings(names, DEFAULT_TEMPLATES)
        emb = self._zero_shot_emb[key]
        with torch.no_grad():
            probs = (bb.logit_scale * torch.nn.functional.normalize(feats.float(), dim=-1) @ emb.T).softmax(1)
        return names, probs

    def evaluate(self, data: TaskData | str | Path, task: str | None = None) -> dict:
        """Accuracy on a task's test split: with ``task`` given (oracle) or routed.

        Routed, a prediction counts only if it names the right class *and* went to the data's own
        task, when that task is known (an expert of the same name, or of the same class list).
        """
        td = data if isinstance(data, TaskData) else load_task(data)
        feats = self.features(td.test.images, "encode")
        preds = self.predict_features(feats, task, pixels=lambda idx: self.pixels([td.test.images[i] for i in idx]))
        own = task or (td.name if td.name in self.registry["experts"] else next(
            (n for n, r in self.registry["experts"].items() if r["classes"] == td.classes), None))
        true = [td.classes[y] for y in td.test.labels]
        ok = [p["label"] == t and (own is None or p["task"] == own) for p, t in zip(preds, true)]
        per_class = {c: round(sum(o for o, t in zip(ok, true) if t == c) / max(1, true.count(c)), 6) for c in td.classes}
        result = {"accuracy": round(sum(ok) / max(1, len(ok)), 6), "per_class": per_class, "n": len(ok),
                  "task_ids": "given" if task else "routed", "task": own}
        if task is None and own is not None:
            result["routing_accuracy"] = round(sum(p["task"] == own for p in preds) / max(1, len(preds)), 6)
        return result

    # ----- combining the routed top-k ------------------------------------------------------------
    def global_fusion(self, top_k: int) -> GlobalFusion:
        """The fusion layer over the routed top-k, trained on stored statistics the first time it is
        needed for this set of experts (then cached; the zoo directory is never written)."""
        settings = self.fusion_settings
        k = max(1, min(top_k, len(self.names)))
        key = fusion_key(self.registry["experts"], self.registry.get("router", {}), k, settings)
        if key not in self._fusions:
            names, dim = self.names, self.backbone.embed_dim
            self._fusions[key], self.fusion_info = load_or_train_global(
                cache_root() / "fusion", key, dim,
                lambda: train_global_fusion({i: self.expert(n) for i, n in enumerate(names)}, names,
                                            [self.stats(n) for n in names], lambda x: self.route(x, k),
                                            dim, settings))
            self._remember_fusion(k)
        return self._fusions[key]

    def _fusion_uses_file(self) -> Path:
        """Where the cache root records which ``k`` fusion mode was used with on this zoo."""
        return cache_root() / "fusion" / "zoos" / f"{hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:32]}.json"

    def fusion_ks(self) -> list[int]:
        """The top-k values fusion mode was used with on this zoo (``add_task`` trains those ahead)."""
        try:
            ks = json.loads(self._fusion_uses_file().read_text())
            return sorted({int(k) for k in ks if int(k) >= 2})
        except (OSError, ValueError, TypeError):
            return []

    def _remember_fusion(self, k: int) -> None:
        if k < 2 or k in self.fusion_ks():
            return
        try:
            self._fusion_uses_file().parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self._fusion_uses_file(), json.dumps(sorted({*self.fusion_ks(), k})).encode())
        except OSError:  # an unwritable cache: fusion is then trained when first needed, as before
            pass

    def predict_fused(self, feats: torch.Tensor, top_k: int = 2, pixels: PixelFn | None = None,
                      mode: str = "fusion", fallback: bool = True, classes: Sequence[str] | None = None) -> list[dict]:
        """Task-agnostic answers combining the routed top-k experts: 'avg' (uniform average of their
        output distributions) or 'fusion' (the global AdapterFusion; each answer carries its fusion
        weights, expert -> weight). The answer is the best (task, class) over their classes; inputs
        of no known task fall back to zero-shot CLIP as in :meth:`predict_features`."""
        if mode not in MODES:
            raise ConfigError(f"unknown prediction mode {mode!r}: choose from {', '.join(MODES)}")
        if mode == "top1":
            return self.predict_features(feats, None, top_k, pixels, fallback=fallback, classes=classes)
        if top_k < 2:
            raise ConfigError(f"mode {mode!r} combines the router's top-k experts: use --top-k 2 or more")
        r = self.route(feats, top_k)
        cand = r.indices
        experts = {e: self.expert(r.names[e]) for e in cand.unique().tolist()}
        # one tower pass for every in-encoder candidate's rows (each row once per such candidate)
        shared = self._encode_shared({r.names[e]: (cand == e).nonzero(as_tuple=True)[0].tolist() for e in experts},
                                     {r.names[e]: exp for e, exp in experts.items()}, pixels)
        encoded = {e: shared[r.names[e]] for e in experts if r.names[e] in shared}
        out = (average_predict(experts, r.names, cand, feats, pixels, encoded) if mode == "avg"
               else self.global_fusion(top_k).predict(experts, r.names, cand, r.weights, feats, pixels, encoded))
        preds = []
        for b, routing in enumerate(r.as_dicts()):
            e = int(cand[b, out["slot"][b]])
            p = {"task": r.names[e], "label": experts[e].classes[int(out["label"][b])],
                 "score": round(float(out["score"][b]), 6), "routing": routing}
            if mode == "fusion":
                p["fusion"] = {r.names[int(i)]: round(float(w), 6) for i, w in zip(cand[b], out["weights"][b])}
            preds.append({**p, "fallback": False})
        fell = r.fallback.tolist() if fallback else [False] * len(feats)
        return self._fall_back(preds, feats, fell, r.ood_score, classes)

    def _add_source_weights(self, feats: torch.Tensor, preds: list[dict], pixels: PixelFn) -> None:
        """Answers given by a composed expert also carry its weights over its sources."""
        for name in dict.fromkeys(p["task"] for p in preds if p["task"] is not None):
            exp = self.expert(name)
            if not exp.composed:
                continue
            idx = [i for i, p in enumerate(preds) if p["task"] == name]
            for i, w in zip(idx, exp.source_weights(feats[idx], pixels(idx) if exp.needs_pixels else None)):
                preds[i]["sources"] = w
