"""Orchestration of one evaluation: build the dataset, run the worker's own feature code over it for
raw per-signal scores, run the worker's own pipeline (in-process against Redis, or through Kafka with
a real worker process) for verdicts, and hand everything to analysis."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imgdedup.config import Settings
from imgdedup.evaluation import analysis
from imgdedup.evaluation import variants as V
from imgdedup.evaluation.dataset import Dataset, from_ground_truth, generated, list_images

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    bases_dir: Path
    out_dir: Path
    ground_truth: Path | None = None
    seed: int = 0
    transforms: tuple[str, ...] = ()
    limit_bases: int | None = None
    target_precision: float = 1.0
    margin_bits: int = 2
    margin_cosine: float = 0.05
    min_share: float = 0.6
    through_kafka: bool = False
    keep_variants: bool = False  # True: variants stay indexed and may match earlier variants
    embedded_redis: bool | None = None  # None: only if the configured Redis does not answer
    verdicts: bool = True  # False: signal-level numbers only (no Redis needed)
    batch_size: int = 64
    kafka_timeout_s: float = 600.0
    progress: bool = True
    command: str = ""


@dataclass
class EvalRun:
    """Everything a report needs: the dataset, raw scores, verdicts (aligned with items) and results."""

    dataset: Dataset
    matrices: dict[str, np.ndarray]
    signals: list[analysis.Signal]
    verdicts: list[dict | None] | None
    results: dict
    low_detail: list[str] = field(default_factory=list)


def evaluate(settings: Settings, opts: EvalOptions) -> EvalRun:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    with _timed(timings, "dataset"):
        ds = build_dataset(opts)
    with _timed(timings, "features"):
        features, dropped = extract_features(settings, ds, opts)
    if dropped:
        log.warning("%d images could not be read and are left out, e.g. %s", len(dropped), dropped[0])
        gone = {d["image_id"] for d in dropped}
        ds = ds.subset([i for i in range(len(ds)) if ds.items[i].image_id not in gone])
    vector_names = sorted(features[0].vectors) if features else []
    signals = analysis.signals_for(settings, vector_names)
    matrices = analysis.score_matrices(features, signals)
    verdicts = None
    if opts.verdicts:
        with _timed(timings, "verdicts"):
            verdicts = run_verdicts(settings, ds, opts)
    with _timed(timings, "analysis"):
        results = {
            "meta": _meta(settings, opts, ds, features, signals),
            "signals": {s.name: analysis.signal_report(ds, matrices[s.name], s, opts.target_precision,
                                                       opts.margin_cosine if s.higher_is_closer else opts.margin_bits)
                        for s in signals},
            "transforms": analysis.transform_table(ds, matrices, signals, verdicts),
            "verdict": analysis.verdict_report(ds, verdicts, opts.min_share, settings.max_matches) if verdicts is not None else None,
            "dropped": dropped,
        }
    timings["total"] = round(time.perf_counter() - started, 2)
    results["meta"]["seconds"] = timings
    low = [it.image_id for it, f in zip(ds.items, features) if f.low_detail]
    results["meta"]["low_detail_images"] = low
    return EvalRun(ds, matrices, signals, verdicts, results, low)


@contextmanager
def _timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 2)


def _bar(opts: EvalOptions, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not opts.progress, file=sys.stderr, leave=False)


def build_dataset(opts: EvalOptions) -> Dataset:
    if opts.ground_truth is not None:
        return from_ground_truth(opts.bases_dir, opts.ground_truth)
    bases = list_images(opts.bases_dir)
    if opts.limit_bases:
        bases = bases[: opts.limit_bases]
    if not bases:
        raise FileNotFoundError(f"no images in {opts.bases_dir}")
    transforms = V.select(opts.transforms)
    with _bar(opts, len(bases) * len(transforms), "variants") as bar:
        return generated(bases, opts.out_dir / "variants", opts.seed, transforms, progress=bar.update)


def extract_features(settings: Settings, ds: Dataset, opts: EvalOptions) -> tuple[list, list[dict]]:
    """Features of every item with the worker's FeatureExtractor; the unreadable files with their error."""
    from imgdedup.errors import DeadLetterError
    from imgdedup.pipeline import FeatureExtractor

    extractor = FeatureExtractor(settings)
    features, dropped = [], []
    try:
        with _bar(opts, len(ds), "features") as bar:
            for start in range(0, len(ds), opts.batch_size):
                chunk = ds.items[start: start + opts.batch_size]
                for item, out in zip(chunk, extractor.extract([it.path.read_bytes() for it in chunk])):
                    if isinstance(out, DeadLetterError):
                        dropped.append({"image_id": item.image_id, "code": out.code.value, "message": out.message})
                    else:
                        features.append(out)
                bar.update(len(chunk))
    finally:
        extractor.close()
    return features, dropped


# --- verdicts ------------------------------------------------------------------------------------

def make_events(ds: Dataset, namespace: str, op: str = "upsert") -> list[dict]:
    """Events in dataset order (bases first), with file:// URIs; event ids name the run."""
    from imgdedup.messages import make_event

    return [make_event(it.image_id, event_id=f"{namespace}/{op}/{it.image_id}", namespace=namespace, op=op,
                       uri=it.path.resolve().as_uri() if op == "upsert" else None,
                       attributes={"eval_transform": it.transform})
            for it in ds.items]


def eval_settings(settings: Settings, ds: Dataset, **update) -> Settings:
    """The settings with the dataset's directories readable through file:// URIs."""
    roots = list(dict.fromkeys([*settings.file_roots, *{it.path.resolve().parent for it in ds.items}]))
    return settings.model_copy(update={"file_roots": roots, **update})


def run_verdicts(settings: Settings, ds: Dataset, opts: EvalOptions) -> list[dict | None]:
    """Verdicts of every item (None if none came back), from a fresh namespace of a real Redis.

    Bases go in first. Then, unless `keep_variants`, variants go in rounds of one batch that are
    deleted again after their verdicts: each variant is judged against the originals (and its
    batch mates, which are other bases' variants of mostly the same transform), so a transform's
    recall does not borrow from earlier variants of the same picture."""
    namespace = f"eval-{uuid.uuid4().hex[:10]}"
    with ExitStack() as stack:
        settings = stack.enter_context(_redis_for(settings, opts))
        settings = eval_settings(settings, ds)
        send = stack.enter_context(_kafka_runner(settings, opts) if opts.through_kafka
                                   else _pipeline_runner(settings))
        upserts, deletes = make_events(ds, namespace), make_events(ds, namespace, op="delete")
        bases = [i for i, it in enumerate(ds.items) if it.is_base]
        # transform-major order: a batch holds one transform of many bases, so batch mates are
        # copies of *other* pictures (never siblings that would stand in for the original)
        rank = {t: k for k, t in enumerate(dict.fromkeys(it.transform for it in ds.items))}
        rest = sorted((i for i, it in enumerate(ds.items) if not it.is_base),
                      key=lambda i: (rank[ds.items[i].transform], i))
        rounds = [bases] + ([rest] if opts.keep_variants else
                            [rest[k: k + opts.batch_size] for k in range(0, len(rest), opts.batch_size)])
        docs: list[dict] = []
        with _bar(opts, len(ds), "verdicts") as bar:
            for chunk in rounds:
                docs += send([upserts[i] for i in chunk], bar.update)
                if not opts.keep_variants and chunk is not bases:
                    send([deletes[i] for i in chunk], None)
        _cleanup(settings, ds, namespace)
    by_event = {d.get("event_id"): d for d in docs}
    return [by_event.get(e["event_id"]) for e in upserts]


@contextmanager
def _redis_for(settings: Settings, opts: EvalOptions):
    """The configured Redis, or an embedded throw-away one (asked for, or when nothing answers)."""
    import redis

    from imgdedup import devstack

    want = opts.embedded_redis
    if want is None:
        try:
            redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=1,
                                 socket_connect_timeout=1).ping()
            want = False
        except (redis.RedisError, OSError):
            log.info("no Redis at the configured URL: starting an embedded one")
            want = True
    if not want:
        yield settings
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="imgdedup-eval-redis-") as tmp:
        modules = (devstack.redisearch_module(),) if settings.vector_backend == "redisearch" else ()
        server = devstack.start_redis(devstack.free_port(), Path(tmp), persist=False, modules=modules)
        try:
            yield settings.model_copy(update={"redis_url": type(settings.redis_url)(server.address)})
        finally:
            server.stop()


@contextmanager
def _pipeline_runner(settings: Settings):
    """send(events, progress) -> result documents, through the worker's Pipeline in this process."""
    from imgdedup.pipeline import Pipeline

    pipeline = Pipeline(settings)

    def send(events: list[dict], progress) -> list[dict]:
        out: list[dict] = []
        for start in range(0, len(events), settings.batch_size):
            chunk = events[start: start + settings.batch_size]
            out += pipeline.process_events(chunk)
            if progress:
                progress(len(chunk))
        return out

    try:
        yield send
    finally:
        pipeline.close()


def _cleanup(settings: Settings, ds: Dataset, namespace: str) -> None:
    """Delete the run's images again (through the pipeline, so the store's own delete path runs)."""
    from imgdedup.pipeline import Pipeline

    try:
        pipeline = Pipeline(settings, embedders=[])
        try:
            events = make_events(ds, namespace, op="delete")
            for start in range(0, len(events), 500):
                pipeline.process_events(events[start: start + 500])
        finally:
            pipeline.close()
    except Exception as exc:  # noqa: BLE001 - a failed cleanup leaves an unused namespace, not a wrong report
        log.warning("could not delete eval namespace %s: %s", namespace, exc)


# --- through Kafka -------------------------------------------------------------------------------

def worker_env(settings: Settings) -> dict[str, str]:
    """The settings as IMGDEDUP_* variables, so a worker subprocess runs with exactly these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGDEDUP_")}
    for name, value in settings.model_dump(mode="json").items():
        if name == "redis_url":
            value = settings.redis_url.get_secret_value()
        if value is None:
            continue
        env[f"IMGDEDUP_{name.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return env


@contextmanager
def _kafka_runner(settings: Settings, opts: EvalOptions):
    """send(events, progress) -> documents: publish to the input topic and read this run's answers
    from the verdict and dead-letter topics, while `imgdedup worker` runs as a subprocess."""
    from confluent_kafka import Consumer

    from imgdedup import devstack, kafka_io

    devstack.create_topics(settings.kafka_bootstrap, [settings.input_topic, settings.verdict_topic,
                                                       settings.dlq_topic], settings.partitions,
                           settings.kafka_extra)
    settings = settings.model_copy(update={"metrics_port": 0})
    # a throw-away group reading both answer topics from the start; this run's answers are told
    # apart by namespace (verdicts) or by the event id prefix (dead letters)
    reader = Consumer({**settings.kafka_common(), "group.id": f"imgdedup-eval-{uuid.uuid4().hex[:8]}",
                       "auto.offset.reset": "earliest", "enable.auto.commit": False})
    reader.subscribe([settings.verdict_topic, settings.dlq_topic])
    deadline = time.monotonic() + opts.kafka_timeout_s
    log_path = opts.out_dir / "worker.log"
    with log_path.open("ab") as worker_log:
        worker = subprocess.Popen([sys.executable, "-m", "imgdedup", "worker"], env=worker_env(settings),
                                  stdout=worker_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def send(events: list[dict], progress) -> list[dict]:
            kafka_io.produce_events(settings, events)
            wanted, got = {e["event_id"] for e in events}, {}
            while len(got) < len(wanted):
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with {worker.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(wanted) - len(got)} answers missing after {opts.kafka_timeout_s}s; "
                                       f"see {log_path}")
                msg = reader.poll(0.2)
                if msg is None or msg.error():
                    continue
                doc = json.loads(msg.value())
                event_id = doc.get("event_id")
                if event_id in wanted and event_id not in got:
                    got[event_id] = doc
                    if progress:
                        progress(1)
            return list(got.values())

        try:
            yield send
        finally:
            _stop(worker)
            reader.close()


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


# --- metadata ------------------------------------------------------------------------------------

def _meta(settings: Settings, opts: EvalOptions, ds: Dataset, features: list, signals) -> dict:
    versions = features[0].versions if features else {}
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_implementation()} "
                   f"{platform.python_version()}",
        "command": opts.command,
        "corpus": str(opts.bases_dir),
        "source": ds.source,
        "images": len(ds),
        "bases": sum(it.is_base for it in ds.items),
        "variants": sum(not it.is_base for it in ds.items),
        "seed": opts.seed,
        "through_kafka": opts.through_kafka,
        "keep_variants": opts.keep_variants,
        "target_precision": opts.target_precision,
        "margin_bits": opts.margin_bits,
        "margin_cosine": opts.margin_cosine,
        "min_share": opts.min_share,
        "thresholds": {s.name: s.threshold for s in signals},
        "settings": {k: getattr(settings, k) for k in ("phash_radius", "mih_tables", "low_detail_std",
                                                       "sscd_model", "sscd_input_size", "sscd_threshold",
                                                       "clip_enabled", "clip_threshold", "vector_backend")},
        "versions": versions,
        "transforms": {t.name: t.description for t in V.select(opts.transforms)} if ds.source == "generated"
        else {},
    }

