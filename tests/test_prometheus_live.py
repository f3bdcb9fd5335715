"""A real Prometheus scrapes a real worker that processes real events, and every PromQL expression
of the alert rules and of the dashboard is evaluated against it through the HTTP API.

The worker runs as `python -m imgdedup worker` against the session's Tansu broker and Redis; the
Prometheus configuration is the shipped deploy/prometheus/prometheus.yml with its static targets
pointed at that worker and its intervals shortened. Corpus photos (one of them twice, under another
id) and two bad records go in, so verdicts of two kinds and dead letters of two codes exist.

Every expression must evaluate without error. Expressions that should have data given this traffic
must return series (with the labels their legends and annotations name); the few that may be empty
are listed in MAY_BE_EMPTY with the reason.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from deploy_artifacts import (
    ALERTS,
    DEPLOY,
    alert_rules,
    dashboard_targets,
    grafana_to_promql,
    require_tool,
    selectors,
)
from imgdedup import devstack, messages
from imgdedup.kafka_io import produce_events

pytestmark = pytest.mark.slow

PHOTOS = 5  # distinct corpus photos published; one of them is published a second time
EXPECTED_VERDICTS = PHOTOS + 1
EXPECTED_DEAD_LETTERS = {"invalid_json": 2, "not_an_image": 2}  # one of each per round

#: Expressions allowed to return nothing under this test's healthy traffic, with the reason.
MAY_BE_EMPTY = {
    "alert ImgdedupConsumerLagGrowing": "fires only when lag > 1000 and growing; the test lag is ~0",
    "alert ImgdedupDependencyErrors": "fires only with repeated Kafka/Redis errors",
    "alert ImgdedupPartitionsPaused": "no partition is paused while Redis is up",
    "alert ImgdedupEndToEndLatencyHigh": "fires only above 30 s p99",
    "alert ImgdedupWorkerNotReady": "the worker is ready",
    "alert ImgdedupWorkerDown": "the worker is up",
    "alert ImgdedupNoVerdicts": "verdicts are being published",
    "alert ImgdedupRedisMemoryNearLimit": "the test Redis has no maxmemory (ratio undefined) and is nearly empty",
    "alert ImgdedupHashBucketsCapped": "no bucket reaches mih_bucket_cap_bytes with a handful of photos",
    "alert ImgdedupVectorShardLarge": "5 vectors per shard, far below 500 x EF",
    "alert ImgdedupDecoderProcessDied": "no decoder process dies in a healthy run",
    "Transient errors, retries, decoder deaths [A]": "errors{dependency} appears only after a Kafka/Redis error",
    "Transient errors, retries, decoder deaths [B]": "retries{dependency} appears only after a Redis error",
}
#: Series that may not exist at all under this traffic (labelled metrics whose label never got a value).
MAY_BE_ABSENT = {
    "imgdedup_errors_total": "no transient error in a healthy run",
    "imgdedup_retries_total": "no transient error in a healthy run",
}
#: Alert expressions this traffic must make true: 4 of 15 events are dead letters, far above 1%.
MUST_FIRE = {"ImgdedupDeadLetterRateHigh"}


@dataclass
class Live:
    prometheus: str  # base URL
    worker_metrics: str
    eval_time: float  # when every series of the traffic had been scraped

    def query(self, expr: str) -> dict:
        """The /api/v1/query answer at eval_time; errors come back as status=error, not exceptions."""
        params = urllib.parse.urlencode({"query": expr, "time": f"{self.eval_time:.3f}"})
        try:
            with urllib.request.urlopen(f"{self.prometheus}/api/v1/query?{params}", timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
            return json.loads(exc.read())


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def _wait(what: str, condition, deadline_s: float, proc_logs: list[tuple[subprocess.Popen, Path]]):
    """Poll until condition() is truthy; fail with the children's logs if they die or time runs out."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for proc, log in proc_logs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args[:3]} exited with {proc.returncode} while waiting for {what}:\n"
                            + log.read_text()[-4000:])
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for _, log in proc_logs)
    pytest.fail(f"timed out after {deadline_s:.0f}s waiting for {what}\n{logs}")


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _worker_env(tag: str, kafka: str, redis_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGDEDUP_")}
    env.update({
        "IMGDEDUP_KAFKA_BOOTSTRAP": kafka, "IMGDEDUP_REDIS_URL": redis_url, "IMGDEDUP_KEY_PREFIX": f"p{tag}",
        "IMGDEDUP_INPUT_TOPIC": f"images-{tag}", "IMGDEDUP_VERDICT_TOPIC": f"verdicts-{tag}",
        "IMGDEDUP_DLQ_TOPIC": f"dlq-{tag}", "IMGDEDUP_CONSUMER_GROUP": f"group-{tag}", "IMGDEDUP_PARTITIONS": "2",
        "IMGDEDUP_METRICS_HOST": "127.0.0.1", "IMGDEDUP_METRICS_PORT": str(port),
        # Short group timeouts: Tansu's first join waits on them (about 3 s instead of 23 s).
        "IMGDEDUP_SESSION_TIMEOUT_MS": "6000", "IMGDEDUP_MAX_POLL_INTERVAL_MS": "10000",
    })
    return env


def _prometheus_config(tmp: Path, worker: str) -> Path:
    """The shipped compose config, scraping the test worker every second."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "imgdedup-worker"]
    job["static_configs"][0]["targets"] = [worker]
    config["scrape_configs"] = [job]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _publish(env: dict[str, str], photos: list[Path], *, duplicate: bool) -> None:
    """The photos as image events (the first again under another id if `duplicate`), one record that is
    not JSON and one event whose bytes are not an image."""
    from imgdedup.config import load_settings

    settings = load_settings(kafka_bootstrap=env["IMGDEDUP_KAFKA_BOOTSTRAP"],
                             input_topic=env["IMGDEDUP_INPUT_TOPIC"], verdict_topic=env["IMGDEDUP_VERDICT_TOPIC"],
                             dlq_topic=env["IMGDEDUP_DLQ_TOPIC"])
    events = [messages.make_event(f"photo-{p.stem}", event_id=str(uuid.uuid4()), data=p.read_bytes(),
                                  content_type="image/jpeg") for p in photos]
    if duplicate:
        events.append(messages.make_event(f"copy-of-{photos[0].stem}", event_id=str(uuid.uuid4()),
                                          data=photos[0].read_bytes()))
    events.append(messages.make_event(f"text-{uuid.uuid4().hex[:6]}", event_id=str(uuid.uuid4()),
                                      data=b"plain text, no pixels"))
    produce_events(settings, events)
    producer = Producer(settings.kafka_common())
    producer.produce(settings.input_topic, b"{this is not json", b"default/broken")
    assert producer.flush(30) == 0


def _worker_totals(url: str) -> dict[str, float]:
    status, body = _get(url)
    if status != 200:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "imgdedup_verdicts_total":
                totals["verdicts"] = totals.get("verdicts", 0) + sample.value
            elif sample.name == "imgdedup_dead_letters_total" and sample.value:  # every code exists at 0
                totals[sample.labels["code"]] = sample.value
    return totals


def _processed(url: str, verdicts: int, dead_letters_per_code: int) -> bool:
    totals = _worker_totals(url)
    return totals.get("verdicts", 0) >= verdicts and all(
        totals.get(code, 0) >= dead_letters_per_code for code in EXPECTED_DEAD_LETTERS)


#: PromQL: the smallest dead-letter counter among the expected codes (each round adds one of each).
_CODES = "|".join(EXPECTED_DEAD_LETTERS)
DEAD_LETTERS_SCRAPED = f'min(imgdedup_dead_letters_total{{code=~"{_CODES}"}})'


def _scraped(live: Live, expr: str, expected: float) -> bool:
    live.eval_time = time.time()
    result = live.query(expr)
    return result.get("status") == "success" and any(
        float(s["value"][1]) >= expected for s in result["data"]["result"])


@pytest.fixture(scope="module")
def live(kafka_broker, redis_server, corpus_files, tmp_path_factory):
    prometheus_bin = require_tool("prometheus")
    tmp = tmp_path_factory.mktemp("prom-live")
    tag = uuid.uuid4().hex[:8]
    worker_port, prom_port = devstack.free_port(), devstack.free_port()
    env = _worker_env(tag, kafka_broker.address, redis_server.address, worker_port)
    devstack.create_topics(kafka_broker.address, [env["IMGDEDUP_INPUT_TOPIC"], env["IMGDEDUP_VERDICT_TOPIC"],
                                                  env["IMGDEDUP_DLQ_TOPIC"]], 2)
    worker_log, prom_log = tmp / "worker.log", tmp / "prometheus.log"
    worker = _start([sys.executable, "-m", "imgdedup", "worker"], worker_log, env)
    prom = _start([prometheus_bin, f"--config.file={_prometheus_config(tmp, f'127.0.0.1:{worker_port}')}",
                   f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"], prom_log)
    procs = [(worker, worker_log), (prom, prom_log)]
    base, metrics_url = f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{worker_port}/metrics"
    try:
        _wait("the worker's /readyz", lambda: _get(f"http://127.0.0.1:{worker_port}/readyz")[0] == 200, 180, procs)
        _wait("Prometheus ready", lambda: _get(f"{base}/-/ready")[0] == 200, 60, procs)
        # Two rounds: a labelled counter is born at its first value, which rate() cannot see as an
        # increase; the second round makes every rate over the traffic positive.
        live = Live(base, metrics_url, time.time())
        rounds = [(corpus_files[:PHOTOS - 1], True), (corpus_files[PHOTOS - 1:PHOTOS], False)]
        for number, (photos, duplicate) in enumerate(rounds, start=1):
            _publish(env, photos, duplicate=duplicate)
            verdicts = PHOTOS if number == 1 else EXPECTED_VERDICTS
            _wait(f"round {number} verdicts and dead letters from the worker",
                  lambda v=verdicts, n=number: _processed(metrics_url, v, n), 180, procs)
            _wait(f"Prometheus to scrape round {number}",
                  lambda v=verdicts, n=number: _scraped(live, "sum(imgdedup_verdicts_total)", v)
                  and _scraped(live, DEAD_LETTERS_SCRAPED, n), 60, procs)
        assert _worker_totals(metrics_url) == {"verdicts": EXPECTED_VERDICTS, **EXPECTED_DEAD_LETTERS}
        # The periodic index-size report (every 15 s) has run since, and the rules were evaluated.
        _wait("Prometheus to scrape the index sizes",
              lambda: _scraped(live, "sum(imgdedup_index_images)", PHOTOS)
              and _scraped(live, 'max(imgdedup_vector_shard_vectors{embedder="sscd"})', PHOTOS), 60, procs)
        _wait("rules evaluated after the traffic", lambda: _rules_evaluated_after(base, live.eval_time), 30, procs)
        yield live
    finally:
        _stop(prom)
        _stop(worker)


def _rules(base: str) -> list[dict]:
    status, body = _get(f"{base}/api/v1/rules")
    return [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]] if status == 200 else []


def _rules_evaluated_after(base: str, moment: float) -> bool:
    rules = _rules(base)
    return bool(rules) and all(_rfc3339(r["lastEvaluation"]) > moment for r in rules)


def _rfc3339(text: str) -> float:
    """Prometheus' timestamps carry nanoseconds; Python parses at most microseconds."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", text)).timestamp()


def _series(answer: dict) -> list[dict]:
    assert answer.get("status") == "success", answer.get("error")
    return answer["data"]["result"]


# --- the alert rules --------------------------------------------------------------------------
def test_prometheus_loaded_every_rule_and_evaluates_them_without_error(live):
    rules = _rules(live.prometheus)
    assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in alert_rules())
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert broken == {}


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_expression_evaluates_against_the_live_worker(live, rule):
    series = _series(live.query(rule["expr"]))
    if rule["alert"] in MUST_FIRE:
        assert series, f"{rule['alert']} should be true with {EXPECTED_DEAD_LETTERS} bad records"
        named = set(re.findall(r"\$labels\.(\w+)", rule["annotations"]["summary"] + rule["annotations"]["description"]))
        for s in series:
            assert named <= s["metric"].keys(), f"annotations name labels the result lacks: {named}"
    elif not series:
        assert f"alert {rule['alert']}" in MAY_BE_EMPTY, f"{rule['alert']} returned nothing"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_every_series_an_alert_selects_exists(live, rule):
    """An alert whose selector matches nothing (a renamed metric or label value) would never fire."""
    for selector in selectors(rule["expr"]):
        name = selector.split("{")[0]
        if name in MAY_BE_ABSENT:
            continue
        assert _series(live.query(selector)), f"{rule['alert']}: {selector} matches no series"


# --- the dashboard ----------------------------------------------------------------------------
@pytest.mark.parametrize("title,target", dashboard_targets(), ids=[t for t, _ in dashboard_targets()])
def test_dashboard_query_evaluates_against_the_live_worker(live, title, target):
    expr = grafana_to_promql(target["expr"])
    assert "$" not in expr, f"unreplaced Grafana variable in {expr}"
    series = _series(live.query(expr))
    if not series:
        assert title in MAY_BE_EMPTY, f"panel {title} shows no data: {expr}"
        return
    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
        for s in series:
            assert label in s["metric"], f"panel {title}: legend names {label}, series has {s['metric']}"


def test_the_traffic_shows_up_as_expected_on_the_dashboard(live):
    """Beyond non-empty: the values the operator would read match what was sent."""
    verdicts = {s["metric"]["verdict"]: float(s["value"][1])
                for s in _series(live.query("sum by (verdict) (imgdedup_verdicts_total)"))}
    assert verdicts.get("exact_duplicate", 0) >= 1 and sum(verdicts.values()) == EXPECTED_VERDICTS
    codes = {s["metric"]["code"]: float(s["value"][1])
             for s in _series(live.query("sum by (code) (imgdedup_dead_letters_total) > 0"))}
    assert codes == {c: float(n) for c, n in EXPECTED_DEAD_LETTERS.items()}
    (ready,) = _series(live.query("sum(imgdedup_ready)"))
    assert float(ready["value"][1]) == 1
    stages = {s["metric"]["stage"] for s in _series(live.query("sum by (stage) (imgdedup_stage_seconds_count)"))}
    assert {"fetch", "decode", "hash", "index_write", "produce"} <= stages
