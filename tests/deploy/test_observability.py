"""deploy/observability and deploy/k8s/components/monitoring: the alert rules pass promtool's
check and its unit tests (alerts-test.yml), Prometheus' configuration loads them and scrapes
every service, the Grafana dashboard holds together and asks only for metrics the code
defines (and PromQL that parses), the Compose `observability` profile runs all of it beside the
system, and the ServiceMonitor renders, validates and finds every service."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no types-jsonschema in the dev group
import kubernetes_validate  # type: ignore[import-untyped]  # the package ships no types
import pytest
import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the dev group
from prometheus_client import REGISTRY

from booking.runtime import metrics

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "deploy" / "observability"
RULES = OBSERVABILITY / "alerts.yml"
RULE_TESTS = OBSERVABILITY / "alerts-test.yml"
DASHBOARD = OBSERVABILITY / "grafana" / "booking.json"
COMPONENT = ROOT / "deploy" / "k8s" / "components" / "monitoring"
SERVICE_MONITOR_SCHEMA = Path(__file__).parent / "servicemonitor.schema.json"
SERVICES = ("gateway", "orders", "payments", "calendar", "notifications")
PORTS = {"gateway": 8000, "orders": 8001, "payments": 8002, "calendar": 8003}
PORTS |= {"notifications": 8004}
PROFILE = ("prometheus", "grafana", "jaeger")
KUBERNETES = "1.37.0"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed: Debian's `prometheus` package has it (apt-get install "
    "prometheus; .ci/run installs it)",
)


def promtool(deploy, *args: str | Path) -> str:
    assert PROMTOOL is not None
    result = deploy.run([PROMTOOL, *map(str, args)])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


# --- which metrics an expression asks for ------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+\S+")
_NAME = re.compile(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not its functions, labels or keywords)."""
    text = _STRINGS.sub('""', expr)
    for pattern in (_MATCHERS, _RANGES, _GROUPING, _OFFSET):
        text = pattern.sub(" ", text)
    return {name for name in _NAME.findall(text) if name.lower() not in _KEYWORDS}


def defined_metrics() -> set[str]:
    """The series names booking.runtime.metrics defines (with each type's suffixes), and `up`,
    which Prometheus records for every target."""
    names = {"up"}
    for family in REGISTRY.collect():
        if not family.name.startswith(metrics.PREFIX):
            continue
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


def test_metric_names_are_read_out_of_promql():
    expr = (
        'sum by (job) (rate(booking_http_requests_total{status=~"5.."}[$__rate_interval])) '
        "/ on (job) group_left sum by (job) (rate(booking_http_requests_total[5m] offset 1h)) "
        "> 0.05 and histogram_quantile(0.95, sum by (le) (rate(booking_x_bucket[5m]))) > bool 1"
    )
    assert metric_names(expr) == {"booking_http_requests_total", "booking_x_bucket"}
    assert "booking_x_bucket" not in defined_metrics()
    assert {"booking_bookings_total", "booking_outbox_lag_seconds", "up"} <= defined_metrics()


# --- the alert rules ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def rule_tests() -> dict[str, Any]:
    return yaml.safe_load(RULE_TESTS.read_text())


class TestTheAlertRules:
    @needs_promtool
    def test_promtool_checks_them(self, deploy):
        assert "SUCCESS" in promtool(deploy, "check", "rules", RULES)

    @needs_promtool
    def test_their_unit_tests_pass(self, deploy):
        result = deploy.run([PROMTOOL, "test", "rules", str(RULE_TESTS)], cwd=OBSERVABILITY)
        assert result.returncode == 0, result.stdout + result.stderr

    @needs_promtool
    def test_the_unit_tests_catch_a_broken_rule(self, deploy, tmp_path):
        # A dead letter that no longer alerts: the firing case in alerts-test.yml fails.
        broken = RULES.read_text().replace(
            "max by (schema) (booking_dead_letters_waiting) > 0",
            "max by (schema) (booking_dead_letters_waiting) > 5",
        )
        assert broken != RULES.read_text()
        (tmp_path / "alerts.yml").write_text(broken)
        shutil.copy(RULE_TESTS, tmp_path / "alerts-test.yml")
        result = deploy.run([PROMTOOL, "test", "rules", "alerts-test.yml"], cwd=tmp_path)
        assert result.returncode != 0
        assert "BookingDeadLetters" in result.stdout + result.stderr

    def test_the_alerts_an_operator_needs_are_there(self, rules):
        exprs = {rule["alert"]: rule["expr"] for rule in rules}
        assert "booking_dead_letters_waiting" in exprs["BookingDeadLetters"]
        assert "booking_outbox_lag_seconds" in exprs["BookingOutboxLagHigh"]
        assert 'result="unavailable"' in exprs["BookingProviderErrorRateHigh"]
        assert "booking_orders_oldest_pending_seconds" in exprs["BookingPaymentsNotOpening"]
        assert "booking_bookings_total" in exprs["BookingFlowStalled"]
        assert exprs["BookingServiceDown"].strip().endswith("== 0")
        assert "absent(up" in exprs["BookingServiceMissing"]

    def test_each_asks_only_for_metrics_the_code_defines(self, rules):
        known = defined_metrics()
        unknown = {rule["alert"]: metric_names(rule["expr"]) - known for rule in rules}
        assert {alert: names for alert, names in unknown.items() if names} == {}

    def test_each_has_a_severity_and_says_what_happened(self, rules):
        for rule in rules:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]

    def test_each_is_unit_tested_firing_and_quiet(self, rules, rule_tests):
        fired: set[str] = set()
        quiet: set[str] = set()
        for case in rule_tests["tests"]:
            for check in case["alert_rule_test"]:
                (fired if check["exp_alerts"] else quiet).add(check["alertname"])
        alerts = {rule["alert"] for rule in rules}
        assert fired == alerts
        assert quiet <= alerts
        assert rule_tests["rule_files"] == ["alerts.yml"]


# --- Prometheus' configuration (the Compose profile's) -----------------------------------------


class TestPrometheusConfig:
    @needs_promtool
    def test_promtool_checks_it_with_its_rules(self, deploy):
        out = promtool(deploy, "check", "config", OBSERVABILITY / "prometheus.yml")
        assert "1 rule files found" in out

    def test_it_scrapes_every_replica_of_every_service_as_a_job_named_after_it(self):
        config = yaml.safe_load((OBSERVABILITY / "prometheus.yml").read_text())
        assert config["rule_files"] == ["alerts.yml"]
        jobs = {job["job_name"]: job for job in config["scrape_configs"]}
        assert set(jobs) == set(SERVICES)
        for name, job in jobs.items():
            # DNS discovery: every replica `docker compose up --scale` starts.
            assert job["dns_sd_configs"] == [{"names": [name], "type": "A", "port": PORTS[name]}]
            assert job.get("metrics_path", "/metrics") == "/metrics"


# --- the dashboard -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in panels(dashboard) for target in panel["targets"]]


class TestTheDashboard:
    def test_it_is_a_grafana_dashboard_with_its_sections(self, dashboard):
        assert dashboard["uid"] == "booking-overview" and dashboard["title"]
        assert isinstance(dashboard["schemaVersion"], int)
        rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
        assert rows == [
            "Booking funnel",
            "Providers: Konnect and Google",
            "Messaging",
            "Services",
        ]
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))

    def test_the_panels_fit_the_grid_without_overlapping(self, dashboard):
        taken: dict[tuple[int, int], int] = {}
        for panel in dashboard["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                    taken[(x, y)] = panel["id"]

    def test_every_panel_queries_the_provisioned_prometheus(self, dashboard):
        sources = yaml.safe_load((OBSERVABILITY / "grafana" / "datasources.yml").read_text())
        [prometheus] = [s for s in sources["datasources"] if s["type"] == "prometheus"]
        assert prometheus["url"] == "http://prometheus:9090"
        for panel in panels(dashboard):
            assert panel["type"] in ("timeseries", "stat"), panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": prometheus["uid"]}
            assert panel["targets"], panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip(), panel["title"]

    def test_every_expression_asks_only_for_metrics_the_code_defines(self, dashboard):
        known = defined_metrics()
        unknown = {expr: metric_names(expr) - known for expr in exprs(dashboard)}
        assert {expr: names for expr, names in unknown.items() if names} == {}

    def test_it_shows_the_funnel_the_providers_the_messaging_and_the_services(self, dashboard):
        asked = set().union(*(metric_names(expr) for expr in exprs(dashboard)))
        assert {
            "booking_bookings_total",
            "booking_payments_total",
            "booking_provider_calls_total",
            "booking_provider_call_duration_seconds_bucket",
            "booking_outbox_lag_seconds",
            "booking_queue_messages",
            "booking_dead_letters_waiting",
            "booking_message_handler_duration_seconds_bucket",
            "booking_http_requests_total",
            "booking_admin_websockets",
            "up",
        } <= asked

    @needs_promtool
    def test_every_expression_is_promql_that_parses(self, deploy, dashboard, tmp_path):
        # promtool parses a rules file: each expression becomes a recording rule, with Grafana's
        # interval variables replaced by what they stand for.
        recorded = [
            {
                "record": f"dashboard:expr_{i}",
                "expr": expr.replace("$__rate_interval", "1m").replace("$__range", "6h"),
            }
            for i, expr in enumerate(exprs(dashboard))
        ]
        path = tmp_path / "dashboard-rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
        assert f"SUCCESS: {len(recorded)} rules found" in promtool(deploy, "check", "rules", path)


# --- the Compose profile -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def profile(compose) -> dict[str, dict[str, Any]]:
    return {
        n: s for n, s in compose["services"].items() if "observability" in s.get("profiles", [])
    }


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path: host path, for the bind mounts of the repository's files."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            found[target] = source
    return found


class TestTheComposeProfile:
    def test_it_is_prometheus_grafana_and_jaeger_and_nothing_else_of_the_system(
        self, compose, profile
    ):
        assert sorted(profile) == sorted(PROFILE)
        for service in profile.values():
            assert service["profiles"] == ["observability"]
        # Nothing a plain `up` starts waits for them.
        for name, service in compose["services"].items():
            if not service.get("profiles"):
                assert not set(service.get("depends_on") or {}) & set(PROFILE), name

    def test_their_pages_are_published_on_loopback_only(self, profile):
        published = {
            name: [str(p) for p in service.get("ports", [])] for name, service in profile.items()
        }
        assert published == {
            "prometheus": ["127.0.0.1:${PROMETHEUS_HOST_PORT:-9090}:9090"],
            "grafana": ["127.0.0.1:${GRAFANA_HOST_PORT:-3000}:3000"],
            "jaeger": ["127.0.0.1:${JAEGER_HOST_PORT:-16686}:16686"],
        }

    def test_prometheus_runs_the_repository_s_config_and_rules(self, profile, deploy):
        prometheus = profile["prometheus"]
        [config] = [a for a in prometheus["command"] if a.startswith("--config.file=")]
        config_path = Path(config.split("=", 1)[1])
        folder = mounts(prometheus)[str(config_path.parent)]
        assert (deploy.root / folder).resolve() == OBSERVABILITY
        assert (OBSERVABILITY / config_path.name).exists()
        assert (OBSERVABILITY / "alerts.yml").exists()  # rule_files, beside the config

    def test_grafana_is_provisioned_with_the_data_sources_and_the_dashboard(self, profile):
        grafana = profile["grafana"]
        mounted = mounts(grafana)
        grafana_dir = "./deploy/observability/grafana"
        assert mounted["/etc/grafana/provisioning/datasources/booking.yml"] == (
            f"{grafana_dir}/datasources.yml"
        )
        assert mounted["/etc/grafana/provisioning/dashboards/booking.yml"] == (
            f"{grafana_dir}/dashboards.yml"
        )
        providers = yaml.safe_load((OBSERVABILITY / "grafana" / "dashboards.yml").read_text())
        [provider] = providers["providers"]
        where = provider["options"]["path"]
        assert mounted[f"{where}/booking.json"] == f"{grafana_dir}/booking.json"
        home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert home == f"{where}/booking.json"
        assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}

    def test_jaeger_takes_otlp_over_http_where_the_services_are_pointed(self, compose, profile):
        jaeger = profile["jaeger"]
        assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
        assert "4318" in [str(p) for p in jaeger["expose"]]
        command = "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318 docker compose --profile "
        command += "observability up"
        assert command in (ROOT / "docker-compose.yml").read_text()
        assert command in (ROOT / "docs" / "operations.md").read_text()
        # The services take the endpoint from where Compose runs, and only then: a declared
        # variable without a value is left unset in the container when unset there.
        for name in (*SERVICES, "migrate"):
            env = compose["services"][name]["environment"]
            assert (
                "OTEL_EXPORTER_OTLP_ENDPOINT" in env and env["OTEL_EXPORTER_OTLP_ENDPOINT"] is None
            )


# --- the ServiceMonitor (Kubernetes, with the Prometheus Operator) -------------------------------


@pytest.fixture(scope="module")
def monitored(deploy, tmp_path_factory) -> list[dict[str, Any]]:
    """The example overlay with the monitoring component, as an overlay of a cluster with the
    Prometheus Operator would add it (kustomize takes only relative paths)."""
    here = tmp_path_factory.mktemp("monitored")
    overlay = os.path.relpath(ROOT / "deploy" / "k8s" / "overlays" / "example", here)
    component = os.path.relpath(COMPONENT, here)
    (here / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "booking",
                "resources": [overlay],
                "components": [component],
            }
        )
    )
    result = deploy.run([deploy.tool("kubectl"), "kustomize", str(here)])
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"  # the only operator used here
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


class TestTheServiceMonitor:
    def test_everything_but_the_operator_s_kind_validates_strictly(self, monitored):
        # ServiceMonitor is a CustomResourceDefinition of the Prometheus Operator: the Kubernetes
        # schemas do not have it, so it is held to a schema of its own below.
        problems = []
        for doc in monitored:
            if doc["kind"] == "ServiceMonitor":
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as error:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")
        assert problems == []

    def test_it_validates_against_the_operator_s_schema(self, monitored):
        schema = json.loads(SERVICE_MONITOR_SCHEMA.read_text())
        [monitor] = of_kind(monitored, "ServiceMonitor").values()
        jsonschema.validate(monitor, schema)
        # The schema refuses what the Operator would: a misspelt field.
        broken = {**monitor, "spec": {**monitor["spec"], "endpoint": monitor["spec"]["endpoints"]}}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)

    def test_it_scrapes_every_service_on_its_http_port_and_nothing_else(self, monitored):
        [monitor] = of_kind(monitored, "ServiceMonitor").values()
        assert monitor["metadata"]["namespace"] == "booking"
        services = of_kind(monitored, "Service")
        scraped = {
            name
            for name, service in services.items()
            if selects(monitor["spec"]["selector"], service["metadata"].get("labels", {}))
        }
        assert scraped == set(SERVICES)
        [endpoint] = monitor["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
        for name in SERVICES:
            assert "http" in [p["name"] for p in services[name]["spec"]["ports"]]

    def test_prometheus_s_namespace_may_reach_the_services_http_port(self, monitored):
        policy = of_kind(monitored, "NetworkPolicy")["metrics-from-monitoring"]
        deployments = of_kind(monitored, "Deployment")
        for name in SERVICES:
            labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
            assert selects(policy["spec"]["podSelector"], labels), name
        for name in ("sandbox-konnect", "sandbox-google"):
            labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
            assert not selects(policy["spec"]["podSelector"], labels), name
        [rule] = policy["spec"]["ingress"]
        assert rule["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ]
        assert rule["ports"] == [{"protocol": "TCP", "port": "http"}]

    def test_the_base_and_the_example_stay_without_it(self, rendered):
        # A cluster without the Operator refuses its kind: the component is opt-in.
        for output in ("base", "example"):
            kinds = {doc["kind"] for doc in rendered[output]}
            assert "ServiceMonitor" not in kinds
