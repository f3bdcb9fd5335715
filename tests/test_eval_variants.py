"""The variant generator is deterministic and every transform yields a readable, changed image."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from imgdedup.evaluation import variants as V
from imgdedup.evaluation.dataset import from_ground_truth, generated


def _digests(paths):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_same_seed_same_bytes_other_seed_other_noise(corpus_files, tmp_path):
    bases = corpus_files[:2]
    picked = V.select(["noise", "logo", "screenshot", "crop_offcentre_80", "jpeg_q50"])
    one = V.generate(bases, tmp_path / "a", seed=7, transforms=picked)
    two = V.generate(bases, tmp_path / "b", seed=7, transforms=picked)
    other = V.generate(bases, tmp_path / "c", seed=8, transforms=picked)
    assert _digests(v.path for v in one) == _digests(v.path for v in two)
    changed = {k for k, d in _digests(v.path for v in other).items() if d != _digests(v.path for v in one)[k]}
    # seeded transforms change with the seed, deterministic ones do not
    assert {n.split("__")[1].rsplit(".", 1)[0] for n in changed} >= {"noise"}
    assert not any("jpeg_q50" in n for n in changed)


def test_every_transform_decodes_and_only_the_copy_is_identical(corpus_files):
    data = corpus_files[0].read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
    for t in V.TRANSFORMS:
        out = V.apply(t, data, np.random.default_rng(0))
        with Image.open(io.BytesIO(out)) as im:
            im.load()
            assert im.format == {"COPY": "JPEG"}.get(t.encoding[0], t.encoding[0]), t.name
            assert min(im.size) >= 8
        assert (out == data) == (t.name == "exact_copy"), t.name
        if t.name == "rotate_90":
            assert im.size == size[::-1]
        if t.name == "letterbox_16x9":
            assert abs(im.size[0] / im.size[1] - 16 / 9) < 0.01


def test_the_list_covers_the_issue_and_names_are_unique():
    names = [t.name for t in V.TRANSFORMS]
    assert len(names) == len(set(names))
    required = {"jpeg_q30", "jpeg_q50", "jpeg_q75", "resize_50", "resize_25", "upscale_150", "crop_90", "crop_80",
                "crop_70", "crop_50", "crop_offcentre_80", "rotate_3", "rotate_10", "rotate_90", "rotate_180",
                "flip_h", "grayscale", "brightness_130", "contrast_60", "saturation_150", "blur", "noise",
                "caption", "logo", "border_10", "letterbox_16x9", "squash_70", "screenshot", "png", "webp",
                "exact_copy"}
    assert required <= set(names)
    assert sum(t.composed for t in V.TRANSFORMS) >= 3
    with pytest.raises(ValueError, match="unknown transforms"):
        V.select(["nope"])


def test_generated_dataset_marks_families(corpus_files, tmp_path):
    ds = generated(corpus_files[:2], tmp_path, 0, V.select(["flip_h", "grayscale"]))
    assert [it.image_id for it in ds.items] == [corpus_files[0].stem, corpus_files[1].stem,
                                               f"{corpus_files[0].stem}__flip_h", f"{corpus_files[0].stem}__grayscale",
                                               f"{corpus_files[1].stem}__flip_h", f"{corpus_files[1].stem}__grayscale"]
    assert ds.same.sum() == 2 * 9 and ds.base_index().tolist() == [0, 1, 0, 0, 1, 1]


def test_ground_truth_in_imagededup_format(tmp_path):
    for name in ("a.jpg", "a2.jpg", "a3.jpg", "b.jpg"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps({"a.jpg": ["a2.jpg"], "a2.jpg": ["a3.jpg"], "b.jpg": []}))
    ds = from_ground_truth(tmp_path, truth)
    assert [it.image_id for it in ds.items] == ["a.jpg", "a2.jpg", "a3.jpg", "b.jpg"]
    assert [it.family for it in ds.items] == ["a.jpg", "a.jpg", "a.jpg", "b.jpg"]
    assert [it.is_base for it in ds.items] == [True, False, False, True]
    # labels are made symmetric but not transitive: a and a3 were never labelled together
    assert ds.same[1, 0] and ds.same[2, 1] and not ds.same[0, 2]
    truth.write_text(json.dumps({"a.jpg": ["missing.jpg"]}))
    with pytest.raises(ValueError, match="not in"):
        from_ground_truth(tmp_path, truth)
