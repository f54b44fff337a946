"""The composed expert: a new task served by fusing existing experts (``--kind fusion --from A,B``).

The candidates are the fixed source experts plus, by default, the frozen feature itself
(``include_base``: the identity "expert", like AdapterFusion's residual, so a source that does not
fit the new domain can be ignored), combined by :class:`clipzoo.router.fusion.AdapterFusion`;
``logits = scale * z @ normalize(head)^T`` with ``head`` initialised from the new task's class-name
text embeddings. Only the fusion layer and the head are trained; the sources stay frozen and are
never saved here. Its config records the sources and their weights' sha256; loading refuses a
source whose weights changed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.errors import ConfigError, IntegrityError, RegistryError
from clipzoo.router.fusion import AdapterFusion
from clipzoo.zoo.experts.base import BuildRequest, Expert, Sources, register_expert

KIND = "fusion"
BASE = "<frozen>"  # name of the identity candidate in a composed expert's fusion weights


class FusionExpert(Expert):
    """Fuses the adapted features of its source experts (and the frozen feature) per input."""

    kind = KIND
    composed = True

    def __init__(self, sources: dict[str, nn.Module], classes: list[str], templates: list[str],
                 class_emb: torch.Tensor, logit_scale: float, fingerprint: str, include_base: bool = True,
                 source_sha256: dict[str, str] | None = None, seed: int = 0):
        super().__init__(classes, templates, class_emb, logit_scale, fingerprint)
        if not sources and not include_base:
            raise ConfigError("a fusion expert needs at least one source expert (--from A,B)")
        self._sources = dict(sources)  # a plain dict: not submodules, so never trained nor saved here
        self.source_sha256 = dict(source_sha256 or {})
        self.include_base = include_base
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

    def fusion_weights(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> list[dict[str, float]]:
        """Per input, the weight of each candidate (source experts, then the frozen feature)."""
        with torch.no_grad():
            a = self.fuse(feats, pixels)[1]
        return [{n: round(float(w), 6) for n, w in zip(self.candidates, row)} for row in a]

    def source_weights(self, feats: torch.Tensor, pixels: torch.Tensor | None = None) -> list[dict]:
        return self.fusion_weights(feats, pixels)

    def record_fields(self) -> dict:
        return {"sources": self.sources}

    # ----- building and saving (see experts.base) ------------------------------------------------
    @classmethod
    def accepts(cls, kind: str) -> bool:
        return kind == KIND

    @classmethod
    def build(cls, req: BuildRequest) -> "FusionExpert":
        sources = list(dict.fromkeys(req.sources or req.zoo.names))
        if not sources:
            raise RegistryError("the zoo has no experts to compose yet: add tasks first")
        opts = dict(req.settings.get(KIND, {}))
        unknown = sorted((set(req.settings) - {KIND}) | (set(opts) - {"include_base"}))
        if unknown:
            raise ConfigError(f"unknown fusion settings {', '.join(unknown)}: fusion takes include_base")
        bb = req.backbone
        return cls({s: req.zoo.get(s) for s in sources}, req.classes, req.templates,
                   bb.class_embeddings(req.classes, req.templates), bb.logit_scale, bb.fingerprint,
                   bool(opts.get("include_base", True)), {s: req.zoo.sha256(s) for s in sources}, seed=req.seed)

    def _config(self) -> dict:
        return {"sources": self.sources, "source_sha256": self.source_sha256, "include_base": self.include_base}

    @classmethod
    def _from_config(cls, cfg: dict, state: dict[str, torch.Tensor], backbone, zoo: Sources) -> "FusionExpert":
        for name, digest in cfg["source_sha256"].items():
            if zoo.sha256(name) != digest:
                raise IntegrityError(f"fusion expert over {name!r}: source expert {name!r} changed since it was "
                                     "composed; re-add the fusion expert")
        return cls({n: zoo.get(n) for n in cfg["sources"]}, cfg["classes"], cfg["templates"], state["class_emb"],
                   cfg["logit_scale"], cfg["backbone_fingerprint"], cfg["include_base"], cfg["source_sha256"])


register_expert(FusionExpert)
