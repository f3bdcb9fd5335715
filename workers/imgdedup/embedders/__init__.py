"""Image embedders (SSCD copy detection, CLIP) behind one small interface; models load lazily."""

from imgdedup.embedders.base import Embedder, EmbedderUnavailable, WeightsMissing, validate
from imgdedup.embedders.registry import build_embedders, describe_embedders

__all__ = ["Embedder", "EmbedderUnavailable", "WeightsMissing", "build_embedders", "describe_embedders", "validate"]
