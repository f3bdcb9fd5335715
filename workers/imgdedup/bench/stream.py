"""One worker process through Kafka and Redis: saturated throughput, then latency at a paced rate.

Saturation: N events are published before the worker starts; the rate is taken between the answer
that completes the first tenth (start-up, group join and cold caches excluded) and the last one, and
the worker's CPU time (from /proc, every thread) over the same window gives events per CPU second.

Latency: a fresh worker on fresh topics (see :func:`fresh_topics`), caught up, gets events at a fixed
rate; each event's latency is the time this process received its verdict minus the time it handed the
event to its producer (both on this process' monotonic clock; the worker's own latency field is not used).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from imgdedup import devstack, messages
from imgdedup.bench.report import percentiles_ms
from imgdedup.config import Settings
from imgdedup.evaluation.run import worker_env
from imgdedup.kafka_io import produce_events, producer_config

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """CPU seconds of a process so far, all threads (Linux /proc), or of one thread.

    A process's from its user + system clock ticks (which keep the threads that have ended); a
    thread's from the scheduler's nanosecond run time: a thread's share of a short phase can be
    less than one 10 ms tick."""
    if tid:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the worker's decoder processes sit under a forkserver), from the
    parent ids in /proc (this kernel has no /proc/<pid>/task/<tid>/children)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def descendants_cpu_seconds(pid: int) -> float:
    """CPU seconds of every process below ``pid`` that is still running."""
    total = 0.0
    for child in descendants(pid):
        try:
            total += cpu_seconds(child)
        except (FileNotFoundError, ProcessLookupError):  # a process that just ended
            continue
    return total


def tree_cpu_seconds(pid: int) -> float:
    return cpu_seconds(pid) + descendants_cpu_seconds(pid)


def worker_threads_cpu(pid: int) -> dict[str, float]:
    """The worker's CPU seconds by kind of thread: its main thread (Kafka and Redis clients, JSON,
    verdicts), librdkafka's own threads, the rest (decode and fetch pools, the metrics server), and
    its decoder processes (IMGDEDUP_DECODE_PROCESSES) with the forkserver that starts them."""
    out = {"main": 0.0, "librdkafka": 0.0, "pools": 0.0, "processes": descendants_cpu_seconds(pid)}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            seconds = cpu_seconds(pid, int(task.name))
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            continue
        kind = "main" if int(task.name) == pid else "librdkafka" if name.startswith("rdk:") else "pools"
        out[kind] += seconds
    return out


@dataclass
class Answers:
    """Verdicts and dead letters as this process receives them: event_id -> (monotonic time, outcome)."""

    got: dict[str, tuple[float, str]] = field(default_factory=dict)
    #: event_id -> (wall time received, the verdict's processed_at as wall time), to split the latency
    wall: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: answer count -> (time, CPU seconds per watched pid), sampled when that many answers had arrived
    samples: dict[int, tuple[float, dict[str, float]]] = field(default_factory=dict)
    marks: set[int] = field(default_factory=set)
    watch: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, event_id: str | None, outcome: str, processed_at: str | None = None) -> None:
        now, wall = time.monotonic(), time.time()
        with self.lock:
            if event_id is None or event_id in self.got:
                return
            self.got[event_id] = (now, outcome)
            if processed_at:
                self.wall[event_id] = (wall, messages.parse_rfc3339(processed_at).timestamp())
            n = len(self.got)
            if n in self.marks:
                cpu = {name: tree_cpu_seconds(pid) for name, pid in self.watch.items()}
                if "worker" in self.watch:
                    threads = worker_threads_cpu(self.watch["worker"])
                    cpu |= {f"worker {kind}": seconds for kind, seconds in threads.items()}
                self.samples[n] = (now, cpu)

    def count(self) -> int:
        with self.lock:
            return len(self.got)


class AnswerReader:
    """A thread reading the verdict and dead-letter topics by assignment from the beginning, with a short
    fetch wait so the reader itself adds next to nothing to the measured latency."""

    def __init__(self, settings: Settings, answers: Answers):
        self.settings, self.answers = settings, answers
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="bench-answers")
        self.consumer = Consumer(
            {
                **settings.kafka_common(),
                "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 5,
                "enable.partition.eof": False,
            }
        )
        parts = []
        for topic in (settings.verdict_topic, settings.dlq_topic):
            meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
            parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        self.consumer.assign(parts)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(10)
        self.consumer.close()

    def _run(self) -> None:
        while not self.stopping.is_set():
            msg = self.consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            doc = json.loads(msg.value())
            outcome = (
                doc.get("verdict", "dead_letter")
                if msg.topic() == self.settings.verdict_topic
                else "dead_letter"
            )
            self.answers.record(doc.get("event_id"), outcome, doc.get("processed_at"))


class WorkerProcess:
    """`python -m imgdedup worker` with exactly these settings; SIGTERM (graceful) on exit."""

    def __init__(self, settings: Settings, log_path: Path):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgdedup", "worker"],
            env=worker_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {self.proc.returncode}; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def worker_metrics(settings: Settings) -> dict[str, float]:
    """The worker's counters and histogram sums/counts from its /metrics, keyed like
    ``imgdedup_stage_seconds_sum{stage=decode}``: differences of two scrapes say what one phase cost."""
    url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count", "_total")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metrics_after(settings: Settings, before: dict[str, float], events: int, timeout_s: float = 10.0) -> dict:
    """The worker's metrics once its processing histogram counts all ``events`` since ``before``.

    The worker observes an event's processing time in its delivery callback, at its producer's next
    poll after the broker's acknowledgement, which can come after the bench has read the verdict: a
    scrape at once could miss the last batch's processing while holding its decode times."""
    key = "imgdedup_processing_seconds_count"
    deadline = time.monotonic() + timeout_s
    while True:
        now = worker_metrics(settings)
        if now.get(key, 0.0) - before.get(key, 0.0) >= events or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


#: Worker histograms whose mean over the paced run the bench reports (per event or per batch, as timed).
#: name -> (histogram, labels as worker_metrics writes them).
PACED_MEANS = {
    "batch_size": ("imgdedup_batch_size", ""),
    "processing_s": ("imgdedup_processing_seconds", ""),
    **{f"{stage}_s": ("imgdedup_stage_seconds", f"{{stage={stage}}}") for stage in
       ("fetch", "decode", "hash", "embed", "index_write", "index_query", "produce")},
}


def phase_summary(before: dict[str, float], after: dict[str, float]) -> dict:
    """Full GC passes and the mean of each PACED_MEANS histogram between two scrapes.

    A full (generation 2) collection holds the GIL for as long as it walks the heap, so its count
    belongs beside the latency; the stage means say which part of the worker the latency is spent in."""
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    gc_key = "python_gc_collections_total{generation=2}"
    means = {}
    for name, (histogram, labels) in PACED_MEANS.items():
        count = delta(f"{histogram}_count{labels}")
        means[name] = delta(f"{histogram}_sum{labels}") / count if count else None
    return {"full_gc": int(delta(gc_key)), "means": means}


def make_events(files: list[Path], namespace: str, inline: bool) -> list[dict]:
    """One upsert per file: a file:// URI (default) or the bytes inline, image_id = file stem."""
    out = []
    for path in files:
        source = {"data": path.read_bytes()} if inline else {"uri": path.resolve().as_uri()}
        out.append(messages.make_event(path.stem, event_id=str(uuid.uuid4()), namespace=namespace, **source))
    return out


def arrival_order(files: list[Path], seed: int = 0) -> list[Path]:
    """The files in a seeded random order. `bench_files` lists variants transform by transform, so in
    that order all 78 WebP files (no draft decoding: ~4x a JPEG's cost) would arrive back to back and
    the paced run would measure that burst; an upload feed mixes formats."""
    return [files[i] for i in np.random.default_rng(seed).permutation(len(files))]


def cycle_events(files: list[Path], count: int, namespace: str, inline: bool) -> list[dict]:
    """``count`` events over the files again and again, each pass in its own namespace (``<namespace>-<pass>``),
    so every event is a new image where it lands."""
    events: list[dict] = []
    for cycle in range(-(-count // len(files))):
        events += make_events(files[: count - len(events)], f"{namespace}-{cycle}", inline)
    return events


def wait_for(answers: Answers, event_ids, worker: WorkerProcess | None, timeout_s: float) -> None:
    """Until every event has its answer; raises if the worker (when there is one) exits or time runs out."""
    wanted = set(event_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        with answers.lock:
            missing = len(wanted - answers.got.keys())
        if not missing:
            return
        if worker is not None:
            worker.check()
        if time.monotonic() > deadline:
            where = f"; see {worker.log_path}" if worker is not None else ""
            raise TimeoutError(f"{missing} of {len(wanted)} answers missing after {timeout_s:.0f}s{where}")
        time.sleep(0.05)


def saturation(events: list[dict], answers: Answers, worker: WorkerProcess, timeout_s: float) -> dict:
    """Rate and CPU between the answer completing the first tenth and the last answer (events published
    before the worker started, marks and watched pids set by the caller)."""
    n, first = len(events), min(answers.marks)
    wait_for(answers, [e["event_id"] for e in events], worker, timeout_s)
    (t0, cpu0), (t1, cpu1) = answers.samples[first], answers.samples[n]
    wall = max(t1 - t0, 1e-6)
    done = n - first
    cpu = {name: cpu1[name] - cpu0[name] for name in cpu0}
    return {
        "events": n,
        "window_events": done,
        "window_s": wall,
        "events_per_s": done / wall,
        "worker_cpu_s": cpu["worker"],
        "worker_cores": cpu["worker"] / wall,
        "events_per_worker_cpu_s": done / max(cpu["worker"], 1e-6),
        "cpu_s": cpu,
        "outcomes": _outcomes(answers, events),
    }


def paced(producer: Producer, events: list[dict], rate: float, answers: Answers, settings: Settings,
          worker: WorkerProcess) -> dict:
    """Offer ``events`` at ``rate`` events/s; latency = verdict received - handed to the producer."""
    count = len(events)
    sent, offered_s = offer(producer, settings, events, rate)
    if producer.flush(30):
        raise RuntimeError("paced events not delivered to the broker")
    wait_for(answers, sent, worker, 60 + count / rate)
    with answers.lock:
        latencies = [answers.got[eid][0] - t for eid, (t, _) in sent.items()]
        walls = [(wall, *answers.wall[eid]) for eid, (_, wall) in sent.items() if eid in answers.wall]
        first = min(t for t, _ in sent.values())
        # Per event in sending order: seconds since the first was sent, latency ms, and the part of
        # it before the worker stamped processed_at: shows whether slow events come alone or in runs.
        series = [[round(t - first, 4), round((answers.got[eid][0] - t) * 1e3, 2),
                   round((answers.wall[eid][1] - wall) * 1e3, 2) if eid in answers.wall else None]
                  for eid, (t, wall) in sent.items()]
    return {
        "target_rate": rate,
        "events": count,
        "offered_rate": count / max(offered_s, 1e-6),
        "latency_ms": percentiles_ms(latencies),
        "outcomes": _outcomes(answers, events),
        # wall clock, same host: produced -> the worker stamped processed_at -> verdict received here
        "to_processed_ms": percentiles_ms([p - s for s, _, p in walls]),
        "after_processed_ms": percentiles_ms([r - p for _, r, p in walls]),
        "series": series,
    }


def _send(producer: Producer, settings: Settings, event: dict) -> None:
    producer.produce(
        settings.input_topic,
        messages.encode(event),
        messages.record_key(event["namespace"], event["image_id"]),
    )
    producer.poll(0)


def offer(producer: Producer, settings: Settings, events: list[dict], rate: float):
    """Produce on a fixed schedule; ({event_id: (monotonic, wall) handed to the producer}, seconds taken)."""
    sent: dict[str, tuple[float, float]] = {}
    start = time.monotonic()
    for i, event in enumerate(events):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent[event["event_id"]] = (time.monotonic(), time.time())
        _send(producer, settings, event)
    return sent, time.monotonic() - start


def _outcomes(answers: Answers, events: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    with answers.lock:
        for e in events:
            outcome = answers.got[e["event_id"]][1]
            out[outcome] = out.get(outcome, 0) + 1
    return out


def fresh_topics(settings: Settings, label: str) -> Settings:
    """The settings with new, created, empty input, verdict and dead-letter topics and a new group.

    Every latency phase gets its own: Tansu's memory storage does work in proportion to a topic's
    size on each request, so the same path slows down as its topics fill (ad hoc, 2026-12-01, one topic
    at a constant 413 messages/s: the broker's CPU rose from 11 % to 73 % of a core over 60 s, and
    one hop's p99 from 8 to 27-33 ms over 90 s). A paced run behind the saturation run's thousands of
    messages would be measured on a slower broker than the Kafka path alone it is compared with."""
    tag = uuid.uuid4().hex[:8]
    fresh = settings.model_copy(
        update={
            "input_topic": f"bench-{label}-in-{tag}",
            "verdict_topic": f"bench-{label}-out-{tag}",
            "dlq_topic": f"bench-{label}-dlq-{tag}",
            "consumer_group": f"bench-{label}-{tag}",
        }
    )
    devstack.create_topics(fresh.kafka_bootstrap, [fresh.input_topic, fresh.verdict_topic, fresh.dlq_topic],
                           fresh.partitions, fresh.kafka_extra)
    return fresh


def stream_settings(settings: Settings, roots: list[Path], sscd: bool) -> Settings:
    """A key prefix and metrics port for one section; short group timeouts (the join waits on them)."""
    tag = uuid.uuid4().hex[:8]
    return settings.model_copy(
        update={
            "key_prefix": f"bench{tag}",
            "metrics_port": devstack.free_port(),  # the bench reads the worker's GC counts
            "file_roots": [Path(r).resolve() for r in roots],
            "sscd_enabled": sscd,
            "session_timeout_ms": 6000,
            "max_poll_interval_ms": 30000,
        }
    )


def run_stream(
    settings: Settings,
    files: list[Path],
    *,
    events: int,
    log_path: Path,
    paced_seconds: float,
    inline: bool,
    server_pids: dict[str, int],
    rate: float | None = None,
) -> dict:
    """Saturation (``events`` events over ``files``), then paced latency at ``rate`` (default half the
    saturated rate): each with its own worker process and topics."""
    files = arrival_order(files)
    sat_settings = fresh_topics(settings, "saturation")
    sat = run_saturation(sat_settings, files, events, log_path, inline, server_pids)
    paced_settings = fresh_topics(settings, "paced").model_copy(update={"metrics_port": devstack.free_port()})
    lat = run_paced(paced_settings, files, rate or sat["events_per_s"] / 2, paced_seconds, log_path, inline,
                    server_pids)
    return {
        "saturation": sat,
        "paced": lat,
        "images": len(files),
        "order": "arrival_order (seeded shuffle)",
        "partitions": settings.partitions,
        "batch_size": settings.batch_size,
        "batch_timeout_s": settings.batch_timeout_s,
        "fetch_threads": settings.fetch_threads,
        "decode_threads": settings.decode_threads,
        "kafka_extra": settings.kafka_extra,
        "inline": inline,
        "settings": settings.masked(),
    }


def run_saturation(settings: Settings, files: list[Path], events: int, log_path: Path, inline: bool,
                   server_pids: dict[str, int]) -> dict:
    """``events`` events over ``files``, published before one worker starts: its rate and CPU."""
    answers = Answers()
    batch = cycle_events(files, events, "saturation", inline)
    produce_events(settings, batch)
    answers.marks = {max(1, len(batch) // 10), len(batch)}
    with AnswerReader(settings, answers):
        worker = WorkerProcess(settings, log_path)
        try:
            answers.watch = {"worker": worker.proc.pid, **server_pids}
            sat = saturation(batch, answers, worker, timeout_s=120 + len(batch) / 5)
            sat["worker_full_gc"] = phase_summary({}, worker_metrics(settings))["full_gc"]  # since it started
            sat["input_topic"] = settings.input_topic
        finally:
            worker.stop()
    return sat


def run_paced(settings: Settings, files: list[Path], rate: float, seconds: float, log_path: Path,
              inline: bool, server_pids: dict[str, int]) -> dict:
    """``rate`` events/s for ``seconds`` to a worker that has answered a first event: latency, and what
    the worker spent on it by its own histograms and CPU clocks."""
    answers = Answers()
    events = cycle_events(files, max(1, round(rate * seconds)), "paced", inline)
    # CPU of the servers at the warm-up answer (the 1st) and as each quarter of the events is answered
    answers.marks, answers.watch = {1 + len(events) * k // QUARTERS for k in range(QUARTERS + 1)}, server_pids
    producer = Producer(producer_config(settings, **{"linger.ms": 0}))
    with AnswerReader(settings, answers):
        worker = WorkerProcess(settings, log_path)
        try:
            # The first answer waits out the worker's start-up and group join; the event also connects
            # the producer (idempotence handshake).
            warm = make_events(files[:1], "paced-warmup", inline)[0]
            _send(producer, settings, warm)
            producer.flush(30)
            wait_for(answers, [warm["event_id"]], worker, 120)
            before, cpu_before = worker_metrics(settings), worker_threads_cpu(worker.proc.pid)
            lat = paced(producer, events, rate, answers, settings, worker)
            cpu_after = worker_threads_cpu(worker.proc.pid)
            inside = phase_summary(before, metrics_after(settings, before, len(events)))
        finally:
            worker.stop()
    lat["worker_full_gc"], lat["worker_means"] = inside["full_gc"], inside["means"]
    # Per paced event, idle polling between events included: what a worker costs below saturation.
    lat["worker_cpu_ms_per_event"] = {kind: (cpu_after[kind] - cpu_before[kind]) / lat["events"] * 1000
                                      for kind in cpu_before}
    lat["quarters"], lat["input_topic"] = by_quarter(lat["series"], answers), settings.input_topic
    return lat


#: The paced run is also reported quarter by quarter: on Tansu the path slows down as its topics fill.
QUARTERS = 4


def by_quarter(series: list, answers: Answers) -> dict[str, list[float]]:
    """p99 latency of the events sent in each quarter of the paced run, and each server's CPU cores
    while that quarter was answered: shows whether latency drifts with the broker's load."""
    quarters = np.array_split(np.array([lat for _, lat, _ in series], dtype=float), QUARTERS)
    p99 = [float(np.percentile(q, 99)) if q.size else float("nan") for q in quarters]  # nan: < 4 events
    samples = [answers.samples[mark] for mark in sorted(answers.samples)]
    cores = {f"{name}_cores": [(cpu1[name] - cpu0[name]) / max(t1 - t0, 1e-6)
                               for (t0, cpu0), (t1, cpu1) in pairwise(samples)] for name in answers.watch}
    return {"p99_ms": p99, **cores}
