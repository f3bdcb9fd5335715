"""Commands for people and tests: config, the embedded dev stack, publish, backfill and verdicts."""

from __future__ import annotations

import itertools
import json
import mimetypes
import time
import uuid
from pathlib import Path

import click
from tqdm import tqdm

from imgdedup import devstack, messages
from imgdedup.cli import settings_from
from imgdedup.config import describe

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@click.command("config")
@click.option("--table", is_flag=True, help="Print the settings reference (variable, default, meaning) as Markdown.")
@click.pass_context
def config_command(ctx, table: bool) -> None:
    """Print the effective configuration as JSON, secrets masked."""
    if table:
        click.echo("| variable | default | meaning |\n|---|---|---|")
        for var, default, text in describe():
            click.echo(f"| `{var}` | `{default}` | {text} |")
        return
    click.echo(json.dumps(settings_from(ctx).masked(), indent=2))


@click.group("dev")
def dev_group() -> None:
    """The embedded dev stack: Tansu (Kafka) and Redis 8 from PyPI wheels, on loopback."""


def _state_dir(ctx, state_dir: Path | None) -> Path:
    return state_dir or settings_from(ctx).dev_state_dir


@dev_group.command("up")
@click.option("--state-dir", type=click.Path(path_type=Path), help="Where logs, data and pids go.")
@click.pass_context
def dev_up(ctx, state_dir: Path | None) -> None:
    """Start the stack (idempotent) and print shell-sourceable settings."""
    settings = settings_from(ctx)
    state_dir = _state_dir(ctx, state_dir)
    try:
        info, started = devstack.up(state_dir, settings.dev_kafka_port, settings.dev_redis_port,
                                    [settings.input_topic, settings.verdict_topic, settings.dlq_topic],
                                    settings.partitions)
    except devstack.DevStackError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"# dev stack {'started' if started else 'already running'} in {info['state_dir']}", err=True)
    for line in devstack.env_lines(info):
        click.echo(line)


@dev_group.command("status")
@click.option("--state-dir", type=click.Path(path_type=Path))
@click.pass_context
def dev_status(ctx, state_dir: Path | None) -> None:
    """Report whether the stack runs; exit 1 if it does not."""
    info = devstack.status(_state_dir(ctx, state_dir))
    if info is None:
        click.echo("dev stack: not running")
        ctx.exit(1)
    for name, alive in info["running"].items():
        where = info["kafka_bootstrap"] if name == "kafka" else info["redis_url"]
        click.echo(f"{name}: {'running' if alive else 'STOPPED'} pid {info['pids'][name]} at {where}")
    click.echo(f"topics: {', '.join(info['topics'])} ({info['partitions']} partitions)")


@dev_group.command("down")
@click.option("--state-dir", type=click.Path(path_type=Path))
@click.pass_context
def dev_down(ctx, state_dir: Path | None) -> None:
    """Stop every process the stack started."""
    stopped = devstack.down(_state_dir(ctx, state_dir))
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "dev stack: nothing was running")


def image_files(paths: tuple[Path, ...]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise click.BadParameter(f"{path} does not exist", param_hint="PATH")
    return found


@click.command("publish")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--namespace", default="default", show_default=True)
@click.option("--inline/--uri", default=True, show_default=True,
              help="Send the bytes in the event, or a file:// URI (the worker must list the directory in file_roots).")
@click.option("--id-prefix", default=None,
              help="image_id = PREFIX + file stem. Default: a fresh prefix per run, so each run is new uploads.")
@click.pass_context
def publish_command(ctx, paths, namespace: str, inline: bool, id_prefix: str | None) -> None:
    """Publish one image event per image file (directories are searched recursively)."""
    from imgdedup.kafka_io import produce_events

    settings = settings_from(ctx)
    files = image_files(paths)
    prefix = id_prefix if id_prefix is not None else f"run-{uuid.uuid4().hex[:8]}/"
    events = []
    for path in files:
        kind = mimetypes.guess_type(path.name)[0]
        source = {"data": path.read_bytes()} if inline else {"uri": path.resolve().as_uri()}
        events.append(messages.make_event(prefix + path.stem, event_id=str(uuid.uuid4()), namespace=namespace,
                                          content_type=kind, attributes={"file": path.name}, **source))
    with tqdm(total=len(events), desc="publish", unit="event", disable=None) as bar:
        produce_events(settings, events, on_progress=bar.update)
    click.echo(f"published {len(events)} events to {settings.input_topic} (image ids {prefix}*)", err=True)


@click.command("backfill")
@click.argument("manifest", type=click.File("r", encoding="utf-8-sig"))  # -sig: spreadsheets write a BOM
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv"]), default="auto", show_default=True,
              help="Manifest format; auto: csv for *.csv, else JSON Lines.")
@click.option("--namespace", default="default", show_default=True, help="Namespace of rows that name none.")
@click.option("--skip", default=0, show_default=True, help="Rows to skip first (resume after that many rows).")
@click.option("--rate", type=float, default=None, help="At most this many events per second.")
@click.option("--rejects", type=click.File("w", encoding="utf-8"), default=None,
              help="Write rejected rows here (JSON Lines with line and reason) to fix and publish again.")
@click.pass_context
def backfill_command(ctx, manifest, fmt: str, namespace: str, skip: int, rate: float | None, rejects) -> None:
    """Publish an existing catalog (JSON Lines or CSV manifest; - for stdin) as image events.

    Event ids derive from the rows, so publishing a manifest again is a redelivery. Rejected rows are
    reported and skipped; the exit status is 1 if there were any. Publish to a topic of its own
    (--input-topic) with its own worker group to keep a large backfill from delaying live uploads."""
    from imgdedup import backfill
    from imgdedup.kafka_io import produce_events

    settings = settings_from(ctx)
    if fmt == "auto":
        fmt = "csv" if manifest.name.lower().endswith(".csv") else "jsonl"
    rows = itertools.islice(backfill.read_rows(manifest, fmt), skip, None)  # skipped rows are not validated
    counts = {"rows": 0, "rejected": 0}

    def accepted():
        began = time.monotonic()
        for item in backfill.events(rows, namespace):
            counts["rows"] += 1
            if isinstance(item, backfill.Rejected):
                counts["rejected"] += 1
                click.echo(f"line {item.line}: {item.reason}", err=True)
                if rejects:
                    rejects.write(json.dumps({"line": item.line, "reason": item.reason, "row": item.text}) + "\n")
                continue
            if rate:
                time.sleep(max(0.0, began + (counts["rows"] - counts["rejected"]) / rate - time.monotonic()))
            yield item

    with tqdm(desc="backfill", unit="event", disable=None) as bar:
        try:
            produce_events(settings, accepted(), on_progress=bar.update)
        except RuntimeError as exc:  # undelivered events: the same manifest can simply be sent again
            raise click.ClickException(f"{exc}; publishing the manifest again is safe (same event ids)") from None
    published = counts["rows"] - counts["rejected"]
    click.echo(f"published {published} events to {settings.input_topic}; rejected {counts['rejected']} rows"
               f" (after skipping {skip})", err=True)
    if counts["rejected"]:
        ctx.exit(1)


@click.command("verdicts")
@click.option("--follow", is_flag=True, help="Keep waiting for new verdicts.")
@click.option("--from-beginning/--new-only", default=True, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@click.option("--dead-letters", is_flag=True, help="Read the dead-letter topic instead.")
@click.option("--idle-timeout", default=3.0, show_default=True, help="Stop after this many idle seconds.")
@click.pass_context
def verdicts_command(ctx, follow, from_beginning, as_json, dead_letters, idle_timeout) -> None:
    """Print verdicts (or dead letters) as a table or JSON lines."""
    from imgdedup.kafka_io import iter_topic

    settings = settings_from(ctx)
    topic = settings.dlq_topic if dead_letters else settings.verdict_topic
    counts: dict[str, int] = {}
    for doc in iter_topic(settings, topic, from_beginning=from_beginning, follow=follow,
                          idle_timeout_s=idle_timeout):
        outcome = doc["error"]["code"] if dead_letters else doc["verdict"]
        counts[outcome] = counts.get(outcome, 0) + 1
        click.echo(json.dumps(doc) if as_json else _row(doc, dead_letters))
    if not as_json:
        click.echo("total: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"), err=True)


def _row(doc: dict, dead_letter: bool) -> str:
    if dead_letter:
        return f"{doc['event_id'] or '-':<38} {doc['error']['code']:<18} {doc['error']['message'][:80]}"
    best = doc["matches"][0] if doc["matches"] else None
    evidence = ""
    if best:
        evidence = f"{best['signal']} " + (f"d={best['distance']}" if "distance" in best else
                                           f"s={best['similarity']:.3f}" if "similarity" in best else "")
    return (f"{doc['namespace']:<12} {doc['image_id']:<40} {doc['verdict']:<16} "
            f"{doc['duplicate_of'] or '':<40} {evidence}")
