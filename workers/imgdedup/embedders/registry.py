"""Which embedders the settings ask for: built for the worker, described for `imgdedup models`."""

from __future__ import annotations

from imgdedup.embedders.base import Embedder, EmbedderUnavailable


def build_embedders(settings) -> list[Embedder]:
    """The enabled embedders, loaded and ready; raises EmbedderUnavailable/WeightsMissing with the fix."""
    embedders: list[Embedder] = []
    if settings.sscd_enabled:
        from imgdedup.embedders.sscd import SSCDEmbedder

        try:
            embedders.append(SSCDEmbedder.from_settings(settings))
        except EmbedderUnavailable as exc:
            raise EmbedderUnavailable(f"{exc} (or set IMGDEDUP_SSCD_ENABLED=false to run without SSCD)") from exc
    if settings.clip_enabled:
        from imgdedup.embedders.clip import ClipEmbedder

        embedders.append(ClipEmbedder.from_settings(settings))
    return embedders


def describe_embedders(settings) -> list[dict]:
    """One row per known embedder without loading any model: name, version, enabled, weights present, where."""
    return [_describe_sscd(settings), _describe_clip(settings)]


def _describe_sscd(settings) -> dict:
    from imgdedup.embedders.sscd import model_path, version_of

    row = {"name": "sscd", "enabled": settings.sscd_enabled,
           "version": version_of(settings.sscd_model, settings.sscd_input_size)}
    try:
        row.update(weights_present=True, where=str(model_path(settings.sscd_model)))
    except EmbedderUnavailable as exc:
        row.update(weights_present=False, where=str(exc))
    return row


def _describe_clip(settings) -> dict:
    from imgdedup.embedders.clip import resolve_weights, version_of

    row = {"name": "clip", "enabled": settings.clip_enabled,
           "version": version_of(settings.clip_model, settings.clip_pretrained, settings.clip_checkpoint)}
    try:
        weights = resolve_weights(settings.clip_model, settings.clip_pretrained, settings.clip_checkpoint)
        row.update(weights_present=True, where=str(weights.path))
    except EmbedderUnavailable as exc:
        row.update(weights_present=False, where=str(exc))
    return row
