"""deploy/k8s: the kustomize output of the base and of the example overlay (kubectl kustomize)
validates against the Kubernetes 1.37 schemas, strictly; every Deployment is probed on the right
paths and port, has resources and runs unprivileged; each service scales on its own."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import kubernetes_validate  # type: ignore[import-untyped]  # the package ships no types
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from booking.runtime.auth import check_auth_settings
from booking.runtime.settings import RefusedSettings, RuntimeSettings
from booking.sandbox.google.browser import AUTH_PATH, DECISION_PATH
from booking.sandbox.settings import SandboxSettings

KUBERNETES = "1.37.0"
SERVICES = ("gateway", "orders", "payments", "calendar", "notifications")
MIGRATED = ("orders", "payments", "calendar", "notifications")
SANDBOXES = ("sandbox-konnect", "sandbox-google")
PORTS = {"gateway": 8000, "orders": 8001, "payments": 8002, "calendar": 8003}
PORTS |= {"notifications": 8004, "sandbox-konnect": 8010, "sandbox-google": 8011}
OUTPUTS = ("base", "example")


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def by_generated_name(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """A generated ConfigMap or Secret, whose name kustomize suffixes with a hash."""
    (found,) = [
        d for d in docs if d["kind"] == kind and d["metadata"]["name"].rsplit("-", 1)[0] == name
    ]
    return found


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def referenced(container: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The ConfigMaps and Secrets a container reads."""
    config_maps, secrets = set(), set()
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config_maps.add(source["configMapRef"]["name"])
        if "secretRef" in source:
            secrets.add(source["secretRef"]["name"])
    for variable in container.get("env", []):
        ref = variable.get("valueFrom", {})
        if "configMapKeyRef" in ref:
            config_maps.add(ref["configMapKeyRef"]["name"])
        if "secretKeyRef" in ref:
            secrets.add(ref["secretKeyRef"]["name"])
    return config_maps, secrets


class TestTheSchemas:
    @pytest.mark.parametrize("output", OUTPUTS)
    def test_every_object_validates_strictly_against_kubernetes_1_37(self, rendered, output):
        problems = []
        for doc in rendered[output]:
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as error:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")
        assert problems == []

    def test_the_validator_refuses_what_kubernetes_would(self, rendered):
        deployment = dict(of_kind(rendered["base"], "Deployment")["orders"])
        broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES, strict=True)

    def test_the_outputs_hold_what_they_should(self, rendered):
        kinds = {o: sorted({d["kind"] for d in rendered[o]}) for o in OUTPUTS}
        expected = [
            "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "Job",
            "NetworkPolicy", "PodDisruptionBudget", "Secret", "Service",
        ]  # fmt: skip
        assert kinds["base"] == expected
        assert kinds["example"] == sorted([*expected, "Namespace"])
        assert set(of_kind(rendered["base"], "Deployment")) == set(SERVICES)
        assert set(of_kind(rendered["example"], "Deployment")) == {*SERVICES, *SANDBOXES}


@pytest.mark.parametrize("output", OUTPUTS)
class TestEveryDeployment:
    def test_is_probed_on_the_health_paths_of_its_port(self, rendered, output):
        for name, deployment in of_kind(rendered[output], "Deployment").items():
            (container,) = containers(deployment)
            (port,) = container["ports"]
            assert port == {"name": "http", "containerPort": PORTS[name]}, name
            env = {v["name"]: v.get("value") for v in container.get("env", [])}
            assert str(PORTS[name]) in env.values(), f"{name} listens on its port"
            probes = {
                kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
                for kind in ("startupProbe", "livenessProbe", "readinessProbe")
            }
            assert probes == {
                "startupProbe": ("/health/live", "http"),
                "livenessProbe": ("/health/live", "http"),
                "readinessProbe": ("/health/ready", "http"),
            }, name

    def test_has_resource_requests_and_limits(self, rendered, output):
        workloads = [*of_kind(rendered[output], "Deployment").values()]
        workloads += of_kind(rendered[output], "Job").values()
        for workload in workloads:
            for container in containers(workload):
                resources = container["resources"]
                assert set(resources["requests"]) == {"cpu", "memory"}, container["name"]
                assert set(resources["limits"]) == {"cpu", "memory"}, container["name"]

    def test_runs_unprivileged_on_a_read_only_root(self, rendered, output):
        workloads = [*of_kind(rendered[output], "Deployment").values()]
        workloads += of_kind(rendered[output], "Job").values()
        for workload in workloads:
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["runAsUser"] == 10001  # deploy/Dockerfile's user
            assert pod["automountServiceAccountToken"] is False
            # Service links would set ORDERS_PORT=tcp://... over the settings of that name.
            assert pod["enableServiceLinks"] is False
            for container in pod["containers"]:
                assert container["securityContext"] == {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                }

    def test_runs_the_one_image_with_its_command(self, rendered, output):
        image = {"base": "booking:latest", "example": "registry.example.com/booking:0.1.0"}
        for name, deployment in of_kind(rendered[output], "Deployment").items():
            (container,) = containers(deployment)
            assert container["image"] == image[output]
            module = name.replace("sandbox-", "sandbox ")
            assert " ".join(container["command"]) == f"python -m booking.{module} serve"


@pytest.mark.parametrize("output", OUTPUTS)
class TestEachServiceScalesOnItsOwn:
    def test_with_a_service_an_autoscaler_and_a_disruption_budget(self, rendered, output):
        docs = rendered[output]
        deployments = of_kind(docs, "Deployment")
        services = of_kind(docs, "Service")
        autoscalers = of_kind(docs, "HorizontalPodAutoscaler")
        budgets = of_kind(docs, "PodDisruptionBudget")
        assert set(autoscalers) == set(budgets) == set(SERVICES)
        for name in SERVICES:
            pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
            # The autoscaler owns the count: an apply must not reset it.
            assert "replicas" not in deployments[name]["spec"]
            service = services[name]["spec"]
            assert service["selector"].items() <= pod_labels.items()
            assert service["ports"] == [{"name": "http", "port": PORTS[name], "targetPort": "http"}]
            scaler = autoscalers[name]
            assert scaler["apiVersion"] == "autoscaling/v2"
            assert scaler["spec"]["scaleTargetRef"] == {
                "apiVersion": "apps/v1", "kind": "Deployment", "name": name,
            }  # fmt: skip
            assert scaler["spec"]["minReplicas"] >= 2  # several replicas, always
            assert scaler["spec"]["maxReplicas"] > scaler["spec"]["minReplicas"]
            budget = budgets[name]
            assert budget["apiVersion"] == "policy/v1"
            assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
            assert budget["spec"]["maxUnavailable"] == 1

    def test_the_gateway_finds_each_service_by_its_service_name(self, rendered, output):
        config = by_generated_name(rendered[output], "ConfigMap", "booking-config")["data"]
        for name in MIGRATED:
            assert config[f"{name.upper()}_URL"] == f"http://{name}:{PORTS[name]}"


@pytest.mark.parametrize("output", OUTPUTS)
class TestSettingsAndSecrets:
    def test_each_service_reads_only_its_own_secrets(self, rendered, output):
        docs = rendered[output]
        for name, deployment in of_kind(docs, "Deployment").items():
            (container,) = containers(deployment)
            config_maps, secrets = referenced(container)
            stems = {s.rsplit("-", 1)[0] for s in secrets}
            if name in SANDBOXES:
                assert stems == {"sandbox-secrets"}
            elif name == "gateway":
                assert stems == {"booking-shared"}
            else:
                assert stems == {"booking-shared", f"booking-{name}"}
            existing = {d["metadata"]["name"] for d in docs}
            assert config_maps | secrets <= existing, name

    @pytest.mark.parametrize("name", MIGRATED)
    def test_each_service_logs_in_as_its_own_role_through_the_external_postgres(
        self, rendered, output, name
    ):
        docs = rendered[output]
        url = urlsplit(secret_data(by_generated_name(docs, "Secret", f"booking-{name}"))[
            "DATABASE_URL"
        ])  # fmt: skip
        assert (url.scheme, url.username, url.hostname, url.port) == (
            "postgresql", f"booking_{name}", "postgres", 5432,
        )  # fmt: skip
        shared = secret_data(by_generated_name(docs, "Secret", "booking-shared"))
        assert urlsplit(shared["RABBITMQ_URL"]).hostname == "rabbitmq"
        services = of_kind(docs, "Service")
        for external in ("postgres", "rabbitmq"):
            assert services[external]["spec"]["type"] == "ExternalName"
            assert services[external]["spec"]["externalName"]


def test_every_secret_of_the_base_is_a_placeholder(rendered):
    # (The example overlay sets the sandboxes' own credentials, which are public.)
    for secret in of_kind(rendered["base"], "Secret").values():
        for key, value in secret_data(secret).items():
            assert "REPLACE-WITH" in value, f"{secret['metadata']['name']}.{key}"


@pytest.mark.parametrize("output", OUTPUTS)
def test_no_service_starts_with_the_jwt_secret_as_it_stands(rendered, output):
    shared = secret_data(by_generated_name(rendered[output], "Secret", "booking-shared"))
    settings = RuntimeSettings(development_mode=False, auth_jwt_secret=shared["AUTH_JWT_SECRET"])
    with pytest.raises(RefusedSettings, match="AUTH_JWT_SECRET is still the deployment's placeh"):
        check_auth_settings(settings)


@pytest.mark.parametrize("output", OUTPUTS)
class TestTheMigrationJob:
    def test_migrates_each_schema_as_its_own_role(self, rendered, output):
        (job,) = of_kind(rendered[output], "Job").values()
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
        found = {}
        for container in containers(job):
            (database_url,) = [v for v in container["env"] if v["name"] == "DATABASE_URL"]
            secret = database_url["valueFrom"]["secretKeyRef"]
            found[container["name"]] = (
                " ".join(container["command"]),
                secret["name"].rsplit("-", 1)[0],
                secret["key"],
            )
        assert found == {
            name: (f"python -m booking.{name} migrate", f"booking-{name}", "DATABASE_URL")
            for name in MIGRATED
        }

    def test_declares_the_queues_with_the_services_own_broker_settings(self, rendered, output):
        # migrate also declares each service's queues and bindings: it reads the broker's URL
        # and names (and the consumer settings that shape the queues) where the services do.
        (job,) = of_kind(rendered[output], "Job").values()
        services = of_kind(rendered[output], "Deployment")
        for container in containers(job):
            config_maps, secrets = referenced(container)
            (service,) = [d for n, d in services.items() if n == container["name"]]
            served = referenced(containers(service)[0])
            assert config_maps == served[0]
            assert {s for s in served[1] if s.startswith("booking-shared")} <= secrets

    def test_can_run_before_anything_else_is_applied(self, rendered, output):
        # docs/operations.md, Kubernetes: apply -l 'app.kubernetes.io/component in (config,
        # external,migration)', wait for the Job, then apply the rest.
        docs = rendered[output]
        component = "app.kubernetes.io/component"
        selected = [
            d
            for d in docs
            if d["metadata"].get("labels", {}).get(component) in {"config", "external", "migration"}
        ]
        names = {(d["kind"], d["metadata"]["name"]) for d in selected}
        (job,) = of_kind(selected, "Job").values()
        for container in containers(job):
            config_maps, secrets = referenced(container)
            assert {("ConfigMap", n) for n in config_maps} <= names
            assert {("Secret", n) for n in secrets} <= names
        assert {("Service", "postgres"), ("Service", "rabbitmq")} <= names
        if output == "example":
            assert ("Namespace", "booking") in names


# --- what an ingress routes ---------------------------------------------------------------------


@dataclass(frozen=True)
class IngressPath:
    ingress: str
    host: str | None  # None: every host
    path: str
    path_type: str
    service: str

    def routes(self, host: str, path: str) -> bool:
        """Whether a request for `host` and `path` takes this path, as Kubernetes defines it:
        Exact is the whole path; Prefix matches element by element (/api matches /api and
        /api/x, never /apix), a trailing slash aside."""
        if self.host is not None and self.host != host:
            return False
        if self.path_type == "Exact":
            return path == self.path
        assert self.path_type == "Prefix", f"{self}: no portable meaning"
        prefix = [e for e in self.path.split("/") if e]
        return [e for e in path.split("/") if e][: len(prefix)] == prefix


def ingress_paths(docs: list[dict[str, Any]]) -> list[IngressPath]:
    return [
        IngressPath(
            name,
            rule.get("host"),
            path["path"],
            path["pathType"],
            path["backend"]["service"]["name"],
        )
        for name, ingress in of_kind(docs, "Ingress").items()
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]


def routed(docs: list[dict[str, Any]], host: str, path: str) -> set[str]:
    """The services a request for `host` and `path` could reach through the ingresses."""
    return {p.service for p in ingress_paths(docs) if p.routes(host, path)}


PUBLIC_HOST = {"base": "any.host.example", "example": "booking.example.com"}
# What the gateway serves that only the cluster may reach: the metrics, the full health report,
# the probes and the API's schema.
INTERNAL = [
    "/metrics",
    "/internal/health",
    "/health/live",
    "/health/ready",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
]


@pytest.fixture(scope="module")
def gateway_app() -> FastAPI:
    from booking.gateway.app import create_app
    from booking.gateway.settings import GatewaySettings

    return create_app(GatewaySettings())  # connects to nothing until served


def public_paths(app: FastAPI) -> list[str]:
    """A request path for each route of the gateway's public contract (its OpenAPI document,
    but for the kubelet's probes), for the dashboard, the return page and the admins' websocket."""
    documented = [
        re.sub(r"\{[^}]+\}", "x", path)
        for path in app.openapi()["paths"]
        if path not in ("/health/live", "/health/ready")
    ]
    return [
        *documented,
        *("/admin", "/admin/", "/admin/app.js", "/ws/admin"),
        *("/pay/return/x", "/pay/return/assets/return.js"),
    ]


class TestTheIngress:
    @pytest.mark.parametrize("output", OUTPUTS)
    def test_the_gateway_is_the_one_public_entry_and_its_websocket_stays_open(
        self, rendered, output
    ):
        ingresses = of_kind(rendered[output], "Ingress")
        public = {
            (p.ingress, p.path, p.path_type, p.service)
            for p in ingress_paths(rendered[output])
            if not p.ingress.startswith("sandbox")
        }
        assert public == {
            ("gateway", "/api", "Prefix", "gateway"),
            ("gateway", "/admin", "Prefix", "gateway"),
            ("gateway", "/pay/return", "Prefix", "gateway"),
            ("gateway", "/health", "Exact", "gateway"),
            ("gateway-websocket", "/ws/admin", "Exact", "gateway"),
        }
        websocket = ingresses["gateway-websocket"]["metadata"]["annotations"]
        for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
            assert int(websocket[f"nginx.ingress.kubernetes.io/{timeout}"]) >= 3600

    @pytest.mark.parametrize("output", OUTPUTS)
    def test_every_public_route_of_the_gateway_is_routed(self, rendered, output, gateway_app):
        host = PUBLIC_HOST[output]
        unrouted = [
            p for p in public_paths(gateway_app) if routed(rendered[output], host, p) != {"gateway"}
        ]
        assert unrouted == []
        assert "/api/admin/health" in public_paths(gateway_app)

    @pytest.mark.parametrize("output", OUTPUTS)
    async def test_nothing_internal_of_the_gateway_is_routed(self, rendered, output, gateway_app):
        host = PUBLIC_HOST[output]
        leaks = [
            p
            for p in [*INTERNAL, "/internal/x", "/metrics/x", "/healthz"]
            if routed(rendered[output], host, p)
        ]
        assert leaks == []
        # The list above is what the gateway really serves (else it would prove nothing).
        transport = httpx.ASGITransport(app=gateway_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            missing = [p for p in INTERNAL if (await client.get(p)).status_code == 404]
        assert missing == []

    def test_the_path_matching_is_kubernetes_own(self):
        prefix = IngressPath("i", None, "/api", "Prefix", "s")
        exact = IngressPath("i", "h", "/health", "Exact", "s")
        assert (
            prefix.routes("h", "/api")
            and prefix.routes("h", "/api/")
            and prefix.routes("h", "/api/x")
        )
        assert not prefix.routes("h", "/apix") and not prefix.routes("h", "/")
        assert exact.routes("h", "/health") and not exact.routes("h", "/health/ready")
        assert not exact.routes("other", "/health")
        assert IngressPath("i", None, "/", "Prefix", "s").routes("h", "/anything/at/all")

    def test_the_example_serves_the_host_over_tls(self, rendered):
        for name in ("gateway", "gateway-websocket"):
            spec = of_kind(rendered["example"], "Ingress")[name]["spec"]
            assert spec["rules"][0]["host"] == "booking.example.com"
            assert spec["tls"] == [{"hosts": ["booking.example.com"], "secretName": "booking-tls"}]
        config = by_generated_name(rendered["example"], "ConfigMap", "booking-config")["data"]
        assert config["PUBLIC_BASE_URL"] == "https://booking.example.com"


class TestTheSandboxes:
    def test_their_ingress_shows_a_browser_the_pages_it_opens_and_nothing_else(self, rendered):
        docs = rendered["example"]
        sandbox = by_generated_name(docs, "ConfigMap", "sandbox-config")["data"]
        konnect = urlsplit(sandbox["SANDBOX_KONNECT_PUBLIC_URL"]).hostname
        google = urlsplit(sandbox["SANDBOX_GOOGLE_PUBLIC_URL"]).hostname
        # Where the services send browsers: the consent page (GOOGLE_AUTH_URL), and its answer.
        auth_url = urlsplit(
            by_generated_name(docs, "ConfigMap", "booking-config")["data"]["GOOGLE_AUTH_URL"]
        )
        assert auth_url.hostname == google and auth_url.path == AUTH_PATH
        pages = {
            konnect: ["/pay/abc", "/pay/abc/pay", "/pay/abc/fail"],
            google: [AUTH_PATH, DECISION_PATH, "/calendar/event"],
        }
        service = {konnect: "sandbox-konnect", google: "sandbox-google"}
        for host, paths in pages.items():
            for path in paths:
                assert routed(docs, host, path) == {service[host]}, (host, path)
        # Their APIs (the services call them inside the cluster), control API, health, metrics.
        hidden = [
            "/", "/_sandbox", "/_sandbox/payments/abc/complete", "/_sandbox/reset",
            "/api/v2/payments/init-payment", "/api/v2/payments/abc", "/token",
            "/calendar/v3/calendars/primary/events", "/health", "/health/live", "/metrics",
            "/docs", "/openapi.json",
        ]  # fmt: skip
        for host in (konnect, google):
            assert [p for p in hidden if routed(docs, host, p)] == [], host

    @pytest.mark.parametrize("output", OUTPUTS)
    def test_no_ingress_routes_the_control_api_or_a_whole_sandbox_host(self, rendered, output):
        paths = ingress_paths(rendered[output])
        sandbox_hosts = {p.host for p in paths if p.service.startswith("sandbox")}
        for path in paths:
            for host in {path.host or "any.host.example", *sandbox_hosts}:
                assert not path.routes(host, "/_sandbox/reset"), path
            if path.service.startswith("sandbox"):
                assert path.host is not None, f"{path}: a sandbox on every host"
                assert path.path.strip("/"), f"{path}: the whole sandbox"

    def test_only_the_example_runs_them_and_points_the_services_at_them(self, rendered):
        base = by_generated_name(rendered["base"], "ConfigMap", "booking-config")["data"]
        example = by_generated_name(rendered["example"], "ConfigMap", "booking-config")["data"]
        assert base["KONNECT_API_URL"] == "https://api.konnect.network/api/v2"
        assert base["GOOGLE_TOKEN_URL"] == "https://oauth2.googleapis.com/token"
        assert example["KONNECT_API_URL"] == "http://sandbox-konnect:8010/api/v2"
        assert example["GOOGLE_TOKEN_URL"] == "http://sandbox-google:8011/token"

    def test_their_control_token_is_a_placeholder_they_refuse_outside_development_mode(
        self, rendered
    ):
        docs = rendered["example"]
        token = secret_data(by_generated_name(docs, "Secret", "sandbox-secrets"))[
            "SANDBOX_CONTROL_TOKEN"
        ]
        # Nothing turns development mode on, where the placeholder (and loopback) would pass.
        for name, deployment in of_kind(docs, "Deployment").items():
            (container,) = containers(deployment)
            assert "DEVELOPMENT_MODE" not in {e["name"] for e in container.get("env", [])}, name
        for name, config in of_kind(docs, "ConfigMap").items():
            assert "DEVELOPMENT_MODE" not in config.get("data", {}), name
        with pytest.raises(ValidationError, match="SANDBOX_CONTROL_TOKEN"):
            SandboxSettings(development_mode=False, control_token=token)

    def test_each_keeps_one_replica_for_its_state_in_memory(self, rendered):
        deployments = of_kind(rendered["example"], "Deployment")
        for name in SANDBOXES:
            assert deployments[name]["spec"]["replicas"] == 1
            assert deployments[name]["spec"]["strategy"] == {"type": "Recreate"}
