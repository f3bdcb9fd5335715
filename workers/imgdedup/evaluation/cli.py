"""The click commands `imgdedup eval` and `imgdedup groups` (registered lazily in imgdedup.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from imgdedup import devstack
from imgdedup.cli import settings_from


def _command_line() -> str:
    return " ".join(["imgdedup", *sys.argv[1:]]) if sys.argv and "imgdedup" in sys.argv[0] else "imgdedup eval"


@click.command("eval")
@click.option("--bases", "bases_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Directory of distinct base images (default: the shared corpus beside the repository).")
@click.option("--ground-truth", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Your labels instead of generated variants: JSON {file: [duplicate files]} (imagededup format); "
                   "files are read from --bases.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("eval-report"),
              show_default=True, help="Where the report, plots, variants and thumbnails go.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the variant generator.")
@click.option("--transform", "transforms", multiple=True, help="Only these transforms (repeatable; default all).")
@click.option("--limit-bases", type=int, help="Use only the first N bases (quick runs).")
@click.option("--target-precision", type=float, default=1.0, show_default=True,
              help="Precision the recommended thresholds must reach on all pairs.")
@click.option("--margin-bits", type=int, default=2, show_default=True,
              help="Bits the recommended pHash radius stays below the closest distinct pair.")
@click.option("--margin-cosine", type=float, default=0.05, show_default=True,
              help="Cosine the recommended vector threshold stays above the closest distinct pair.")
@click.option("--min-share", type=float, default=0.6, show_default=True,
              help="Anti-chaining share for the duplicate groups.")
@click.option("--through-kafka", is_flag=True, help="Publish events and run a worker subprocess instead of "
                                                    "running the pipeline in-process.")
@click.option("--keep-variants", is_flag=True,
              help="Leave variants in the index, so later ones may match earlier copies of the same picture "
                   "(default: each batch of variants is judged against the originals, then deleted).")
@click.option("--embedded-redis/--no-embedded-redis", default=None,
              help="Start a throw-away Redis (default: only when the configured one does not answer).")
@click.option("--no-verdicts", is_flag=True, help="Signal-level numbers only (no Redis, no pipeline run).")
@click.option("--report-html", is_flag=True, help="Also write report.html with groups, misses and false positives.")
@click.option("--list-transforms", is_flag=True, help="Print the transforms and exit.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def eval_command(ctx, bases_dir, ground_truth, out_dir, seed, transforms, limit_bases, target_precision,
                 margin_bits, margin_cosine, min_share, through_kafka, keep_variants, embedded_redis, no_verdicts,
                 report_html,
                 list_transforms, quiet):
    """Measure recall per transform, false positives, mAP/NDCG and threshold sweeps of the real pipeline."""
    from imgdedup.evaluation import variants

    if list_transforms:
        for t in variants.TRANSFORMS:
            click.echo(f"{t.name:36s} {t.description}")
        return
    from imgdedup.evaluation import html, report
    from imgdedup.evaluation.dataset import default_bases_dir
    from imgdedup.evaluation.run import EvalOptions, evaluate

    devstack.stop_servers_on_sigterm()
    settings = settings_from(ctx)
    try:
        variants.select(transforms)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--transform") from None
    opts = EvalOptions(
        bases_dir=bases_dir or default_bases_dir(), out_dir=out_dir, ground_truth=ground_truth, seed=seed,
        transforms=tuple(transforms), limit_bases=limit_bases, target_precision=target_precision,
        margin_bits=margin_bits, margin_cosine=margin_cosine, min_share=min_share, through_kafka=through_kafka,
        keep_variants=keep_variants, embedded_redis=embedded_redis, verdicts=not no_verdicts, progress=not quiet, command=_command_line())
    if not opts.bases_dir.is_dir():
        raise click.BadParameter(f"{opts.bases_dir} is not a directory", param_hint="--bases")
    run = evaluate(settings, opts)
    written = report.write_all(run, out_dir)
    if report_html:
        written["html"] = html.write_html(run, out_dir)
    click.echo("\n".join(report.transform_markdown(run.results)))
    click.echo("")
    click.echo("\n".join(report.signal_markdown(run.results)))
    if run.results.get("verdict"):
        click.echo("")
        click.echo("\n".join(report.verdict_markdown(run.results["verdict"])))
    click.echo("")
    for name, path in written.items():
        click.echo(f"{name}: {path}")


@click.command("groups")
@click.argument("verdicts", type=click.File("r"), default="-")
@click.option("--from-topic", is_flag=True, help="Read the verdict topic (from the beginning) instead of a file.")
@click.option("--idle-timeout", type=float, default=5.0, show_default=True,
              help="With --from-topic: stop after this many seconds without a verdict.")
@click.option("--min-share", type=float, default=0.6, show_default=True,
              help="An image joins a group if it matches the canonical original or at least this share of members.")
@click.option("--namespace", help="Only verdicts of this namespace.")
@click.option("--images-dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Directory holding the images as <image_id> or <image_id>.<ext>, for contact sheets.")
@click.option("--images-map", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="JSON {image_id: file} for contact sheets (wins over --images-dir).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write groups.json and one contact-sheet PNG per group here.")
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
@click.pass_context
def groups_command(ctx, verdicts, from_topic, idle_timeout, min_share, namespace, images_dir, images_map,
                   out_dir, as_json):
    """Turn verdicts (JSON lines, a file or stdin) into duplicate groups with an anti-chaining guard."""
    from imgdedup.evaluation import groups as G

    settings = settings_from(ctx)
    if from_topic:
        from imgdedup import kafka_io

        docs = kafka_io.iter_topic(settings, settings.verdict_topic, idle_timeout_s=idle_timeout)
    else:
        docs = G.read_jsonl(verdicts)
    if namespace:
        docs = (d for d in docs if d.get("namespace") == namespace)
    try:
        grouping = G.build_groups(docs, min_share, settings.max_matches)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    dups = grouping.duplicate_groups()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "groups.json").write_text(json.dumps(grouping.to_json(), indent=1))
        mapping = json.loads(images_map.read_text()) if images_map else None
        if images_dir or mapping:
            paths = G.resolve_images({m for g in dups for m in g.members}, images_dir, mapping)
            for k, group in enumerate(dups, 1):
                G.contact_sheet(group, paths, out_dir / f"group-{k:04d}.png")
    if as_json:
        click.echo(json.dumps(grouping.to_json(), indent=1))
        return
    click.echo(f"{len(dups)} duplicate groups over {sum(g.size for g in grouping.groups)} images; "
               f"sizes {grouping.to_json()['sizes']}; {len(grouping.refused)} links refused by the chaining guard")
    for k, group in enumerate(dups, 1):
        more = f" (+{group.size - 8} more)" if group.size > 8 else ""
        click.echo(f"{k:4d}. {group.canonical} [{group.size}]: {', '.join(group.members[1:9])}{more}")
    if out_dir is not None:
        click.echo(f"written: {out_dir / 'groups.json'}" + (" and contact sheets" if images_dir or images_map else ""))
