"""The container deployment, verified without a Docker engine (none runs on our machines).

The compose file is validated by docker-compose itself and its service graph checked; the
container entrypoint is run outside a container against the test's PostgreSQL and Redis,
so the commands the containers run are the ones exercised here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from infra.config import REPO_ROOT
from infra.stack import free_port
from tests.integration.conftest import Stack, registered_without_trigger, wait_healthy

APP_SERVICES = ("init", "api", "worker", "beat")
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("docker-compose is needed to validate the compose file: apt-get install docker-compose")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-compose"], env=env, check=True, capture_output=True
    )
    found = shutil.which("docker-compose")
    assert found, "apt-get installed docker-compose but it is not on PATH"
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_the_compose_file_is_valid_for_docker_compose() -> None:
    result = subprocess.run(
        [docker_compose(), "-f", "docker-compose.yml", "config", "-q"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "POSTGRES_PASSWORD": "from-env"},
    )
    assert result.returncode == 0, result.stderr
    resolved = subprocess.run(
        [docker_compose(), "-f", "docker-compose.yml", "config"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "POSTGRES_PASSWORD": "from-env", "API_PORT": "9123"},
    ).stdout
    assert "postgresql://ledger:from-env@db:5432/ledger" in resolved  # credentials come from the environment / .env
    assert "published: 9123" in resolved


def test_every_service_waits_for_what_it_needs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"db", "redis", *APP_SERVICES}
    assert services["db"]["healthcheck"]["test"] and services["redis"]["healthcheck"]["test"]
    assert services["api"]["healthcheck"]["test"]
    assert any("pgdata:" in volume for volume in services["db"]["volumes"])
    for name in APP_SERVICES:
        depends = services[name]["depends_on"]
        assert depends["db"] == {"condition": "service_healthy"}, name
        assert depends["redis"] == {"condition": "service_healthy"}, name
    for name in ("api", "worker", "beat"):
        assert services[name]["depends_on"]["init"] == {"condition": "service_completed_successfully"}, name
    assert services["init"]["restart"] == "no"
    # `--scale worker=3` needs a worker with no fixed name or published port.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]


def test_init_reads_the_bundled_files_wherever_the_other_services_import_from() -> None:
    """The README said to mount a folder of other files over /app/data, and `init`, which imports
    the two reference files from IMPORT_DIR on every start, then failed, and nothing that waits
    for it started. `init` now reads /app/data, where the image puts them, whatever IMPORT_DIR
    the app services are given (for POST /imports)."""
    resolved = subprocess.run(
        [docker_compose(), "-f", "docker-compose.yml", "config"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout
    services = yaml.safe_load(resolved)["services"]
    assert services["init"]["environment"]["IMPORT_DIR"] == "/app/data"
    assert "COPY data /app/data" in (REPO_ROOT / "Dockerfile").read_text()
    assert all("IMPORT_DIR" not in services[name]["environment"] for name in ("api", "worker", "beat"))  # the image's


def test_every_app_container_runs_an_init_process_that_passes_sigterm_on(compose: dict[str, Any]) -> None:
    """`ledger init` alone as PID 1 ignored `docker compose stop`'s SIGTERM (a process that is PID 1
    gets no default handler) and was killed after the grace period (a review)."""
    for name in APP_SERVICES:
        assert compose["services"][name]["init"] is True, name


def test_the_database_is_healthy_only_once_it_answers_over_tcp_with_room_for_the_services(compose: dict[str, Any]) -> None:
    db = compose["services"]["db"]
    # The image's first, initialising server listens on its Unix socket alone.
    assert "pg_isready -h 127.0.0.1 " in db["healthcheck"]["test"][1]
    # Four API processes hold up to about 40 connections each; PostgreSQL's default is 100.
    setting = db["command"][db["command"].index("-c") + 1]
    assert setting.startswith("max_connections=") and int(setting.split("=")[1]) >= 300


def test_the_entrypoint_runs_every_ledger_command(stack: Stack) -> None:
    for command in ("setup", "import", "import-report", "rebuild", "status"):
        result = run_entrypoint(stack, command, "--help")
        assert result.returncode == 0 and f"ledger {command}" in result.stdout, (command, result.stderr)


def test_the_containers_run_the_ledger_commands_that_make_run_runs(compose: dict[str, Any]) -> None:
    commands = {name: compose["services"][name]["command"] for name in APP_SERVICES}
    assert commands == {"init": ["init"], "api": ["api"], "worker": ["worker"], "beat": ["beat"]}
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["ledger-entrypoint"]' in dockerfile and 'CMD ["api"]' in dockerfile
    cli = (REPO_ROOT / "infra" / "cli.py").read_text()
    for command in ("worker", "beat", "api"):  # what `ledger run` (make run) spawns
        assert f'[*ledger_cli, "{command}"' in cli


def test_the_image_installs_the_same_lock_as_make() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "COPY requirements.lock" in dockerfile
    assert "pip install --no-deps -r requirements.lock" in dockerfile
    assert "-r requirements-dev.lock" in makefile
    dev_lock = (REPO_ROOT / "requirements-dev.lock").read_text().splitlines()
    assert next(line for line in dev_lock if not line.startswith("#")) == "-r requirements.lock"
    lock = {
        line.split("==")[0].lower().replace("_", "-"): line.split("==")[1]
        for line in (REPO_ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line
    }
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        name, version = re.split(r"(?:\[.*\])?==", requirement)
        assert lock[name.lower()] == version, requirement


@pytest.mark.parametrize("python", ["3.11.0", "3.11.2", "3.11.7", "3.11.14"])
def test_the_lock_holds_every_runtime_dependency_on_any_python_3_11(python: str) -> None:
    """Debian 12's Python is 3.11.2, on which redis needs async-timeout: a lock made on 3.11.7
    missed it, and `make` installed it unpinned (found by a walkthrough). Walks the project's
    dependencies, with their extras, through the installed packages' metadata."""
    environment = {"python_version": "3.11", "python_full_version": python, "sys_platform": "linux"}
    locked = set()
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line.split("#")[0])
            if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
                locked.add(canonicalize_name(requirement.name))
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    to_visit = [Requirement(text) for text in project["dependencies"]]
    seen: set[tuple[str, str]] = set()
    missing = []
    while to_visit:
        requirement = to_visit.pop()
        name = canonicalize_name(requirement.name)
        if name not in locked:
            missing.append(str(requirement))
            continue
        for extra in {"", *requirement.extras}:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            try:
                requires = metadata.requires(name) or []
            except metadata.PackageNotFoundError:  # locked for another Python than this one: not installed here
                continue
            for needed in (Requirement(text) for text in requires):
                if needed.marker is None or needed.marker.evaluate({**environment, "extra": extra}):
                    to_visit.append(needed)
    assert missing == []
    assert len(seen) > 30  # the walk went through celery, kombu, starlette, eventsourcing...


def test_the_image_is_multi_stage_non_root_and_healthchecked() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) == 2
    final_stage = dockerfile.split("\nFROM ")[-1]
    assert "COPY --from=build /opt/venv /opt/venv" in final_stage
    assert re.search(r"^USER ledger$", final_stage, re.M)
    assert "HEALTHCHECK" in final_stage
    assert "gcc" not in final_stage and "build-essential" not in final_stage
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "**/__pycache__", ".env"} <= set(ignored)


def test_compose_passes_every_setting_the_ledger_reads_from_dot_env(compose: dict[str, Any]) -> None:
    # Every variable infra.config reads (but IMPORT_DIR, a path inside the image, and the one
    # `ledger api` sets for its own processes), and the command line's.
    source = (REPO_ROOT / "infra" / "config.py").read_text() + (REPO_ROOT / "infra" / "cli.py").read_text()
    read = set(re.findall(r'(?:_setting|_whole|_seconds)\(env, "([A-Z_]+)"', source))
    read |= set(re.findall(r'os\.environ\.get\("((?:API|WORKER)_[A-Z_]+)"\)', source)) | {"LEDGER_TODAY"}
    assert {"READY_MAX_LAG", "QUERY_CACHE_SIZE", "API_WORKERS", "DATABASE_URL"} <= read  # the patterns still find them
    passed = set(compose["x-app"]["environment"]) | {"IMPORT_DIR", "API_HOST", "API_PORT"}  # the port is mapped, not passed
    assert read <= passed, f"not passed to the containers: {sorted(read - passed)}"


def test_the_example_environment_holds_no_secret() -> None:
    example = (REPO_ROOT / ".env.example").read_text()
    assert "POSTGRES_PASSWORD=change-me" in example
    assert ".env" in (REPO_ROOT / ".gitignore").read_text().split()


# The entrypoint, outside a container, against the real services


def entrypoint_env(stack: Stack, **extra: str) -> dict[str, str]:
    return {
        **stack.env,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "IMPORT_DIR": str(stack.settings.import_dir),
        **extra,
    }


def run_entrypoint(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=entrypoint_env(stack), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def containers(stack: Stack) -> Iterator[dict[str, Any]]:
    """init (twice), then worker, beat and api started through the entrypoint as the containers would."""
    stack.stop_worker()  # the containers' own worker replaces the fixture's
    first = run_entrypoint(stack, "init")
    second = run_entrypoint(stack, "init")
    port = free_port()
    logs = stack.workdir / "containers"
    logs.mkdir()
    processes: dict[str, subprocess.Popen[bytes]] = {}
    env = entrypoint_env(stack, API_PORT=str(port), API_WORKERS="2", API_HOST="127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        for name in ("worker", "beat", "api"):  # inside: a run stopped meanwhile still stops them
            with (logs / f"{name}.log").open("wb") as log:
                processes[name] = subprocess.Popen(["sh", str(ENTRYPOINT), name], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(base, (logs / "api.log").read_text)
        yield {"init": (first, second), "base": base, "logs": logs, "processes": processes}
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        stack.start_worker()


def test_init_imports_the_reference_data_once_and_is_idempotent(stack: Stack, containers: dict[str, Any]) -> None:
    first, second = containers["init"]
    assert first.returncode == 0, first.stderr
    assert "300 customers and 782 loans added" in first.stderr
    assert second.returncode == 0, second.stderr
    assert "0 customers and 0 loans added, 300 and 782 already present" in second.stderr
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM readmodel.customers").fetchone() == (300,)
        assert conn.execute("SELECT count(*) FROM readmodel.loans").fetchone() == (782,)


def test_the_api_and_worker_entrypoints_serve_commands_with_read_your_writes(containers: dict[str, Any]) -> None:
    base = containers["base"]
    assert httpx.get(f"{base}/view-loan/5930").json()["customer"]["id"] == 14
    registered = httpx.post(
        f"{base}/register",
        json={"first_name": "Dee", "last_name": "Ker", "age": 44, "monthly_income": 80_000, "phone_number": 9555000001},
    )
    assert registered.status_code == 201
    assert registered.headers["X-Read-Model"] == "current"  # the entrypoint's worker projected it
    loans = httpx.get(f"{base}/view-loans/{registered.json()['customer_id']}")
    assert loans.json() == []


def test_the_beat_entrypoint_schedules_the_catch_up(stack: Stack, containers: dict[str, Any]) -> None:
    # Recorded with no trigger: only beat's periodic catch-up, run by the entrypoint's worker, projects it.
    customer_id = registered_without_trigger(stack, "9555000002")
    found = stack.wait_for(f"SELECT count(*) FROM readmodel.customers WHERE customer_id = {customer_id}", 1, timeout=20)
    logs = {name: (containers["logs"] / f"{name}.log").read_text()[-2000:] for name in ("beat", "worker")}
    assert found == 1, logs
    assert containers["processes"]["beat"].poll() is None, logs["beat"]
