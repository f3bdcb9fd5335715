"""The vector tier inside the real pipeline, on both Redis backends: SSCD catches what pHash misses,
distinct images stay unique, deletes and namespaces cover vectors too; CLIP (seeded random weights
through the product's checkpoint path) is evidence, not a verdict, unless configured; and a worker
without its weights refuses to start."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from imgdedup import messages
from imgdedup.evaluation import variants
from imgdedup.pipeline import Pipeline

#: Edits pHash misses (see the eval table) but copy detection must catch.
HARD = ("crop_70", "flip_h", "caption")
BACKENDS = ("vectorset", "redisearch")


def event(image_id, data=None, *, ns="default", op="upsert"):
    return messages.make_event(image_id, event_id=str(uuid.uuid4()), namespace=ns, op=op, data=data)


@pytest.fixture(scope="module")
def sscd_embedders():
    from imgdedup.config import load_settings
    from imgdedup.embedders import build_embedders

    return build_embedders(load_settings(metrics_port=0))


@pytest.fixture(scope="module")
def corpus_bytes(corpus_files):
    return {f.stem: f.read_bytes() for f in corpus_files[::3]}  # 26 bases of every kind


@pytest.mark.sscd
@pytest.mark.parametrize("backend", BACKENDS)
def test_sscd_catches_hard_edits_and_keeps_bases_apart(make_settings, sscd_embedders, corpus_bytes, backend):
    pipeline = Pipeline(make_settings(vector_backend=backend), embedders=sscd_embedders)
    try:
        bases = pipeline.process_events([event(k, v) for k, v in corpus_bytes.items()])
        assert {d["verdict"] for d in bases} == {"unique"}
        assert all(d["features"]["sscd"].startswith("sscd_distilled") for d in bases)
        for name in HARD:
            edited = [event(f"{k}__{name}", variants.apply(variants.BY_NAME[name], v, np.random.default_rng(3)))
                      for k, v in corpus_bytes.items()]
            out = pipeline.process_events(edited)
            wrong = [(d["image_id"], d["duplicate_of"]) for d in out
                     if d["duplicate_of"] not in (None, d["image_id"].split("__")[0])]
            assert wrong == [], name
            caught = [d for d in out if d["verdict"] == "near_duplicate"]
            assert len(caught) >= 0.9 * len(out), f"{name}: {len(caught)}/{len(out)}"
            assert all(any(m["signal"] == "sscd" for m in d["matches"]) for d in caught)
    finally:
        pipeline.close()


@pytest.mark.sscd
@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_are_deleted_and_namespaced(make_settings, sscd_embedders, corpus_bytes, backend):
    pipeline = Pipeline(make_settings(vector_backend=backend), embedders=sscd_embedders)
    try:
        (k, v), *_ = corpus_bytes.items()
        flipped = variants.apply(variants.BY_NAME["flip_h"], v, np.random.default_rng(0))
        pipeline.process_events([event(k, v, ns="a")])
        assert pipeline.process_events([event("flip", flipped, ns="b")])[0]["verdict"] == "unique"
        assert pipeline.store.vectors.count("a", "sscd") == 1
        pipeline.process_events([event(k, ns="a", op="delete")])
        assert pipeline.store.vectors.count("a", "sscd") == 0
        assert pipeline.process_events([event("flip-2", flipped, ns="a")])[0]["verdict"] == "unique"
    finally:
        pipeline.close()


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "vit-s-32.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.clip
def test_clip_is_evidence_unless_enabled_as_a_signal(make_settings, clip_checkpoint, corpus_bytes):
    from imgdedup.embedders import build_embedders

    common = {"sscd_enabled": False, "clip_enabled": True, "clip_model": "ViT-S-32",
              "clip_checkpoint": str(clip_checkpoint), "clip_threshold": 0.9}
    settings = make_settings(**common)
    pipeline = Pipeline(settings, embedders=build_embedders(settings))
    (k, v), *_ = corpus_bytes.items()
    try:
        pipeline.process_events([event(k, v)])
        copy = pipeline.process_events([event("copy", v)])[0]
        clip = next(m for m in copy["matches"] if m["signal"] == "clip")
        assert copy["verdict"] == "exact_duplicate" and clip["similarity"] > 0.99  # Q8 vector sets
        assert copy["features"]["clip"].startswith("ViT-S-32")
        flipped = variants.apply(variants.BY_NAME["flip_h"], v, np.random.default_rng(0))
        mirror = pipeline.process_events([event("mirror", flipped)])[0]
        assert mirror["verdict"] == "unique"  # phash misses a mirror image; clip evidence alone decides nothing
    finally:
        pipeline.close()
    enabled = make_settings(**{**common, "clip_threshold": 0.0}, clip_is_duplicate_signal=True)
    pipeline = Pipeline(enabled, embedders=build_embedders(enabled))
    try:
        pipeline.process_events([event(k, v, ns="clip-on")])
        assert pipeline.process_events([event("mirror", flipped, ns="clip-on")])[0]["verdict"] == "near_duplicate"
    finally:
        pipeline.close()


def test_worker_without_clip_weights_refuses_to_start(tmp_path):
    env = {**os.environ, "IMGDEDUP_CLIP_ENABLED": "true", "IMGDEDUP_SSCD_ENABLED": "false",
           "IMGDEDUP_CLIP_CHECKPOINT": str(tmp_path / "missing.pt"), "IMGDEDUP_METRICS_PORT": "0"}
    out = subprocess.run([sys.executable, "-m", "imgdedup", "worker"], env=env, capture_output=True, text=True,
                         check=False, timeout=300)
    assert out.returncode != 0
    assert "IMGDEDUP_CLIP_CHECKPOINT" in out.stderr and "Traceback" not in out.stderr
