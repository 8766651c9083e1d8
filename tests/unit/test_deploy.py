"""Static checks of deploy/: compose, Kubernetes, Prometheus, Grafana and the Dockerfile.

No Docker engine or cluster is needed: the compose file is validated against the Compose
Specification JSON Schema (vendored under tests/fixtures/schemas), the Kubernetes manifests
against the OpenAPI schemas shipped with ``kubernetes-validate``, and everything that names a
verb, an environment variable, a metric, a topic or a port is checked against the code that
defines it, so the deployment files cannot drift from the program they run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

import pipeline
from pipeline import embedded, metrics, topics
from pipeline.cli import VERBS
from pipeline.settings import ENV_VARS, Settings
from producers.feeds.config import load_config
from tests import deploy_queries

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_SCHEMA = REPO / "tests" / "fixtures" / "schemas" / "compose-spec.json"

# The Kubernetes version the manifests are written for (and validated against, strictly).
K8S_VERSION = "1.30"

DEFAULTS = {v.name: v.default for v in ENV_VARS}
# Each process's HTTP port (/metrics, /health). The feed pollers take theirs as a flag.
PORTS = {
    "worker": int(DEFAULTS["CRISISWATCH_WORKER_WEB_PORT"]),
    "accountability": int(DEFAULTS["CRISISWATCH_ACCOUNTABILITY_WEB_PORT"]),
    "api": int(DEFAULTS["CRISISWATCH_API_PORT"]),
    "sink": int(DEFAULTS["CRISISWATCH_SINK_METRICS_PORT"]),
    "feeds": 9103,
    "dispatch": int(DEFAULTS["CRISISWATCH_DISPATCH_METRICS_PORT"]),
}
LONG_RUNNING = ("worker", "accountability", "api", "sink", "feeds", "dispatch")
CRISISWATCH_IMAGE = "crisiswatch"


# ---------------------------------------------------------------- helpers

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text("utf-8"))


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text("utf-8")) if doc]


_VAR = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (``$$``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, default = match.group("op"), match.group("default") or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _VAR.sub(one, value)


def compose_raw() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return data


def compose() -> dict[str, Any]:
    """The compose file as Compose sees it with no variables set (every default applies)."""
    data: dict[str, Any] = interpolate(compose_raw(), {})
    return data


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def is_crisiswatch(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] == CRISISWATCH_IMAGE


def env_example() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (DEPLOY / "crisiswatch.env.example").read_text("utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    """What a container gets: env_file (the example's placeholders) overridden by ``environment``."""
    env: dict[str, str] = {}
    if service.get("env_file"):
        env.update(env_example())
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: str(v) for k, v in environment.items()})
    return env


def kustomize_resources() -> list[Path]:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return [K8S / name for name in kustomization["resources"]]


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in kustomize_resources() for doc in load_yaml_docs(path)]


def k8s_by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


def k8s_workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every Deployment and Job."""
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def k8s_pod(component: str) -> dict[str, Any]:
    pod: dict[str, Any] = k8s_by_kind("Deployment")[f"crisiswatch-{component}"]["spec"]["template"]["spec"]
    return pod


def deployment_container(component: str) -> dict[str, Any]:
    container: dict[str, Any] = k8s_pod(component)["containers"][0]
    return container


def k8s_environment() -> dict[str, str]:
    config = k8s_by_kind("ConfigMap")["crisiswatch-config"]["data"]
    secret = k8s_by_kind("Secret")["crisiswatch-secrets"]["stringData"]
    return {**config, **secret}


def verb_parser(verb: str) -> argparse.ArgumentParser:
    """The argument parser ``crisiswatch <verb>`` builds; skips while the verb's module is not written yet."""
    module_name = VERBS[verb][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            pytest.skip(f"{module_name} does not exist yet")
        raise
    parser = argparse.ArgumentParser(prog=f"crisiswatch {verb}", exit_on_error=False)
    module.configure(parser)
    return parser


def metric_types() -> dict[str, str]:
    """Every series name a crisiswatch process exposes, mapped to its metric type."""
    out: dict[str, str] = {}
    for classes in metrics.PROCESSES.values():
        registry = CollectorRegistry()
        for cls in classes:
            cls(registry)
        for family in registry.collect():
            if family.type == "counter":
                out[family.name + "_total"] = "counter"
            elif family.type == "histogram":
                for suffix in ("", "_bucket", "_count", "_sum"):
                    out[family.name + suffix] = "histogram"
            else:
                out[family.name] = family.type
    return out


METRIC_TOKEN = re.compile(r"\bcrisiswatch_[a-z0-9_]+\b")


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expr) for every PromQL expression in alerts.yml and the dashboard."""
    return deploy_queries.queries()


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "dashboards" / "crisiswatch.json").read_text("utf-8"))
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, heredoc bodies skipped."""
    out: list[tuple[str, str]] = []
    lines = iter((DEPLOY / "Dockerfile").read_text("utf-8").splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        instruction, _, args = line.strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
        heredoc = re.search(r"<<-?'?\"?(\w+)", args)
        if heredoc:
            end = heredoc.group(1)
            for body in lines:
                if body.strip() == end:
                    break
    return out


# ---------------------------------------------------------------- compose

def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text("utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []


def test_compose_schema_check_rejects_a_broken_file() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text("utf-8"))
    broken = compose()
    broken["services"]["api"]["healthcheck"]["retires"] = 3  # a typo Compose itself refuses
    broken["services"]["worker"]["depends_on"]["migrate"]["condition"] = "service_done"
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) == 2


def test_every_crisiswatch_service_runs_a_real_verb() -> None:
    commands = {name: s["command"] for name, s in services().items() if is_crisiswatch(s)}
    assert {c[0] for c in commands.values()} >= {"worker", "accountability", "api", "sink", "feeds", "migrate"}
    assert all(c[0] in VERBS for c in commands.values()), commands


@pytest.mark.parametrize("service_name", ["worker", "accountability", "api", "sink", "feeds", "migrate"])
def test_compose_command_line_is_accepted_by_the_verb(service_name: str) -> None:
    verb, *args = services()[service_name]["command"]
    verb_parser(verb).parse_args(args)


def test_feeds_config_given_to_the_pollers_is_one_they_accept(tmp_path: Path) -> None:
    feeds = services()["feeds"]
    command = feeds["command"]
    config_path = command[command.index("--config") + 1]
    assert int(command[command.index("--metrics-port") + 1]) == PORTS["feeds"]
    assert [c["target"] for c in feeds["configs"]] == [config_path]
    compose_config = compose()["configs"][feeds["configs"][0]["source"]]
    assert load_config(DEPLOY / compose_config["file"]).feeds

    container = deployment_container("feeds")
    k8s_config = container["args"][container["args"].index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if k8s_config.startswith(m["mountPath"] + "/"))
    volume = next(v for v in k8s_pod("feeds")["volumes"] if v["name"] == mount["name"])
    config_map = k8s_by_kind("ConfigMap")[volume["configMap"]["name"]]
    written = tmp_path / Path(k8s_config).name
    written.write_text(config_map["data"][written.name], "utf-8")
    assert load_config(written).feeds


def test_feed_poller_state_survives_a_restart() -> None:
    # The pollers remember what each feed announced under CRISISWATCH_DATA_DIR; losing it re-announces crises.
    feeds = services()["feeds"]
    data_dir = feeds["environment"]["CRISISWATCH_DATA_DIR"]
    named = [v.split(":")[0] for v in feeds["volumes"] if v.split(":")[1] == data_dir]
    assert named and named[0] in compose()["volumes"]
    pod = k8s_pod("feeds")
    assert k8s_environment()["CRISISWATCH_DATA_DIR"] == data_dir
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == data_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] in k8s_by_kind("PersistentVolumeClaim")
    assert k8s_by_kind("Deployment")["crisiswatch-feeds"]["spec"]["strategy"]["type"] == "Recreate"
    assert k8s_by_kind("Deployment")["crisiswatch-feeds"]["spec"]["replicas"] == 1


def test_every_crisiswatch_variable_in_deploy_is_a_real_setting() -> None:
    known = set(DEFAULTS)
    files = [DEPLOY / "compose.yaml", DEPLOY / "crisiswatch.env.example", DEPLOY / "Dockerfile", DEPLOY / "README.md",
             *K8S.glob("*.yaml")]
    used = {(path.name, name) for path in files for name in re.findall(r"\bCRISISWATCH_[A-Z0-9_]+\b", path.read_text("utf-8"))}
    assert used, "no CRISISWATCH_ variable found at all"
    assert sorted(f"{f}: {n}" for f, n in used if n not in known) == []


@pytest.mark.parametrize("service_name", (*LONG_RUNNING, "migrate"))
def test_compose_environment_builds_valid_settings(service_name: str) -> None:
    env = compose_environment(services()[service_name])
    settings = Settings.from_env(env)
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.database_url.get().startswith("postgresql://")
    assert settings.database_url.get().split("@")[1].split(":")[0] == "postgres"
    assert settings.partitions == int(DEFAULTS["CRISISWATCH_PARTITIONS"])
    assert settings.api_host == "0.0.0.0", "HTTP endpoints must listen beyond the container's loopback"
    if service_name == "api":
        assert settings.ingest_token and settings.operator_token


def test_compose_core_topics_are_created_with_the_configured_partitions() -> None:
    init = services()["kafka-init"]
    assert set(init["environment"]["TOPICS"].split()) == set(topics.CORE_TOPICS)
    assert init["environment"]["PARTITIONS"] == DEFAULTS["CRISISWATCH_PARTITIONS"]
    script = init["command"][0]
    assert "--create --if-not-exists" in script and '--partitions "$PARTITIONS"' in script
    # One variable drives the topic layout and the workers' view of it.
    raw = compose_raw()["services"]
    assert raw["kafka-init"]["environment"]["PARTITIONS"] == "${CRISISWATCH_PARTITIONS:-4}"
    assert compose_raw()["x-crisiswatch-env"]["CRISISWATCH_PARTITIONS"] == "${CRISISWATCH_PARTITIONS:-4}"
    assert raw["kafka"]["environment"]["KAFKA_NUM_PARTITIONS"] == "${CRISISWATCH_PARTITIONS:-4}"
    raised = interpolate(compose_raw(), {"CRISISWATCH_PARTITIONS": "12"})["services"]
    assert raised["kafka-init"]["environment"]["PARTITIONS"] == "12"
    assert raised["worker"]["environment"]["CRISISWATCH_PARTITIONS"] == "12"


def test_compose_runs_kafka_in_kraft_mode_and_postgres_16_or_later() -> None:
    kafka = services()["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("zookeeper" in str(s).lower() for s in services().values())
    postgres_image = services()["postgres"]["image"]
    assert postgres_image.split(":")[0] == "postgres"
    assert int(re.match(r"\d+", postgres_image.split(":")[1]).group()) >= 16  # type: ignore[union-attr]


def test_compose_start_order_and_health() -> None:
    svc = services()
    for name, service in svc.items():
        for dependency, rule in service.get("depends_on", {}).items():
            assert dependency in svc, f"{name} depends on unknown service {dependency}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in svc[dependency] or is_crisiswatch(svc[dependency]), (name, dependency)
            if rule["condition"] == "service_completed_successfully":
                assert svc[dependency].get("restart") == "no", f"{dependency} is one-shot and must not restart"
    for name in LONG_RUNNING:
        assert svc[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert svc[name]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
        assert svc[name]["environment"]["HEALTH_PORT"] == str(PORTS[name])
        assert "healthcheck" in svc[name]
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert svc["worker"]["deploy"]["replicas"] >= 2


def test_compose_secrets_come_only_from_the_env_file() -> None:
    secret_names = {"POSTGRES_PASSWORD", "GF_SECURITY_ADMIN_PASSWORD", "CRISISWATCH_DATABASE_URL",
                    "CRISISWATCH_INGEST_TOKEN", "CRISISWATCH_OPERATOR_TOKEN", "CRISISWATCH_KAFKA_SASL_PASSWORD",
                    "CRISISWATCH_WEBHOOK_SECRET", "CRISISWATCH_SMTP_URL", "CRISISWATCH_APPRISE_SMS_URL",
                    "CRISISWATCH_APPRISE_PUSH_URL"}
    for name, service in services().items():
        assert not secret_names & set(service.get("environment", {})), f"{name} sets a secret inline"
    example = env_example()
    assert {"POSTGRES_PASSWORD", "CRISISWATCH_DATABASE_URL", "CRISISWATCH_INGEST_TOKEN", "CRISISWATCH_OPERATOR_TOKEN",
            "GF_SECURITY_ADMIN_PASSWORD", "CRISISWATCH_WEBHOOK_SECRET", "CRISISWATCH_SMTP_URL"} <= set(example)
    assert all("CHANGE_ME" in value for value in example.values()), example
    env_files = {f["path"] for s in services().values() for f in s.get("env_file", [])}
    assert env_files == {"crisiswatch.env"}
    assert "crisiswatch.env" in (DEPLOY / ".gitignore").read_text("utf-8").split()


# ---------------------------------------------------------------- Kubernetes

@pytest.mark.parametrize("path", kustomize_resources(), ids=lambda p: p.name)
def test_k8s_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validation_rejects_a_broken_manifest() -> None:
    deployment = load_yaml_docs(K8S / "worker.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_applies_every_manifest() -> None:
    listed = {p.name for p in kustomize_resources()}
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["namespace"] == k8s_by_kind("Namespace").popitem()[0]
    assert [i["name"] for i in kustomization["images"]] == [CRISISWATCH_IMAGE]


def test_k8s_has_the_expected_objects() -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    for component in LONG_RUNNING:
        assert ("Deployment", f"crisiswatch-{component}") in kinds
        assert ("Service", f"crisiswatch-{component}") in kinds
    assert ("Job", "crisiswatch-migrate") in kinds
    assert ("HorizontalPodAutoscaler", "crisiswatch-worker") in kinds
    assert any(kind == "PodDisruptionBudget" for kind, _ in kinds)


@pytest.mark.parametrize("component", (*LONG_RUNNING, "migrate"))
def test_k8s_container_runs_a_real_verb_with_accepted_flags(component: str) -> None:
    workloads = dict(k8s_workloads())
    container = workloads[f"crisiswatch-{component}"]["containers"][0]
    assert container["image"].split(":")[0] == CRISISWATCH_IMAGE
    verb, *args = container["args"]
    assert verb in VERBS
    verb_parser(verb).parse_args(args)


def test_k8s_pods_are_hardened_and_sized() -> None:
    for name, pod in k8s_workloads():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            refs = {(r.get("configMapRef") or r.get("secretRef"))["name"] for r in container["envFrom"]}
            assert refs == {"crisiswatch-config", "crisiswatch-secrets"}, name


@pytest.mark.parametrize("component", LONG_RUNNING)
def test_k8s_probes_hit_the_process_port_liveness_not_depending_on_kafka_or_postgresql(component: str) -> None:
    # /health is 503 while Kafka or PostgreSQL is away: right for readiness, but a liveness probe on it
    # would restart every pod during an outage. /metrics answers whenever the process serves.
    container = deployment_container(component)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/health"), ("livenessProbe", "/metrics")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports[get["port"]] == PORTS[component]
    pod = k8s_by_kind("Deployment")[f"crisiswatch-{component}"]["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(PORTS[component])
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_k8s_services_select_their_pods() -> None:
    deployments = k8s_by_kind("Deployment")
    for name, service in k8s_by_kind("Service").items():
        selector = service["spec"]["selector"].items()
        targets = [d for d in deployments.values() if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, name
        port_names = {p["name"] for p in targets[0]["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert all(p["targetPort"] in port_names for p in service["spec"]["ports"]), name
    for name, pdb in k8s_by_kind("PodDisruptionBudget").items():
        labels = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(labels <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments.values()), name


def test_k8s_environment_builds_valid_settings() -> None:
    settings = Settings.from_env(k8s_environment())
    assert settings.kafka_bootstrap, "Kafka is external in Kubernetes: the ConfigMap must name it"
    assert settings.database_url.get().startswith("postgresql://")
    assert settings.api_host == "0.0.0.0"
    assert (settings.api_port, settings.worker_web_port, settings.sink_metrics_port, settings.dispatch_metrics_port,
            settings.accountability_web_port) == (
        PORTS["api"], PORTS["worker"], PORTS["sink"], PORTS["dispatch"], PORTS["accountability"])
    assert settings.webhook_secret and settings.smtp_url.get().startswith("smtp"), "the dispatcher's secrets are named"


def test_k8s_secret_holds_placeholders_only() -> None:
    secret = k8s_by_kind("Secret")["crisiswatch-secrets"]
    assert "data" not in secret
    assert all(value == "" or "CHANGE_ME" in value for value in secret["stringData"].values()), secret["stringData"]
    config = k8s_by_kind("ConfigMap")["crisiswatch-config"]["data"]
    assert not {"CRISISWATCH_DATABASE_URL", "CRISISWATCH_INGEST_TOKEN", "CRISISWATCH_OPERATOR_TOKEN",
                "CRISISWATCH_KAFKA_SASL_PASSWORD", "CRISISWATCH_WEBHOOK_SECRET", "CRISISWATCH_SMTP_URL",
                "CRISISWATCH_APPRISE_SMS_URL", "CRISISWATCH_APPRISE_PUSH_URL"} & set(config)
    assert {"CRISISWATCH_WEBHOOK_SECRET", "CRISISWATCH_SMTP_URL"} <= set(secret["stringData"])


def test_k8s_workers_never_outnumber_partitions() -> None:
    partitions = Settings.from_env(k8s_environment()).partitions
    worker = k8s_by_kind("Deployment")["crisiswatch-worker"]
    hpa = k8s_by_kind("HorizontalPodAutoscaler")["crisiswatch-worker"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "crisiswatch-worker"}
    assert hpa["spec"]["maxReplicas"] == partitions
    assert 1 <= hpa["spec"]["minReplicas"] <= worker["spec"]["replicas"] <= partitions
    assert services()["worker"]["deploy"]["replicas"] <= int(DEFAULTS["CRISISWATCH_PARTITIONS"])


# ---------------------------------------------------------------- every process everywhere, network policies

def test_every_long_running_process_is_in_compose_k8s_and_prometheus() -> None:
    # A process added in one place and forgotten in another is caught here, whichever it is.
    compose_processes = {name for name, s in services().items() if is_crisiswatch(s) and s.get("restart") != "no"}
    k8s_processes = {name.removeprefix("crisiswatch-") for name in k8s_by_kind("Deployment")}
    scrape = {job["job_name"].removeprefix("crisiswatch-")
              for job in load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
              if job["job_name"].startswith("crisiswatch-")}
    assert compose_processes == k8s_processes == scrape == set(LONG_RUNNING)
    assert set(LONG_RUNNING) == set(metrics.PROCESSES), "each process's metrics are in the catalogue (metrics.PROCESSES)"


def policies() -> list[dict[str, Any]]:
    return list(k8s_by_kind("NetworkPolicy").values())


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector matches ``labels`` (matchLabels and the In/NotIn/Exists operators)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value, operator = labels.get(expression["key"]), expression["operator"]
        if (operator == "In" and value not in expression["values"]) or (operator == "NotIn" and value in expression["values"]) \
                or (operator == "Exists" and value is None) or (operator == "DoesNotExist" and value is not None):
            return False
    return True


def pod_templates() -> dict[str, dict[str, Any]]:
    """Every pod template (Deployments and Jobs) by workload name."""
    return {o["metadata"]["name"]: o["spec"]["template"] for o in k8s_objects() if o["kind"] in ("Deployment", "Job")}


def rules_for(labels: dict[str, str], direction: str) -> list[dict[str, Any]]:
    """The ingress or egress rules of every policy that selects a pod with ``labels``."""
    return [rule for policy in policies() if selects(policy["spec"]["podSelector"], labels)
            for rule in policy["spec"].get(direction, [])]


def allowed_ports(rules: list[dict[str, Any]], container: dict[str, Any]) -> set[int]:
    """The container-side port numbers ``rules`` open (named ports resolved against the container)."""
    names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    out: set[int] = set()
    for rule in rules:
        for port in rule.get("ports", []):
            number = names.get(port["port"]) if isinstance(port["port"], str) else port["port"]
            if number is not None:
                out.add(number)
    return out


def peer_namespaces(rule: dict[str, Any], key: str) -> set[str]:
    return {value for peer in rule.get(key, []) for e in peer.get("namespaceSelector", {}).get("matchExpressions", [])
            if e["key"] == "kubernetes.io/metadata.name" for value in e["values"]}


def test_every_pod_is_denied_by_default_both_ways() -> None:
    deny = [p for p in policies() if not p["spec"].get("ingress") and not p["spec"].get("egress")]
    for name, template in pod_templates().items():
        labels = template["metadata"]["labels"]
        covering = [p for p in deny if selects(p["spec"]["podSelector"], labels)]
        assert covering, f"{name}: no default-deny policy selects it"
        assert {t for p in covering for t in p["spec"]["policyTypes"]} == {"Ingress", "Egress"}, name


def test_every_pod_reaches_dns_kafka_and_postgresql_and_nothing_else_by_default() -> None:
    env = k8s_environment()
    kafka_ports = {int(address.rsplit(":", 1)[1]) for address in env["CRISISWATCH_KAFKA_BOOTSTRAP"].split(",")}
    postgresql_port = int(re.search(r"@[^/:]+:(\d+)/", env["CRISISWATCH_DATABASE_URL"]).group(1))  # type: ignore[union-attr]
    for name, template in pod_templates().items():
        labels, container = template["metadata"]["labels"], template["spec"]["containers"][0]
        egress = allowed_ports(rules_for(labels, "egress"), container)
        assert {53, postgresql_port, *kafka_ports} <= egress, name
        component = labels["app.kubernetes.io/component"]
        extra = egress - {53, postgresql_port, *kafka_ports}
        assert not extra or component in ("dispatch", "feeds"), f"{name} may reach {sorted(extra)}"


def test_prometheus_may_scrape_every_metrics_port_and_only_the_api_takes_outside_traffic() -> None:
    scrape = next(p for p in policies() if p["metadata"]["name"] == "crisiswatch-prometheus-scrape")
    prometheus_namespaces = peer_namespaces(scrape["spec"]["ingress"][0], "from")
    for name, template in pod_templates().items():
        if template["spec"].get("restartPolicy") == "OnFailure":
            continue  # the migrate job serves nothing
        labels, container = template["metadata"]["labels"], template["spec"]["containers"][0]
        metrics_port = int(template["metadata"]["annotations"]["prometheus.io/port"])
        from_prometheus = [r for r in rules_for(labels, "ingress") if peer_namespaces(r, "from") == prometheus_namespaces]
        assert metrics_port in allowed_ports(from_prometheus, container), name
        others = [r for r in rules_for(labels, "ingress") if r not in from_prometheus]
        if labels["app.kubernetes.io/component"] == "api":
            assert allowed_ports(others, container) == {PORTS["api"]}, "the API (and its page) from the ingress controller"
        else:
            assert others == [], f"{name} takes traffic from outside Prometheus"


def test_dispatch_reaches_its_providers_and_feeds_their_sources() -> None:
    env = k8s_environment()
    smtp_port = int(re.search(r":(\d+)(?:\?|$)", env["CRISISWATCH_SMTP_URL"]).group(1))  # type: ignore[union-attr]
    dispatch = pod_templates()["crisiswatch-dispatch"]
    assert {443, smtp_port} <= allowed_ports(rules_for(dispatch["metadata"]["labels"], "egress"),
                                               dispatch["spec"]["containers"][0])
    feeds = pod_templates()["crisiswatch-feeds"]
    container = feeds["spec"]["containers"][0]
    config_map = k8s_by_kind("ConfigMap")["crisiswatch-feeds"]["data"]["feeds.toml"]
    wanted = {443 if url.startswith("https:") else 80 for url in re.findall(r'url = "([^"]+)"', config_map)}
    assert wanted and wanted <= allowed_ports(rules_for(feeds["metadata"]["labels"], "egress"), container)


def test_policy_peers_survive_kustomize_labels() -> None:
    # kustomize (labels with includeSelectors) adds app.kubernetes.io/name=crisiswatch to every matchLabels
    # in a NetworkPolicy, peers included: a peer selected by matchLabels would no longer match Prometheus.
    for policy in policies():
        for rule in policy["spec"].get("ingress", []) + policy["spec"].get("egress", []):
            for peer in rule.get("from", []) + rule.get("to", []):
                for selector in (peer.get("podSelector", {}), peer.get("namespaceSelector", {})):
                    assert "matchLabels" not in selector, policy["metadata"]["name"]


def test_the_policy_checks_notice_an_uncovered_pod() -> None:
    labels = {"app.kubernetes.io/component": "newcomer"}
    assert rules_for(labels, "ingress") == [] or all("from" in r for r in rules_for(labels, "ingress"))
    assert not selects({"matchLabels": {"app.kubernetes.io/component": "api"}}, labels)
    assert selects({"matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In", "values": ["newcomer"]}]},
                   labels)
    assert not selects({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, labels)


# ---------------------------------------------------------------- promtool

PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")
@pytest.mark.parametrize("what, path", [("rules", "alerts.yml"), ("config", "prometheus.yml"),
                                        ("config", "prometheus-kubernetes.yml"), ("test", "alerts.test.yml")])
def test_promtool_accepts_the_rules_scrape_configs_and_alert_tests(what: str, path: str, tmp_path: Path) -> None:
    source = DEPLOY / "prometheus" / path
    if what == "config":
        # rule_files name the path inside the Prometheus container; promtool resolves them next to the config.
        config = load_yaml(source)
        (tmp_path / "alerts.yml").write_text((DEPLOY / "prometheus" / "alerts.yml").read_text("utf-8"), "utf-8")
        config["rule_files"] = ["alerts.yml"]
        source = tmp_path / path
        source.write_text(yaml.safe_dump(config), "utf-8")
    command = [str(PROMTOOL), "test", "rules", path] if what == "test" else [str(PROMTOOL), "check", what, str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=source.parent)
    if "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's is): cannot check it")
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- ports and the image

def test_ports_agree_between_settings_compose_prometheus_k8s_and_image() -> None:
    svc = services()
    assert svc["worker"]["environment"]["CRISISWATCH_WORKER_WEB_PORT"] == str(PORTS["worker"])
    assert svc["accountability"]["environment"]["CRISISWATCH_ACCOUNTABILITY_WEB_PORT"] == str(PORTS["accountability"])
    assert svc["api"]["environment"]["CRISISWATCH_API_PORT"] == str(PORTS["api"])
    assert svc["sink"]["environment"]["CRISISWATCH_SINK_METRICS_PORT"] == str(PORTS["sink"])
    assert svc["dispatch"]["environment"]["CRISISWATCH_DISPATCH_METRICS_PORT"] == str(PORTS["dispatch"])
    assert f"{PORTS['api']}:{PORTS['api']}" in svc["api"]["ports"]
    scrape = {job["job_name"]: job for job in load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]}
    for component, port in PORTS.items():
        job = scrape[f"crisiswatch-{component}"]
        targets = [t for c in job.get("static_configs", []) for t in c["targets"]]
        targets += [f"{name}:{c['port']}" for c in job.get("dns_sd_configs", []) for name in c["names"]]
        assert targets == [f"{component}:{port}"], job
        assert component in svc
    exposed = {int(p) for args in (a for i, a in dockerfile_instructions() if i == "EXPOSE") for p in args.split()}
    assert exposed == set(PORTS.values())
    healthcheck_script = (DEPLOY / "Dockerfile").read_text("utf-8")
    for name in ("CRISISWATCH_WORKER_WEB_PORT", "CRISISWATCH_ACCOUNTABILITY_WEB_PORT", "CRISISWATCH_API_PORT",
                 "CRISISWATCH_SINK_METRICS_PORT",
                 "CRISISWATCH_DISPATCH_METRICS_PORT"):
        assert f'os.environ.get("{name}", "{DEFAULTS[name]}")' in healthcheck_script
    assert f'"{PORTS["feeds"]}"' in healthcheck_script


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    instructions = dockerfile_instructions()
    froms = [args for i, args in instructions if i == "FROM"]
    assert len(froms) >= 2
    base = dict(re.findall(r"ARG (\w+)=(\S+)", (DEPLOY / "Dockerfile").read_text("utf-8")))
    assert all(f.split()[0].replace("${PYTHON_IMAGE}", base.get("PYTHON_IMAGE", "")) == "python:3.11-slim" for f in froms)
    users = [args for i, args in instructions if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [i for i, _ in instructions].index("USER") > max(n for n, (i, a) in enumerate(instructions) if i == "FROM")
    assert any(i == "HEALTHCHECK" and "CMD" in a for i, a in instructions)
    assert ("ENTRYPOINT", '["crisiswatch"]') in instructions
    assert any(i == "RUN" and re.search(r"pip install \.(\s|$)", a) for i, a in instructions)


def test_image_puts_migrations_where_migrate_looks_for_them() -> None:
    # An installed package resolves MIGRATIONS_DIR relative to site-packages.
    relative = embedded.MIGRATIONS_DIR.relative_to(Path(pipeline.__file__).resolve().parent.parent)
    assert relative.as_posix() == "deploy/sql"
    copies = [a.split() for i, a in dockerfile_instructions() if i == "COPY" and not a.startswith("--from")]
    destinations = [args[-1] for args in copies if args[-2] == "deploy/sql"]
    assert destinations == [f"/opt/crisiswatch/lib/python3.11/site-packages/{relative.as_posix()}"]


def test_dockerignore_keeps_everything_the_image_copies() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text("utf-8").splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**", "start from nothing so .venv, .crisiswatch and secrets never reach the build"
    kept = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    sources = [src for i, a in dockerfile_instructions() if i == "COPY" and not a.startswith(("--from", "--chmod"))
               for src in a.split()[:-1]]
    assert sources
    assert {s.rstrip("/") for s in sources} <= kept
    assert all((REPO / s).exists() or s == "README.md" for s in kept)


# ---------------------------------------------------------------- Prometheus and Grafana

def test_alert_rules_have_the_prometheus_rule_file_structure() -> None:
    rules_file = load_yaml(DEPLOY / "prometheus" / "alerts.yml")
    assert set(rules_file) == {"groups"}
    names: list[str] = []
    for group in rules_file["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            names.append(rule["alert"])
    assert len(names) == len(set(names))


def test_alerts_cover_the_failures_an_operator_must_hear_about() -> None:
    exprs = {r["alert"]: r["expr"] for g in load_yaml(DEPLOY / "prometheus" / "alerts.yml")["groups"] for r in g["rules"]}
    joined = "\n".join(exprs.values())
    assert re.search(r"rate\(crisiswatch_dlq_messages_total\[\w+\]\)\)?\s*>\s*0", joined)
    assert any("crisiswatch_checkins_received_total" in e and "crisiswatch_checkins_processed_total" in e and "== 0" in e
               for e in exprs.values())
    assert re.search(r"histogram_quantile\(0\.99,.*crisiswatch_checkin_to_warning_latency_seconds_bucket", joined)
    assert re.search(r"time\(\) - .*crisiswatch_feed_last_success_timestamp_seconds", joined)
    assert "crisiswatch_sink_errors_total" in joined
    assert re.search(r'\bup\{job=~"crisiswatch-\.\+"\} == 0', joined)
    # Citizens left unreached, and channels failing, are heard about.
    assert re.search(r'crisiswatch_dispatch_warnings_total\{outcome="gave_up"\}', joined)
    assert re.search(r'crisiswatch_dispatch_attempts_total\{outcome!="delivered"\}', joined)


def test_prometheus_scrapes_every_process_and_loads_the_alerts() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {f"crisiswatch-{c}" for c in LONG_RUNNING} <= jobs
    mounts = dict(v.split(":")[:2] for v in services()["prometheus"]["volumes"] if v.startswith("./"))
    assert mounts["./prometheus/alerts.yml"] in config["rule_files"]
    assert mounts["./prometheus/prometheus.yml"] in " ".join(services()["prometheus"]["command"])
    k8s_config = load_yaml(DEPLOY / "prometheus" / "prometheus-kubernetes.yml")
    job_rule = next(r for r in k8s_config["scrape_configs"][0]["relabel_configs"] if r.get("target_label") == "job")
    assert job_rule["replacement"] == "crisiswatch-$1", "k8s job names must match the alerts' crisiswatch-<component>"
    assert job_rule["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]


def test_every_metric_used_in_alerts_and_dashboard_exists_with_the_right_type() -> None:
    types = metric_types()
    assert {n for n in metrics.METRIC_NAMES} <= set(types)
    problems: list[str] = []
    for where, expr in promql_expressions():
        try:
            names = deploy_queries.metric_names(expr)
        except ValueError as exc:
            problems.append(f"{where}: does not parse: {exc}")
            continue
        problems += [f"{where}: unknown metric {name}" for name in sorted(names - deploy_queries.SYNTHETIC)
                     if name not in types]
        for function, arguments in deploy_queries.functions(expr):
            for name in sorted(arguments):
                if function in ("rate", "irate", "increase") and types.get(name) == "gauge":
                    problems.append(f"{where}: {function}() of gauge {name}")
                if function == "histogram_quantile" and not name.endswith("_bucket"):
                    problems.append(f"{where}: histogram_quantile over {name}, not a _bucket series")
    alerts_text = (DEPLOY / "prometheus" / "alerts.yml").read_text("utf-8")
    problems += [f"alerts.yml: unknown metric {n}" for n in METRIC_TOKEN.findall(alerts_text) if n not in types]
    assert problems == []


def test_the_metric_check_catches_an_unknown_name_and_a_broken_expression() -> None:
    assert deploy_queries.metric_names('sum(rate(crisiswatch_nope_total{x="crisiswatch_label_value"}[$__rate_interval]))') == {
        "crisiswatch_nope_total"}
    with pytest.raises(ValueError):
        deploy_queries.metric_names("sum(rate(crisiswatch_dlq_messages_total[5m])")
    assert deploy_queries.functions("histogram_quantile(0.5, rate(crisiswatch_dispatch_seconds_sum[5m]))")[0] == (
        "histogram_quantile", {"crisiswatch_dispatch_seconds_sum"})


def test_dashboard_shows_what_the_crisis_centre_watches() -> None:
    for needed in ("crisiswatch_checkins_received_total", "crisiswatch_checkins_processed_total",
                   "sum by (kind) (rate(crisiswatch_warnings_emitted_total", "crisiswatch_active_crises",
                   "sum by (stage, reason) (rate(crisiswatch_dlq_messages_total",
                   "histogram_quantile(0.5, sum by (le) (rate(crisiswatch_checkin_to_warning_latency_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(crisiswatch_checkin_to_warning_latency_seconds_bucket",
                   "crisiswatch_batch_processing_seconds_bucket", "crisiswatch_sink_rows_written_total",
                   "crisiswatch_feed_last_success_timestamp_seconds",
                   "sum by (channel, outcome) (rate(crisiswatch_dispatch_attempts_total"):
        assert any(needed in t["expr"] for p in dashboard_panels() for t in p.get("targets", [])), needed


def test_dashboard_and_alerts_watch_every_stage_the_lag_and_the_dependencies() -> None:
    panel_names = {n for p in dashboard_panels() for t in p.get("targets", []) for n in deploy_queries.metric_names(t["expr"])}
    alert_names = {n for where, expr in promql_expressions() if where.startswith("alert ")
                   for n in deploy_queries.metric_names(expr)}
    stages = {"crisiswatch_api_publish_seconds_bucket", "crisiswatch_checkin_to_warning_latency_seconds_bucket",
              "crisiswatch_crisis_to_first_warning_seconds_bucket", "crisiswatch_warning_to_delivered_seconds_bucket"}
    assert stages <= panel_names and stages <= alert_names
    assert {"crisiswatch_consumer_lag", "crisiswatch_consumer_lag_last_success_timestamp_seconds",
            "crisiswatch_dependency_up"} <= panel_names & alert_names


def test_dashboard_is_well_formed_and_uses_the_provisioned_datasource() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    datasource = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    prometheus_port = services()["prometheus"]["ports"][0].split(":")[-1]
    assert datasource["type"] == "prometheus" and datasource["url"] == f"http://prometheus:{prometheus_port}"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    provider = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "crisiswatch.yml")["providers"][0]
    mounts = dict(v.split(":")[:2] for v in services()["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    home = services()["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/crisiswatch.json"


def test_k8s_accountability_replicas_never_outnumber_partitions() -> None:
    # Each replica owns some partitions of the re-keyed stream; one beyond the partition count sits idle.
    partitions = Settings.from_env(k8s_environment()).partitions
    assert 1 <= k8s_by_kind("Deployment")["crisiswatch-accountability"]["spec"]["replicas"] <= partitions
    assert services()["accountability"].get("deploy", {}).get("replicas", 1) <= int(DEFAULTS["CRISISWATCH_PARTITIONS"])
