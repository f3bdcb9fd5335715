"""The `imgdedup` command. Subcommands live in their own modules and load only when called, so
`imgdedup config` does not import torch and a missing extra only breaks the command that needs it."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from imgdedup.config import ConfigError, Settings, load_settings

#: subcommand -> ("module:attribute" of its click command, one-line help shown without importing it).
SUBCOMMANDS = {
    "config": ("imgdedup.cli_basic:config_command", "Print the effective configuration (secrets masked)."),
    "dev": ("imgdedup.cli_basic:dev_group", "Start, inspect or stop the embedded Kafka + Redis dev stack."),
    "publish": ("imgdedup.cli_basic:publish_command", "Publish one image event per image file."),
    "backfill": ("imgdedup.cli_basic:backfill_command", "Publish an existing catalog (JSON Lines or CSV manifest)."),
    "verdicts": ("imgdedup.cli_basic:verdicts_command", "Print verdicts from the verdict topic."),
    "worker": ("imgdedup.worker:worker_command", "Run the deduplication worker."),
    "eval": ("imgdedup.evaluation.cli:eval_command", "Measure recall, false positives and thresholds."),
    "groups": ("imgdedup.evaluation.cli:groups_command", "Turn verdicts into duplicate groups."),
    "models": ("imgdedup.embedders.cli:models_group", "List embedders and their weights; fetch weights."),
    "bench": ("imgdedup.bench.cli:bench_command", "Run the benchmarks (throughput, latency, memory)."),
}

#: Named flags for the most used settings; any setting can be given with --set name=value.
_FLAG_SETTINGS = ("kafka_bootstrap", "redis_url", "input_topic", "verdict_topic", "dlq_topic", "consumer_group")


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx, name):
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module, attr = target[0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)])


def _parse_set(values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected name=value, got {item!r}", param_hint="--set")
        out[name.strip().replace("-", "_")] = value
    return out


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--kafka-bootstrap", help="Kafka bootstrap servers (IMGDEDUP_KAFKA_BOOTSTRAP).")
@click.option("--redis-url", help="Redis URL (IMGDEDUP_REDIS_URL).")
@click.option("--input-topic", help="Input topic (IMGDEDUP_INPUT_TOPIC).")
@click.option("--verdict-topic", help="Verdict topic (IMGDEDUP_VERDICT_TOPIC).")
@click.option("--dlq-topic", help="Dead-letter topic (IMGDEDUP_DLQ_TOPIC).")
@click.option("--consumer-group", help="Consumer group (IMGDEDUP_CONSUMER_GROUP).")
@click.option("--set", "set_", multiple=True, metavar="NAME=VALUE", help="Override any setting (repeatable).")
@click.pass_context
def cli(ctx, set_, **flags):
    """Streaming image deduplication worker and its tools."""
    overrides = {k: v for k, v in flags.items() if k in _FLAG_SETTINGS and v is not None}
    overrides.update(_parse_set(set_))
    ctx.obj = overrides


def settings_from(ctx: click.Context) -> Settings:
    """The effective settings for a subcommand: environment plus the CLI's overrides."""
    try:
        settings = load_settings(**(ctx.find_root().obj or {}))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return settings


def main() -> None:
    cli(prog_name="imgdedup")


if __name__ == "__main__":
    sys.exit(main())
