"""CLIP image embeddings with open_clip, from weights already on this machine.

A worker never downloads weights: they come from `clip_checkpoint` (a local file) or, for a
pretrained tag, from the Hugging Face cache that `imgdedup models fetch` (or any open_clip run
with a network) filled. If they are not there, `WeightsMissing` says what to provide; a model
with random weights would make every similarity meaningless, so there is no fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from imgdedup.embedders.base import EmbedderUnavailable, WeightsMissing, l2_normalise, to_rgb, validate

INSTALL_HINT = "pip install 'imgdedup[clip]'"
#: Images per forward pass (bounds memory; ViT-B-32 at 224 needs ~1.5 MB of activations per image).
MAX_BATCH = 16
#: open_clip's name for weights saved by open_clip itself on the HF hub, and its safetensors twin.
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
#: Where open_clip caches weights fetched by URL (when a tag has no HF hub entry).
URL_CACHE = Path("~/.cache/clip")


@dataclass
class ClipWeights:
    """A weights file on disk plus the preprocessing its tag asks for."""

    path: Path
    preprocess: dict = field(default_factory=dict)  # image_mean/std/interpolation/resize_mode overrides


def version_of(model: str, pretrained: str | None, checkpoint: Path | None) -> str:
    """Version string recorded in verdicts: model plus where its weights came from."""
    label = f"file:{Path(checkpoint).name}" if checkpoint is not None else pretrained
    return f"{model}-{label}-v1"


def _open_clip():
    try:
        import open_clip
        import torch
    except ImportError as exc:
        raise EmbedderUnavailable(f"CLIP needs torch and open_clip: {INSTALL_HINT}") from exc
    return open_clip, torch


def hf_cache_dir() -> Path:
    """The HF hub cache as huggingface_hub resolves it, read now (not at its import) so HF_HOME set later counts."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def _candidates(filename: str) -> list[str]:
    """File names open_clip tries for a hub entry, safetensors first (as it does)."""
    if filename == HF_WEIGHTS_NAME:
        return ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def cached_pretrained(model: str, tag: str) -> Path | None:
    """Local file open_clip would load for (model, tag), looked up offline; None if not cached."""
    open_clip, _ = _open_clip()
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model)
        raise WeightsMissing(f"open_clip has no pretrained tag {tag!r} for model {model!r} (known: {known})")
    from huggingface_hub import try_to_load_from_cache

    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        for name in _candidates(filename or HF_WEIGHTS_NAME):
            found = try_to_load_from_cache(repo, name, cache_dir=hf_cache_dir())
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        path = URL_CACHE.expanduser() / os.path.basename(cfg["url"])
        if path.is_file():
            return path
    return None


def _preprocess_overrides(model: str, tag: str) -> dict:
    """The tag's own preprocessing (open_clip applies it when loading by tag; we load by path)."""
    open_clip, _ = _open_clip()
    cfg = open_clip.get_pretrained_cfg(model, tag)
    names = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
             "resize_mode": "image_resize_mode"}
    return {arg: cfg[key] for key, arg in names.items() if key in cfg}


def resolve_weights(model: str, pretrained: str | None, checkpoint: Path | None) -> ClipWeights:
    """The weights a worker would load, or WeightsMissing saying exactly what to provide."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise WeightsMissing(
                f"CLIP checkpoint {path} does not exist: set IMGDEDUP_CLIP_CHECKPOINT to a state_dict saved "
                f"for open_clip model {model!r}, or unset it to use the pretrained tag {pretrained!r}"
            )
        return ClipWeights(path)
    if not pretrained:
        raise WeightsMissing(f"CLIP model {model!r} has neither clip_checkpoint nor clip_pretrained set")
    path = cached_pretrained(model, pretrained)
    if path is None:
        raise WeightsMissing(
            f"CLIP weights for model {model!r} pretrained {pretrained!r} are not in the Hugging Face cache "
            f"({hf_cache_dir()}): run `imgdedup --set clip_model={model} --set clip_pretrained={pretrained} "
            f"models fetch` on a machine with network access (and copy the cache), or set "
            f"IMGDEDUP_CLIP_CHECKPOINT to a local checkpoint file"
        )
    return ClipWeights(path, _preprocess_overrides(model, pretrained))


class ClipEmbedder:
    """An open_clip image tower in eval mode; torch's thread count is process-wide."""

    name = "clip"
    in_decoder_processes = False  # a torch model per process would cost GBs of memory

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = "openai", checkpoint: Path | None = None,
                 threads: int = 2):
        open_clip, torch = _open_clip()
        weights = resolve_weights(model, pretrained, checkpoint)
        torch.set_num_threads(threads)
        net, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=str(weights.path), **weights.preprocess)
        self._model, self._preprocess, self._torch = net.eval(), preprocess, torch
        self.dim = int(open_clip.get_model_config(model)["embed_dim"])
        self.weights = weights
        self.version = version_of(model, pretrained, checkpoint)

    @classmethod
    def from_settings(cls, settings) -> ClipEmbedder:
        return cls(settings.clip_model, settings.clip_pretrained, settings.clip_checkpoint, settings.embed_threads)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        parts = []
        with self._torch.inference_mode():
            for start in range(0, len(images), MAX_BATCH):
                batch = self._torch.stack([self._preprocess(to_rgb(im)) for im in images[start:start + MAX_BATCH]])
                parts.append(self._model.encode_image(batch).float().numpy())
        return validate(l2_normalise(np.concatenate(parts)), self.dim)
