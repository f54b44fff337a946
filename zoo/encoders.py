"""Running the frozen open_clip towers with an expert stack's hooks inside their blocks.

``nn.MultiheadAttention`` never calls ``out_proj.forward`` and keeps q, k and v in one fused
``in_proj_weight``, so wrapping its sub-modules would silently do nothing. Instead each block is
re-run here explicitly (same maths as open_clip 3.x ``ResidualAttentionBlock``)::

    h = ln_1(x);  qkv = in_proj(h) + sum(qkv hooks)(h);  a = out_proj(attn(q, k, v)) + sum(out hooks)
    x = x + ls_1(post_attn hooks(a))
    h = ln_2(x);  u = gelu(c_fc(h) + sum(fc hooks)(h));  m = c_proj(u) + sum(proj hooks)(u)
    x = x + ls_2(post_mlp hooks(m))

Hook sites: ``qkv`` (delta ``(B, L, 3W)`` from ``h``), ``out`` (delta from the attention context),
``fc`` / ``proj`` (deltas of the MLP's two linears) and ``post_attn`` / ``post_mlp`` (maps of the
sub-layer output before the residual add). Backbone weights are only read, never written.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer, text_global_pool
from torch import nn

from clipzoo.errors import ConfigError

TOWERS = ("image", "text")
SITES = ("qkv", "out", "fc", "proj", "post_attn", "post_mlp")
MAP_SITES = ("post_attn", "post_mlp")  # hooks that map the sub-layer output; the others add a delta
Hook = Callable[[torch.Tensor], torch.Tensor]


class Hooks:
    """Callables per (tower, block index, site), applied in the order they were added."""

    def __init__(self) -> None:
        self._hooks: dict[tuple[str, int, str], list[Hook]] = defaultdict(list)

    def add(self, tower: str, block: int, site: str, fn: Hook) -> None:
        assert tower in TOWERS and site in SITES, (tower, site)
        self._hooks[(tower, block, site)].append(fn)

    def add_keyed(self, modules: Mapping[str, Hook]) -> None:
        """Add each module under its key ``"<tower>_<block>_<site>"`` (how adapters name them)."""
        for key, fn in modules.items():
            tower, block, site = key.split("_", 2)
            self.add(tower, int(block), site, fn)

    def get(self, tower: str, block: int, site: str) -> list[Hook]:
        return self._hooks.get((tower, block, site), [])

    def towers(self) -> set[str]:
        return {t for (t, _, _) in self._hooks}


class RowHooks:
    """Different experts' hooks on different rows of one batch (PEFT's mixed-adapter batches,
    S-LoRA's grouping): the frozen block runs once over every row, and at each hook site each
    group's hooks run on that group's rows only. ``groups`` pairs row indices ``(n,)`` with
    the :class:`Hooks` those rows use; rows in no group pass through the frozen block alone."""

    def __init__(self, groups: list[tuple[torch.Tensor, Hooks]]) -> None:
        self.groups = groups

    def towers(self) -> set[str]:
        return set().union(*(h.towers() for _, h in self.groups)) if self.groups else set()

    def get(self, tower: str, block: int, site: str) -> list[Hook]:
        used = [(rows, fns) for rows, h in self.groups if (fns := h.get(tower, block, site))]
        if not used:
            return []
        return [self._map(used) if site in MAP_SITES else self._delta(used)]

    @staticmethod
    def _delta(used: list[tuple[torch.Tensor, list[Hook]]]) -> Hook:
        def fn(x: torch.Tensor) -> torch.Tensor:
            out = None
            for rows, fns in used:
                rows = rows.to(x.device)
                sub = x[rows]
                d = sum(f(sub) for f in fns)
                out = x.new_zeros((len(x), *d.shape[1:])) if out is None else out
                out.index_add_(0, rows, d)
            return out
        return fn

    @staticmethod
    def _map(used: list[tuple[torch.Tensor, list[Hook]]]) -> Hook:
        def fn(x: torch.Tensor) -> torch.Tensor:
            out = x.clone()
            for rows, fns in used:
                rows = rows.to(x.device)
                sub = x[rows]
                for f in fns:
                    sub = f(sub)
                out.index_copy_(0, rows, sub)
            return out
        return fn


@dataclass
class TextTower:
    """The text tower's parts, wherever the model class keeps them."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None


def _check_blocks(transformer: nn.Module, tower: str, model_name: str) -> nn.ModuleList:
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not all(type(b) is ResidualAttentionBlock for b in blocks) or not transformer.batch_first:
        raise ConfigError(f"the {tower} tower of {model_name} does not use open_clip's standard transformer blocks, "
                          "so in-encoder adapters cannot be hosted there: use clip-adapter or cross-modal")
    return blocks


def vision_blocks(model: nn.Module, model_name: str = "this backbone") -> nn.ModuleList:
    """The image tower's transformer blocks; ConfigError for a ResNet (or other non-ViT) tower."""
    v = model.visual
    if not isinstance(v, VisionTransformer):
        raise ConfigError(f"{model_name} has a {type(v).__name__} image tower, not a vision transformer: "
                          "image-tower adapters (vit-adapter, vl-adapter, lora on 'image') need a ViT backbone")
    if v.attn_pool is not None:
        raise ConfigError(f"{model_name}'s image tower uses attentional pooling, which in-encoder adapters do not support")
    return _check_blocks(v.transformer, "image", model_name)


def text_tower(model: nn.Module, model_name: str = "this backbone") -> TextTower:
    """The text tower of a ``CLIP`` (parts on the model) or ``CustomTextCLIP`` (``model.text``)."""
    t = getattr(model, "text", None)
    if t is not None:
        if getattr(t, "cls_emb", None) is not None or getattr(t, "use_pad_mask", False) or not hasattr(t, "token_embedding"):
            raise ConfigError(f"{model_name}'s text tower ({type(t).__name__}) cannot host text-tower adapters")
        tower = TextTower(t.token_embedding, t.positional_embedding, t.transformer, t.ln_final, t.text_projection,
                          t.attn_mask, t.pool_type, getattr(t, "eos_id", None))
    elif hasattr(model, "token_embedding"):
        tower = TextTower(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                          model.text_projection, model.attn_mask, model.text_pool_type, getattr(model, "text_eos_id", None))
    else:
        raise ConfigError(f"{model_name} has no open_clip text transformer to host text-tower adapters")
    _check_blocks(tower.transformer, "text", model_name)
    return tower


def tower_blocks(model: nn.Module, tower: str, model_name: str = "this backbone") -> nn.ModuleList:
    return vision_blocks(model, model_name) if tower == "image" else text_tower(model, model_name).transformer.resblocks


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, deltas: list[Hook]) -> torch.Tensor:
    """The frozen linear map plus each hook's low-rank delta of the same input."""
    out = F.linear(x, weight, bias)
    for fn in deltas:
        out = out + fn(x)
    return out


def run_block(blk: ResidualAttentionBlock, x: torch.Tensor, attn_mask: torch.Tensor | None,
              hooks: Hooks | RowHooks, tower: str, i: int) -> torch.Tensor:
    """One ``ResidualAttentionBlock`` (batch first) with the hooks of block ``i`` of ``tower``."""
    attn: nn.MultiheadAttention = blk.attn
    B, L, W = x.shape
    heads = attn.num_heads
    h = blk.ln_1(x)
    qkv = _linear(h, attn.in_proj_weight, attn.in_proj_bias, hooks.get(tower, i, "qkv"))
    q, k, v = (t.reshape(B, L, heads, W // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    mask = attn_mask.to(q.dtype) if attn_mask is not None else None
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, W)
    a = _linear(ctx, attn.out_proj.weight, attn.out_proj.bias, hooks.get(tower, i, "out"))
    for fn in hooks.get(tower, i, "post_attn"):
        a = fn(a)
    x = x + blk.ls_1(a)
    h = blk.ln_2(x)
    fc, act, proj = blk.mlp.c_fc, blk.mlp.gelu, blk.mlp.c_proj
    u = act(_linear(h, fc.weight, fc.bias, hooks.get(tower, i, "fc")))
    m = _linear(u, proj.weight, proj.bias, hooks.get(tower, i, "proj"))
    for fn in hooks.get(tower, i, "post_mlp"):
        m = fn(m)
    return x + blk.ls_2(m)


def encode_image(model: nn.Module, pixels: torch.Tensor, hooks: Hooks | RowHooks) -> torch.Tensor:
    """Unit-norm image embeddings ``(B, D)`` of preprocessed pixels through the hooked ViT."""
    v = model.visual
    x = v._embeds(pixels)
    for i, blk in enumerate(vision_blocks(model)):
        x = run_block(blk, x, None, hooks, "image", i)
    pooled, _ = v._pool(x)
    if v.proj is not None:
        pooled = pooled @ v.proj
    return F.normalize(pooled, dim=-1)


def encode_text(model: nn.Module, tokens: torch.Tensor, hooks: Hooks,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Unit-norm text embeddings ``(N, D)`` of token ids ``(N, L)`` through the hooked text tower.

    ``embeds`` (``(N, L, W)``) replaces the token embeddings (soft prompts); pooling still reads the
    token ids (the end-of-text token, by argmax for CLIP's tokenizer).
    """
    t = text_tower(model)
    x = t.token_embedding(tokens) if embeds is None else embeds
    x = x + t.positional_embedding[: x.shape[1]].to(x.dtype)
    mask = t.attn_mask[: x.shape[1], : x.shape[1]] if t.attn_mask is not None else None
    for i, blk in enumerate(t.transformer.resblocks):
        x = run_block(blk, x, mask, hooks, "text", i)
    x = t.ln_final(x)
    x = text_global_pool(x, tokens, t.pool_type, eos_token_id=t.eos_id)
    if t.text_projection is not None:
        x = t.text_projection(x) if isinstance(t.text_projection, nn.Linear) else x @ t.text_projection
    return F.normalize(x, dim=-1)
