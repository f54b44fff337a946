"""The frozen backbone: embedded default, local checkpoints, refusal to fall back to random weights."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

import pytest

from clipzoo.zoo.backbone import EMBEDDED_WEIGHTS, BackboneSpec, load_backbone, resolve
from clipzoo.errors import BackboneError

from conftest import REPO


def test_embedded_default_is_frozen_and_fingerprinted():
    bb = load_backbone(BackboneSpec())
    assert all(not p.requires_grad for p in bb.model.parameters())
    assert not bb.model.training
    assert len(bb.fingerprint) == 64
    assert bb.embed_dim == 128
    feats = bb.encode_images(torch.zeros(2, 3, 32, 32))
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_local_checkpoint_goes_through_the_same_path(tmp_path):
    """A user's checkpoint file (safetensors, or a torch file read with weights_only) gives the same model."""
    sd = load_file(str(EMBEDDED_WEIGHTS))
    st = tmp_path / "mine.safetensors"
    save_file(sd, str(st))
    pt = tmp_path / "mine.pt"
    torch.save({"state_dict": sd}, pt)
    ref = load_backbone(BackboneSpec()).fingerprint
    assert load_backbone(BackboneSpec("clipzoo-tiny", str(st))).fingerprint == ref
    assert load_backbone(BackboneSpec("clipzoo-tiny", str(pt))).fingerprint == ref


def test_other_weights_give_another_fingerprint(tmp_path):
    sd = load_file(str(EMBEDDED_WEIGHTS))
    sd["logit_scale"] = sd["logit_scale"] + 0.5
    path = tmp_path / "other.safetensors"
    save_file(sd, str(path))
    assert load_backbone(BackboneSpec("clipzoo-tiny", str(path))).fingerprint != load_backbone(BackboneSpec()).fingerprint


@pytest.mark.parametrize("spec, words", [
    (BackboneSpec("clipzoo-tiny", "no/such/file.safetensors"), "cannot load pretrained"),
    (BackboneSpec("ViT-B-32", None), "no pretrained weights named"),
    (BackboneSpec("ViT-B-32", "embedded"), "'embedded' weights exist only"),
    (BackboneSpec("No-Such-Model", "x"), "unknown open_clip model"),
    (BackboneSpec("hf-hub:org/repo", "tag"), "carries its own weights"),
])
def test_bad_specs_are_errors(spec, words):
    with pytest.raises(BackboneError, match=words):
        load_backbone(spec)


def test_unreachable_pretrained_is_an_error_not_random_weights(tmp_path):
    """A real tag (or hf-hub id) that cannot be downloaded must fail, never give a random model.

    Run in a subprocess so that huggingface_hub reads HF_HUB_OFFLINE at import (no network wait).
    """
    assert resolve(BackboneSpec("ViT-B-32", "laion2b_s34b_b79k")) == ("ViT-B-32", "laion2b_s34b_b79k")
    code = (
        "from clipzoo.zoo.backbone import BackboneSpec, load_backbone\n"
        "from clipzoo.errors import BackboneError\n"
        "for spec in (BackboneSpec('ViT-B-32', 'laion2b_s34b_b79k'),\n"
        "             BackboneSpec('hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K', None)):\n"
        "    try:\n"
        "        load_backbone(spec)\n"
        "    except BackboneError as e:\n"
        "        assert 'cannot load pretrained' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('loaded without weights: ' + str(spec))\n"
        "print('refused')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "refused" in out.stdout, out.stderr[-2000:]
