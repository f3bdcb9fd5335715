"""Catalog backfill: manifest rows to image events, rejected rows, and the CLI through a real broker."""

from __future__ import annotations

import io
import json

from click.testing import CliRunner

from imgdedup import backfill, messages
from imgdedup.cli import cli
from imgdedup.kafka_io import iter_topic
from imgdedup.pipeline import Pipeline


def events_of(text: str, fmt: str, namespace: str = "default") -> list:
    return list(backfill.events(backfill.read_rows(io.StringIO(text), fmt), namespace))


def test_csv_rows_become_valid_events_with_extra_columns_as_attributes():
    out = events_of("image_id,uri,namespace,listing\nl-1/p-1,https://cdn.example.com/1.jpg,shop-eu,1\n"
                    "l-2/p-1,file:///data/2.jpg,,2\n", "csv", namespace="shop-us")
    assert [e["namespace"] for e in out] == ["shop-eu", "shop-us"]  # the row's own, else --namespace
    assert out[0]["image"] == {"uri": "https://cdn.example.com/1.jpg"}
    assert out[1]["attributes"] == {"listing": "2"}
    assert all(messages.problems(messages.IMAGE_EVENT, e) == [] for e in out)
    assert all("occurred_at" not in e for e in out)  # a backfill's queueing is not upload latency


def test_event_ids_follow_the_row_content():
    row = '{"image_id": "a", "uri": "https://cdn.example.com/a.jpg"}\n'
    again = events_of(row, "jsonl")[0]["event_id"]
    assert events_of(row, "jsonl")[0]["event_id"] == again  # a rerun is a redelivery
    changed = events_of(row.replace("a.jpg", "a2.jpg"), "jsonl")[0]["event_id"]
    other_ns = events_of(row, "jsonl", namespace="shop-eu")[0]["event_id"]
    assert len({again, changed, other_ns}) == 3
    given = events_of('{"image_id": "a", "uri": "file:///a.jpg", "event_id": "mine"}', "jsonl")[0]
    assert given["event_id"] == "mine"


def test_bad_rows_are_rejected_with_their_line_and_reason():
    text = ('{"image_id": "ok", "uri": "file:///a.jpg"}\n'
            "\n"
            "not json\n"
            '["a list"]\n'
            '{"image_id": "x", "uri": "ftp://host/x.jpg"}\n'
            '{"image_id": "y", "uri": "file:///y.jpg", "colour": "red"}\n'
            '{"image_id": "z"}\n'
            '{"image_id": "gone", "op": "delete"}\n')
    out = events_of(text, "jsonl")
    rejected = {r.line: r.reason for r in out if isinstance(r, backfill.Rejected)}
    assert sorted(rejected) == [3, 4, 5, 6, 7]
    assert "not JSON" in rejected[3] and "not a JSON object" in rejected[4]
    assert "image/uri" in rejected[5] and "colour" in rejected[6] and "image" in rejected[7]
    assert [e["image_id"] for e in out if isinstance(e, dict)] == ["ok", "gone"]
    assert out[-1]["op"] == "delete" and "image" not in out[-1]


def test_a_spreadsheet_csv_with_a_byte_order_mark_is_read(tmp_path, kafka_settings):
    settings = kafka_settings(partitions=1)
    manifest = tmp_path / "export.csv"
    manifest.write_bytes("image_id,uri\r\nx-1,https://cdn.example.com/x.jpg\r\n".encode("utf-8-sig"))
    result = CliRunner().invoke(cli, ["--set", f"kafka_bootstrap={settings.kafka_bootstrap}",
                                      "--input-topic", settings.input_topic, "backfill", str(manifest)])
    assert result.exit_code == 0 and "published 1 events" in result.output, result.output
    (event,) = iter_topic(settings, settings.input_topic, idle_timeout_s=2)
    assert event["image_id"] == "x-1"


def test_csv_row_with_more_cells_than_columns_is_rejected():
    out = events_of("image_id,uri\na,file:///a.jpg,surplus\nb,file:///b.jpg\n", "csv")
    assert isinstance(out[0], backfill.Rejected) and out[0].line == 2
    assert out[1]["image_id"] == "b"


def test_backfill_command_publishes_and_a_rerun_is_a_redelivery(kafka_settings, corpus_files, tmp_path):
    settings = kafka_settings(partitions=2, file_roots=[str(corpus_files[0].parent)])
    manifest = tmp_path / "catalog.csv"
    lines = ["image_id,uri,listing"] + [f"item-{i},{f.resolve().as_uri()},{i}" for i, f in enumerate(corpus_files[:6])]
    manifest.write_text("\n".join([*lines[:3], "bad,gopher://x/y.jpg,9", *lines[3:]]) + "\n")
    args = ["--set", f"kafka_bootstrap={settings.kafka_bootstrap}", "--input-topic", settings.input_topic,
            "backfill", str(manifest), "--namespace", "catalog", "--rejects", str(tmp_path / "rejects.jsonl")]
    runner = CliRunner()
    first = runner.invoke(cli, args)
    assert first.exit_code == 1, first.output  # one row rejected
    assert "published 6 events" in first.output and "line 4:" in first.output
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], "image/uri" in r["reason"]) for r in rejects] == [(4, True)]
    resumed = runner.invoke(cli, [*args, "--skip", "3"])  # rows item-0, item-1 and the bad one
    assert resumed.exit_code == 0 and "published 4 events" in resumed.output, resumed.output
    published = list(iter_topic(settings, settings.input_topic, idle_timeout_s=2))
    assert len(published) == 6 + 4
    pipeline = Pipeline(settings, embedders=[])
    try:
        verdicts = pipeline.process_events(published)
    finally:
        pipeline.close()
    by_id: dict[str, set] = {}
    for v in verdicts:
        by_id.setdefault(v["event_id"], set()).add((v["verdict"], v["duplicate_of"]))
    assert len(by_id) == 6  # the resumed rows carried the same event ids as the first run's
    assert all(len(answers) == 1 for answers in by_id.values())  # ...and got the same verdicts
    assert {v["verdict"] for v in verdicts} == {"unique"}
    assert {v["namespace"] for v in verdicts} == {"catalog"}
    assert {v["attributes"]["listing"] for v in verdicts} == {str(i) for i in range(6)}


def test_undelivered_events_end_with_a_clear_error(tmp_path):
    from imgdedup import devstack

    manifest = tmp_path / "catalog.jsonl"
    manifest.write_text('{"image_id": "a", "uri": "https://cdn.example.com/a.jpg"}\n')
    nobody = f"127.0.0.1:{devstack.free_port()}"  # no broker listens here
    result = CliRunner().invoke(cli, ["--set", f"kafka_bootstrap={nobody}", "--set",
                                      'kafka_extra={"message.timeout.ms": "1500"}', "backfill", str(manifest)])
    assert result.exit_code == 1 and "1 events not delivered" in result.output, result.output
    assert "publishing the manifest again is safe" in result.output and "Traceback" not in result.output
