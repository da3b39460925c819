"""docker-compose.yml: valid against the Compose specification, every long-running service
checked on its health endpoint, only the gateway and the sandbox pages published, every service
scalable and logged in as its own database role. Apart from that system, the `infra` profile:
the Postgres and RabbitMQ `make run` starts with Docker (booking.devtools.infra), on loopback."""

from __future__ import annotations

import re
import shlex
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]  # no types-PyYAML in the dev group

from booking.devtools import infra
from booking.devtools.infra import InfraSettings
from booking.runtime.auth import check_auth_settings
from booking.runtime.settings import DEVELOPMENT_JWT_SECRET, RefusedSettings, RuntimeSettings
from booking.sandbox.settings import DEVELOPMENT_CONTROL_TOKEN, SandboxSettings

SERVICES = ("gateway", "orders", "payments", "calendar", "notifications")
MIGRATED = ("orders", "payments", "calendar", "notifications")
SANDBOXES = ("sandbox-konnect", "sandbox-google")
PUBLISHED = {"gateway": 8000, "sandbox-konnect": 8010, "sandbox-google": 8011}
PORTS = {"gateway": 8000, "orders": 8001, "payments": 8002, "calendar": 8003}
PORTS |= {"notifications": 8004, "sandbox-konnect": 8010, "sandbox-google": 8011}
# What a plain `docker compose up` starts: the whole system, and nothing of the infra profile.
DEFAULT_PROFILE = {*SERVICES, *SANDBOXES, "postgres", "rabbitmq", "postgres-roles", "migrate"}
# The infra profile's services: the variable naming each one's host port, InfraSettings' field
# giving that variable, and the port inside the container.
INFRA = {
    "infra-postgres": ("INFRA_POSTGRES_PORT", "infra_postgres_port", 5432),
    "infra-rabbitmq": ("INFRA_RABBITMQ_PORT", "infra_rabbitmq_port", 5672),
}
INFRA_FOR = {"DATABASE_URL": "infra-postgres", "RABBITMQ_URL": "infra-rabbitmq"}
# The `observability` profile's services and their pages' default host ports, on loopback
# (test_observability.py tests the profile itself).
OBSERVABILITY = {"prometheus": 9090, "grafana": 3000, "jaeger": 16686}


def validator(deploy) -> list[str]:
    """check-jsonschema with the Compose specification's schema it vendors (Apache-2.0)."""
    return [deploy.tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """`value` as Compose reads it with `env` set in the environment (none: the defaults)."""
    env = env or {}
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or m.group(2) or "", value).replace(
            "$$", "$"
        )
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def all_services(compose) -> dict[str, dict[str, Any]]:
    return interpolate(compose["services"])


@pytest.fixture(scope="module")
def services(all_services) -> dict[str, dict[str, Any]]:
    """The default profile: what a plain `docker compose up` starts (the infra profile's are
    tested on their own, in TestTheInfraProfile)."""
    return {name: s for name, s in all_services.items() if not s.get("profiles")}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {k: str(v) for k, v in env.items()}


def host_port(published: str | int | dict) -> str:
    """The host side of a `ports` entry ("" when Docker picks one)."""
    if isinstance(published, dict):
        return str(published.get("published") or "")
    parts = str(published).split(":")
    return "" if len(parts) == 1 else parts[-2]


def is_one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart") == "no"


class TestTheSpecification:
    def test_the_file_validates_against_the_compose_specification(self, deploy):
        result = deploy.run([*validator(deploy), str(deploy.root / "docker-compose.yml")])
        assert result.returncode == 0, result.stdout + result.stderr

    def test_the_validator_refuses_what_the_specification_does_not_allow(self, deploy, tmp_path):
        text = (deploy.root / "docker-compose.yml").read_text()
        broken = tmp_path / "docker-compose.yml"
        broken.write_text(text.replace("healthcheck:", "healthchek:", 1))
        result = deploy.run([*validator(deploy), str(broken)])
        assert result.returncode != 0
        assert "healthchek" in result.stdout + result.stderr

    def test_the_validator_checks_the_profiles(self, deploy, tmp_path):
        # `profiles` is a list of names: a bare string is refused, so a broken profile shows here.
        text = (deploy.root / "docker-compose.yml").read_text()
        assert text.count("profiles: [infra]") == len(INFRA)
        broken = tmp_path / "docker-compose.yml"
        broken.write_text(text.replace("profiles: [infra]", "profiles: infra", 1))
        result = deploy.run([*validator(deploy), str(broken)])
        assert result.returncode != 0
        assert "profiles" in result.stdout + result.stderr

    def test_every_variable_has_a_working_default(self, deploy):
        text = (deploy.root / "docker-compose.yml").read_text()
        variables = _VARIABLE.findall(text)
        assert variables
        assert [name for name, default in variables if not default] == []


class TestHealth:
    def test_every_long_running_service_has_a_healthcheck_and_a_restart_policy(self, services):
        for name, service in services.items():
            if is_one_shot(service):
                continue
            check = service.get("healthcheck") or {}
            assert check.get("test") and not check.get("disable"), name
            assert service.get("restart") == "unless-stopped", name

    @pytest.mark.parametrize("name", [*SERVICES, *SANDBOXES])
    def test_each_process_is_checked_on_its_own_port(self, services, name):
        service = services[name]
        path = "/health/live" if name in SANDBOXES else "/health/ready"
        test = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{PORTS[name]}{path}" in test
        port_variable = {
            "sandbox-konnect": "SANDBOX_KONNECT_PORT",
            "sandbox-google": "SANDBOX_GOOGLE_PORT",
        }.get(name, f"{name.upper()}_PORT")
        assert environment(service)[port_variable] == str(PORTS[name])

    def test_the_one_shots_are_awaited_to_completion(self, services):
        one_shots = {n for n, s in services.items() if is_one_shot(s)}
        assert one_shots == {"postgres-roles", "migrate"}
        for name in one_shots:
            assert services[name]["healthcheck"] == {"disable": True}
        awaited = {
            dependency
            for service in services.values()
            for dependency, how in (service.get("depends_on") or {}).items()
            if how.get("condition") == "service_completed_successfully"
        }
        assert awaited == one_shots


class TestPortsAndScaling:
    def test_only_the_gateway_and_the_sandbox_pages_have_a_fixed_host_port(self, all_services):
        fixed = {
            name: [host_port(p) for p in service.get("ports", []) if host_port(p)]
            for name, service in all_services.items()
        }
        # The exceptions: the infra profile's, which make run's URLs name, and the observability
        # profile's pages (on loopback only, and never started by a plain `up`;
        # TestTheInfraProfile, test_observability.py).
        infra_ports = {
            name: [str(InfraSettings.model_fields[field].default)]
            for name, (_, field, _) in INFRA.items()
        }
        observability_ports = {name: [str(port)] for name, port in OBSERVABILITY.items()}
        assert {n: p for n, p in fixed.items() if p} == {
            n: [str(port)] for n, port in PUBLISHED.items()
        } | infra_ports | observability_ports

    @pytest.mark.parametrize("name", [n for n in SERVICES if n != "gateway"])
    def test_each_service_behind_the_gateway_scales(self, services, name):
        # `docker compose up --scale payments=3`: no fixed name, no host port to collide on.
        service = services[name]
        assert "container_name" not in service
        assert "ports" not in service

    def test_no_service_has_a_fixed_container_name(self, services):
        assert [n for n, s in services.items() if "container_name" in s] == []

    def test_the_gateway_finds_each_service_by_its_name(self, services):
        env = environment(services["gateway"])
        for name in MIGRATED:
            assert env[f"{name.upper()}_URL"] == f"http://{name}:{PORTS[name]}"

    def test_the_services_reach_the_sandboxes_inside_and_browsers_from_outside(self, services):
        payments = environment(services["payments"])
        calendar = environment(services["calendar"])
        assert payments["KONNECT_API_URL"] == "http://sandbox-konnect:8010/api/v2"
        # The sandbox calls the webhook from its container: the gateway's name, not localhost.
        gateway_port = environment(services["gateway"])["GATEWAY_PORT"]
        webhook = f"http://gateway:{gateway_port}/api/payments/webhook"
        assert payments["KONNECT_WEBHOOK_URL"] == webhook
        assert calendar["GOOGLE_TOKEN_URL"] == "http://sandbox-google:8011/token"
        assert calendar["GOOGLE_CALENDAR_API_URL"] == "http://sandbox-google:8011/calendar/v3"
        # What a browser opens is published on the host.
        assert calendar["GOOGLE_AUTH_URL"] == "http://localhost:8011/o/oauth2/v2/auth"
        sandbox = environment(services["sandbox-konnect"])
        assert sandbox["SANDBOX_KONNECT_PUBLIC_URL"] == "http://localhost:8010"
        assert environment(services["gateway"])["PUBLIC_BASE_URL"] == "http://localhost:8000"
        # The sandboxes accept what the services send by default.
        assert sandbox["SANDBOX_KONNECT_API_KEY"] == payments["KONNECT_API_KEY"]
        google = environment(services["sandbox-google"])
        assert google["SANDBOX_GOOGLE_CLIENT_SECRET"] == calendar["GOOGLE_CLIENT_SECRET"]

    @pytest.mark.parametrize("name", SANDBOXES)
    def test_the_sandboxes_control_api_takes_the_development_token_unless_one_is_set(
        self, services, compose, name
    ):
        # Compose is a laptop's setup: the demo and a developer's curl drive the sandboxes as
        # they drive `make run`'s.
        env = environment(services[name])
        assert SandboxSettings(**env).control_api_token() == DEVELOPMENT_CONTROL_TOKEN
        raw = compose["services"][name]["environment"]["SANDBOX_CONTROL_TOKEN"]
        assert raw == f"${{SANDBOX_CONTROL_TOKEN:-{DEVELOPMENT_CONTROL_TOKEN}}}"

    @pytest.mark.parametrize("name", ("migrate", *SERVICES))
    def test_the_services_take_the_development_secret_unless_one_is_set(
        self, services, compose, name
    ):
        # A laptop's setup: `make token`'s tokens work against it as against `make run`'s.
        env = {k.lower(): v for k, v in environment(services[name]).items()}
        settings = RuntimeSettings(**env)
        assert settings.auth_jwt_secret.get_secret_value() == DEVELOPMENT_JWT_SECRET
        check_auth_settings(settings)
        with pytest.raises(RefusedSettings, match="AUTH_JWT_SECRET"):
            check_auth_settings(RuntimeSettings(**{**env, "development_mode": "false"}))
        assert compose["x-common-environment"]["DEVELOPMENT_MODE"] == "${DEVELOPMENT_MODE:-true}"


class TestDatabaseRoles:
    def test_the_roles_are_made_before_the_migrations_and_those_before_the_services(self, services):
        # migrate declares the queues too, before any service publishes: it needs RabbitMQ.
        assert services["migrate"]["depends_on"] == {
            "postgres-roles": {"condition": "service_completed_successfully"},
            "rabbitmq": {"condition": "service_healthy"},
        }
        broker = environment(services["orders"])["RABBITMQ_URL"]
        assert environment(services["migrate"])["RABBITMQ_URL"] == broker
        assert services["postgres-roles"]["depends_on"]["postgres"] == {
            "condition": "service_healthy"
        }
        for name in MIGRATED:
            depends = services[name]["depends_on"]
            assert depends["migrate"] == {"condition": "service_completed_successfully"}
            assert depends["rabbitmq"] == {"condition": "service_healthy"}

    @pytest.mark.parametrize("name", MIGRATED)
    def test_each_service_serves_and_migrates_as_its_own_role(self, services, name):
        url = urlsplit(environment(services[name])["DATABASE_URL"])
        assert (url.username, url.hostname, url.port) == (f"booking_{name}", "postgres", 5432)
        # The migration step runs this service's migration with this same URL.
        migrate = services["migrate"]
        variable = f"{name.upper()}_DATABASE_URL"
        assert environment(migrate)[variable] == url.geturl()
        script = migrate["command"][-1]
        assert f'DATABASE_URL="${variable}" python -m booking.{name} migrate' in script
        # And the role's password is the one postgres-roles gives it.
        given = {
            arg.split("=", 1)[1].split("=", 1)[0]: arg.split("=", 2)[2]
            for arg in services["postgres-roles"]["command"]
            if arg.startswith("--set=") and arg.count("=") >= 2
        }
        assert given[f"{name}_password"] == url.password

    def test_the_roles_script_is_the_repository_s(self, services, deploy):
        roles = services["postgres-roles"]
        assert "./deploy/postgres:/deploy/postgres:ro" in roles["volumes"]
        assert "--file=/deploy/postgres/roles.sql" in roles["command"]
        assert (deploy.root / "deploy" / "postgres" / "roles.sql").exists()

    def test_every_service_runs_the_one_image_with_its_command(self, services, compose):
        for name in SERVICES:
            assert services[name]["command"] == ["python", "-m", f"booking.{name}", "serve"]
        for name in SANDBOXES:
            provider = name.removeprefix("sandbox-")
            assert services[name]["command"] == [
                "python", "-m", "booking.sandbox", provider, "serve",
            ]  # fmt: skip
        for name in (*SERVICES, *SANDBOXES, "migrate"):
            assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
            assert services[name]["image"] == "booking:local"
        assert shlex.split(services["migrate"]["command"][-1]).count("migrate") == len(MIGRATED)


def test_the_infrastructure_is_the_one_the_tests_use(services, all_services):
    assert services["postgres"]["image"].startswith("postgres:15")
    assert services["rabbitmq"]["image"] == "rabbitmq:3.13-management"
    assert yaml.safe_dump(services["rabbitmq"]["ports"]) == "- 127.0.0.1::15672\n"
    # make run's, from the infra profile, are the same servers.
    assert all_services["infra-postgres"]["image"] == services["postgres"]["image"]
    assert all_services["infra-rabbitmq"]["image"] == services["rabbitmq"]["image"]


class TestTheInfraProfile:
    """The Postgres and RabbitMQ booking.devtools.infra starts with
    `docker compose --profile infra up --detach --wait <services>` when Docker is its only way."""

    def test_a_plain_up_starts_the_system_and_only_the_profile_starts_these(self, compose):
        profiles = {name: s.get("profiles") for name, s in compose["services"].items()}
        assert {name for name, p in profiles.items() if not p} == DEFAULT_PROFILE
        assert {name: p for name, p in profiles.items() if p} == {n: ["infra"] for n in INFRA} | {
            n: ["observability"] for n in OBSERVABILITY
        }
        # And the profile is the one infra.py activates, in this file.
        argv = infra.compose_argv("up")
        assert argv[argv.index("--profile") + 1] == "infra"
        assert infra.COMPOSE_FILE == infra.PROJECT_ROOT / "docker-compose.yml"
        assert argv[argv.index("-f") + 1] == str(infra.COMPOSE_FILE)
        # A project apart from the system's: `clean`'s `down --volumes` ignores profiles, and in
        # the system's project it would remove a `docker compose up` system's data too.
        assert argv[argv.index("-p") + 1] not in ("booking", compose["name"])

    def test_nothing_outside_the_profile_reaches_them(self, compose, services):
        for name, service in services.items():
            assert not set(service.get("depends_on") or {}) & set(INFRA), name
            assert "infra-" not in yaml.safe_dump(compose["services"][name]), name

    @pytest.mark.parametrize("name", INFRA)
    def test_each_publishes_one_loopback_port_from_infra_settings(
        self, compose, all_services, name
    ):
        variable, field, container_port = INFRA[name]
        default = InfraSettings.model_fields[field].default
        raw = compose["services"][name]["ports"]
        assert raw == [f"127.0.0.1:${{{variable}:-{default}}}:{container_port}"]
        assert all_services[name]["ports"] == [f"127.0.0.1:{default}:{container_port}"]
        # infra.py sets that variable to the port it then puts in its URLs.
        settings = InfraSettings(**{field: 61234})
        env = infra.compose_environment(settings)
        assert env[variable] == "61234"
        published = interpolate(raw, {variable: env[variable]})
        assert published == [f"127.0.0.1:61234:{container_port}"]

    @pytest.mark.parametrize(
        "missing", [{"DATABASE_URL"}, {"RABBITMQ_URL"}, {"DATABASE_URL", "RABBITMQ_URL"}]
    )
    async def test_the_urls_make_run_builds_reach_and_log_in_to_these(
        self, compose, monkeypatch, missing
    ):
        # _start_compose with run_command stubbed: the docker compose command it would run, and
        # the URLs it then hands the services. No Docker is needed.
        commands: list[tuple[list[str], dict[str, str]]] = []

        async def run_command(argv, *, env=None, cwd=None):
            commands.append((argv, dict(env or {})))
            return 0, ""

        monkeypatch.setattr(infra, "run_command", run_command)
        settings = InfraSettings(infra_postgres_port=61001, infra_rabbitmq_port=61002)
        provided = infra.Provided()
        await infra._start_compose(settings, set(missing), provided, lambda _: None)

        [(argv, env)] = commands
        assert sorted(provided.compose_services) == sorted(INFRA_FOR[m] for m in missing)
        assert argv == infra.compose_argv("up", "--detach", "--wait", *provided.compose_services)
        assert set(provided.urls) == missing
        # What Compose would publish with that environment.
        services = interpolate(compose["services"], env)
        for name, url in provided.urls.items():
            service = services[INFRA_FOR[name]]
            [ports] = service["ports"]
            host_ip, host, container = ports.split(":")
            parts = urlsplit(url)
            assert (parts.hostname, str(parts.port)) == (host_ip, host)
            service_env = environment(service)
            if name == "DATABASE_URL":
                assert container == "5432"
                assert parts.scheme == "postgresql"
                # No password in the URL: the server trusts every connection.
                assert service_env["POSTGRES_HOST_AUTH_METHOD"] == "trust"
                assert (parts.username, parts.password) == (service_env["POSTGRES_USER"], None)
                # The image's database is named after its user unless POSTGRES_DB says otherwise.
                database = service_env.get("POSTGRES_DB", service_env["POSTGRES_USER"])
                assert parts.path == f"/{database}"
            else:
                assert container == "5672"
                assert parts.scheme == "amqp"
                assert (parts.username, parts.password) == (
                    service_env["RABBITMQ_DEFAULT_USER"],
                    service_env["RABBITMQ_DEFAULT_PASS"],
                )
                assert parts.username != "guest"  # guest is refused from outside the container
                assert parts.path == "/"

    def test_the_credentials_are_the_ones_infra_py_writes(self, all_services):
        # The same pairing read from the source, so a change to either side shows in review.
        source = (infra.PROJECT_ROOT / "libs/devtools/src/booking/devtools/infra.py").read_text()
        postgres = environment(all_services["infra-postgres"])
        rabbitmq = environment(all_services["infra-rabbitmq"])
        assert f'"postgresql://{postgres["POSTGRES_USER"]}@127.0.0.1:' in source
        user, password = rabbitmq["RABBITMQ_DEFAULT_USER"], rabbitmq["RABBITMQ_DEFAULT_PASS"]
        assert (user, password) == ("booking", "booking")
        assert f'"amqp://{user}:{password}@127.0.0.1:' in source

    @pytest.mark.parametrize(
        ("name", "data"),
        [("infra-postgres", "/var/lib/postgresql/data"), ("infra-rabbitmq", "/var/lib/rabbitmq")],
    )
    def test_each_is_health_checked_and_keeps_its_data_in_a_volume_of_its_own(
        self, compose, all_services, name, data
    ):
        service = all_services[name]
        # `up --wait` waits for healthy: without a healthcheck it would return at once.
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable")
        [volume] = service["volumes"]
        volume_name, path = volume.split(":")
        assert path == data
        assert volume_name in compose["volumes"]
        others = [
            v.split(":")[0]
            for other, s in all_services.items()
            if other != name
            for v in s.get("volumes") or []
        ]
        assert volume_name not in others
        # A run starts them; nothing else should bring them back onto make run's ports.
        assert service["restart"] == "no"

    def test_each_is_the_system_s_server_configured_alike(self, all_services):
        postgres, rabbitmq = all_services["infra-postgres"], all_services["infra-rabbitmq"]
        assert postgres["command"] == all_services["postgres"]["command"]
        assert postgres["healthcheck"] == all_services["postgres"]["healthcheck"]
        assert rabbitmq["healthcheck"] == all_services["rabbitmq"]["healthcheck"]
        # RabbitMQ keeps its data under the node name, made of the hostname: a fixed one finds
        # the volume's data again when the container is recreated.
        assert rabbitmq["hostname"] == "infra-rabbitmq"
