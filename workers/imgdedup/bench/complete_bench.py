"""The worker's main-thread CPU per event once its images are decoded: `Pipeline.complete` (records,
index writes, queries, the verdict policy) and the verdicts' JSON, on the hash section's files in its
arrival order, against a Redis of its own.

Why: the hash section reads the main thread's CPU per event off a live worker, where Kafka, the decoder
processes and the machine's other load move it by tens of percent from run to run. Here the features
are computed first, so the measured loop is the main thread's own work and nothing else, and a change
to it can be compared with the revision before by running this module on each in turn (alternating,
several times: the VM's speed still moves between runs).

    python -m imgdedup.bench.complete_bench --rounds 8
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import SecretStr

from imgdedup import devstack, messages
from imgdedup.bench.data import bench_files, corpus_dir
from imgdedup.bench.stream import arrival_order, cpu_seconds, make_events
from imgdedup.config import load_settings
from imgdedup.extract import Prepared, extract
from imgdedup.fetch import Fetcher
from imgdedup.pipeline import InputRecord, Pending, Pipeline

#: Events per `Pipeline.complete` call by default: the worker's default batch size (saturated). Below
#: saturation a worker takes what has arrived: ~2 events per batch in the bench's paced runs.
BATCH = 64


def prepared_features(files: list[Path], settings, cache: Path) -> dict[str, Prepared]:
    """Each file's features (image_id = file stem) as a decoder process returns them, kept in ``cache``."""
    if cache.exists():
        stored = pickle.loads(cache.read_bytes())
        if set(stored) == {p.stem for p in files}:
            return stored
    fetcher = Fetcher(settings)
    out = {}
    for path in files:
        result, _ = extract({"uri": path.resolve().as_uri()}, fetcher, settings)
        out[path.stem] = result if not isinstance(result, Prepared) else result._replace(picture=None)
    cache.write_bytes(pickle.dumps(out))
    return out


@dataclass
class Pass:
    """One pass over the events: its outcomes and what it cost."""

    outcomes: Counter
    cpu_seconds: float  # this thread's
    redis_commands: int  # counted by Redis itself: the same on every pass of the same code
    redis_cpu_seconds: float


def complete_once(pipeline: Pipeline, records: list[InputRecord], features: dict, redis_pid: int,
                  batch_size: int = BATCH) -> Pass:
    """One pass over the events on an empty Redis, ``batch_size`` events per `Pipeline.complete`."""
    pipeline.client.flushall()
    outcomes: Counter = Counter()
    commands, redis_cpu = _redis_commands(pipeline.client), cpu_seconds(redis_pid)
    started = time.thread_time()
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        parsed = [pipeline._parse(record) for record in batch]
        prepared = {}
        for i, event in enumerate(parsed):
            prepared[i] = Future()
            prepared[i].set_result(features[event.image_id])
        for output in pipeline.complete(Pending(batch, parsed, prepared)):
            messages.encode(output.message)
            outcomes[output.message.get("verdict", output.kind)] += 1
    spent = time.thread_time() - started
    commands = _redis_commands(pipeline.client) - commands - 1  # the INFO that read the first count
    return Pass(outcomes, spent, commands, cpu_seconds(redis_pid) - redis_cpu)


def _redis_commands(client) -> int:
    return int(client.info("stats")["total_commands_processed"])


def measure(images: int, rounds: int, out: Path, batch_size: int = BATCH) -> list[Pass]:
    """``rounds`` passes over the events of ``images`` files, on a Redis of its own emptied before each."""
    cache = out / "bench-variants"
    files = arrival_order(bench_files(sorted(corpus_dir().glob("*.jpg")), images, cache))
    settings = load_settings(file_roots=[corpus_dir(), cache], sscd_enabled=False, decode_processes=0)
    features = prepared_features(files, settings, out / f"complete-bench-features-{len(files)}.pickle")
    records = [InputRecord(messages.encode(event), None, "in", 0, offset)
               for offset, event in enumerate(make_events(files, "bench", inline=False))]
    with tempfile.TemporaryDirectory(prefix="imgdedup-complete-") as workdir:
        redis_server = devstack.start_redis(devstack.free_port(), Path(workdir) / "redis", persist=False)
        pipeline = Pipeline(settings.model_copy(update={"redis_url": SecretStr(redis_server.address)}), embedders=[])
        try:
            return [complete_once(pipeline, records, features, redis_server.process.pid, batch_size)
                    for _ in range(rounds)]
        finally:
            pipeline.close()
            redis_server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2418, help="distinct files: corpus plus variants (as the bench)")
    parser.add_argument("--rounds", type=int, default=8, help="passes over the events; min and median are printed")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="where the variants and features are cached")
    parser.add_argument("--batch", type=int, default=BATCH, help="events per Pipeline.complete call")
    args = parser.parse_args(argv)
    passes = measure(args.images, args.rounds, args.out, args.batch)
    events = sum(passes[0].outcomes.values())
    print(f"{events} events, batches of {args.batch}; outcomes {dict(sorted(passes[0].outcomes.items()))}; "
          f"Redis commands per event {passes[0].redis_commands / events:.2f}")
    for label, values in (("main-thread CPU", [p.cpu_seconds for p in passes]),
                          ("Redis CPU", [p.redis_cpu_seconds for p in passes])):
        per_event = [v * 1e6 / events for v in values]
        print(f"{label} per event, us: min {min(per_event):.0f}, median {np.median(per_event):.0f} "
              f"(passes: {', '.join(f'{v:.0f}' for v in per_event)})")


if __name__ == "__main__":
    main()
