"""End to end on a small subset: the real feature code and the real pipeline on the test Redis,
producing the markdown, JSON, PNG and HTML reports; then `imgdedup groups` on those verdicts."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from imgdedup.cli import cli
from imgdedup.evaluation import html, report
from imgdedup.evaluation.run import EvalOptions, evaluate

TRANSFORMS = ("exact_copy", "jpeg_q50", "resize_50", "flip_h", "screenshot")


@pytest.fixture(scope="module")
def small_bases(corpus_files, tmp_path_factory):
    """Four small bases (fast to decode and embed), copied so the run reads its own directory."""
    out = tmp_path_factory.mktemp("bases")
    picked = sorted(corpus_files, key=lambda p: p.stat().st_size)[:4]
    for p in picked:
        (out / p.name).write_bytes(p.read_bytes())
    return out


def test_eval_on_a_small_subset_writes_every_report(make_settings, small_bases, tmp_path):
    settings = make_settings()
    opts = EvalOptions(bases_dir=small_bases, out_dir=tmp_path / "out", transforms=TRANSFORMS,
                       embedded_redis=False, progress=False, command="pytest")
    run = evaluate(settings, opts)
    res = run.results
    assert res["meta"]["bases"] == 4 and res["meta"]["variants"] == 4 * len(TRANSFORMS)
    rows = {r["transform"]: r for r in res["transforms"]}
    assert list(rows) == list(TRANSFORMS)
    # an exact copy is found by SHA-256 and by the verdict, as an exact duplicate of its own base
    assert rows["exact_copy"]["signals"]["sha256"]["recall"] == 1.0
    assert rows["exact_copy"]["verdict"]["recall"] == 1.0
    assert rows["jpeg_q50"]["signals"]["phash"]["recall"] == 1.0
    assert rows["jpeg_q50"]["signals"]["phash"]["max"] <= settings.phash_radius
    # pHash cannot see a mirror image: its distance to the base is large
    assert rows["flip_h"]["signals"]["phash"]["min"] > settings.phash_radius
    verdict = res["verdict"]
    assert verdict["false_duplicate_bases"] == [] and verdict["dead_letters"] == 0
    assert verdict["verdicts"]["exact_duplicate"] >= 4
    phash = res["signals"]["phash"]
    assert phash["base_pairs"]["pairs"] == 6 and phash["variant_other_base"]["pairs"] == 4 * len(TRANSFORMS) * 3
    assert phash["base_pairs"]["closest"]["score"] > settings.phash_radius
    assert 0 < phash["ranking_full"]["map"] <= 1 and phash["recommended"] is not None

    written = report.write_all(run, opts.out_dir)
    page = html.write_html(run, opts.out_dir)
    for name in ("pr_curves", "distributions", "threshold_sweeps"):
        with Image.open(written[name]) as im:
            assert im.format == "PNG" and im.width > 300
    md = written["markdown"].read_text()
    assert "`flip_h`" in md and "false duplicate verdicts among distinct bases: 0" in md
    assert json.loads(written["json"].read_text())["meta"]["command"] == "pytest"
    text = page.read_text()
    assert "Duplicate groups" in text and "Misses" in text
    thumbs = list((opts.out_dir / "thumbs").glob("*.jpg"))
    assert thumbs and all(f'thumbs/{t.name}' in text for t in thumbs)
    # the run cleaned its namespace up again
    ns = run.verdicts[0]["namespace"]
    import redis as _redis

    from imgdedup.keys import Keys
    client = _redis.Redis.from_url(settings.redis_url.get_secret_value())
    assert client.hlen(Keys(settings.key_prefix).order(ns)) == 0

    # the same verdicts through `imgdedup groups`, with contact sheets from the eval's own files
    jsonl = tmp_path / "verdicts.jsonl"
    jsonl.write_text("\n".join(json.dumps(v) for v in run.verdicts))
    mapping = tmp_path / "images.json"
    mapping.write_text(json.dumps({it.image_id: str(it.path) for it in run.dataset.items}))
    result = CliRunner().invoke(cli, ["--set", f"redis_url={settings.redis_url.get_secret_value()}", "groups",
                                      str(jsonl), "--images-map", str(mapping), "--out", str(tmp_path / "groups")])
    assert result.exit_code == 0, result.output
    groups = json.loads((tmp_path / "groups" / "groups.json").read_text())
    assert groups["groups"] and all(g["size"] >= 2 for g in groups["groups"])
    assert len(list((tmp_path / "groups").glob("group-*.png"))) == len(groups["groups"])


def test_eval_cli_lists_transforms_and_rejects_unknown_ones():
    runner = CliRunner()
    listed = runner.invoke(cli, ["eval", "--list-transforms"])
    assert listed.exit_code == 0 and "letterbox_16x9" in listed.output
    bad = runner.invoke(cli, ["eval", "--transform", "nope", "--no-verdicts"])
    assert bad.exit_code != 0 and "unknown transforms" in bad.output


@pytest.mark.slow
def test_eval_through_kafka_with_a_worker_process(kafka_settings, small_bases, tmp_path):
    """The same verdicts when events go through the input topic and a real `imgdedup worker`."""
    settings = kafka_settings(partitions=2)
    opts = EvalOptions(bases_dir=small_bases, out_dir=tmp_path, transforms=("exact_copy", "jpeg_q50"),
                       limit_bases=2, through_kafka=True, embedded_redis=False, progress=False,
                       kafka_timeout_s=120)
    run = evaluate(settings, opts)
    assert [v["verdict"] for v in run.verdicts] == ["unique", "unique", "exact_duplicate", "near_duplicate",
                                                    "exact_duplicate", "near_duplicate"]
    items = run.dataset.items
    assert all(v["duplicate_of"] == it.family for v, it in zip(run.verdicts[2:], items[2:]))
    assert (tmp_path / "worker.log").exists()
