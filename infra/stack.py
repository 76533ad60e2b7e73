"""Throwaway PostgreSQL and Redis on loopback, for `make run` and `make test`.

When DATABASE_URL / REDIS_URL are set, those are used and nothing is started.
PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres`
user, in a fresh temporary directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import redis

# What a server started: ("postgres", its directory), ("group", its process group), ("remove", a directory of its).
Noted = Callable[[str, str], None]


class StackError(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"[stack] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_binary(name: str) -> str:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    found = candidates[0] if candidates else shutil.which(name)
    if not found:
        raise StackError(
            f"PostgreSQL's {name} was not found. Install the PostgreSQL server "
            "(Debian: apt-get install postgresql) or set DATABASE_URL to a running server."
        )
    return found


def _as_postgres_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *command]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(command)]


class PostgresServer:
    """A throwaway cluster on a free loopback port that can be stopped and started again."""

    def __init__(self, fast: bool = False, noted: Noted = lambda kind, value: None) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
        noted("postgres", str(self.workdir))  # before initdb fills it: killed during it, nothing is left
        self.data = self.workdir / "data"
        self.port = free_port()
        self.fast = fast
        try:
            if os.geteuid() == 0:
                shutil.chown(self.workdir, "postgres", "postgres")
            self.workdir.chmod(0o700)
            self._run([_pg_binary("initdb"), "-D", str(self.data), "-U", "ledger", "--auth=trust", "-E", "UTF8", "--no-sync"])
        except BaseException:  # no binaries, initdb failed, Ctrl-C: nothing left behind
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    @property
    def url(self) -> str:
        return f"postgresql://ledger@127.0.0.1:{self.port}/ledger"

    def _run(self, command: list[str], check: bool = True) -> None:
        # In a process group of its own: a second Ctrl-C at the terminal stopped a `pg_ctl stop` half way.
        subprocess.run(_as_postgres_user(command), check=check, stdout=subprocess.DEVNULL, cwd=self.workdir, process_group=0)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.workdir} -c max_connections=300"
        if self.fast:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        log = str(self.workdir / "server.log")
        self._run([_pg_binary("pg_ctl"), "-D", str(self.data), "-l", log, "-o", options, "-w", "start"])

    def stop(self, mode: str = "fast") -> None:
        stop_cluster(self.workdir, mode)

    def create_database(self) -> None:
        with psycopg.connect(f"postgresql://ledger@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'ledger'").fetchone():
                conn.execute("CREATE DATABASE ledger")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def stop_cluster(workdir: Path, mode: str = "fast", *, quiet: bool = False) -> None:
    """Stop the cluster of a `PostgresServer`'s directory (nothing if it is not running; `quiet`:
    without pg_ctl's complaint about that)."""
    command = [_pg_binary("pg_ctl"), "-D", str(workdir / "data"), "-m", mode, "-w", "stop"]
    stderr = subprocess.DEVNULL if quiet else None
    # In a process group of its own: a second Ctrl-C at the terminal stopped a `pg_ctl stop` half way.
    subprocess.run(
        _as_postgres_user(command), check=False, stdout=subprocess.DEVNULL, stderr=stderr, cwd=workdir, process_group=0
    )


@contextlib.contextmanager
def postgres(fast: bool = False, noted: Noted = lambda kind, value: None) -> Iterator[str]:
    """A new cluster on a free loopback port; yields its URL for database `ledger`."""
    server = PostgresServer(fast, noted)
    say(f"starting a throwaway PostgreSQL on 127.0.0.1:{server.port} ({server.workdir})")
    try:
        server.start()
        server.create_database()
        yield server.url
    finally:
        server.remove()


def _redis_binary() -> str | None:
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


def ensure_redis_server() -> str:
    found = _redis_binary()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise StackError(
            "redis-server is not installed. Install it (Debian: sudo apt-get install redis-server) "
            "or set REDIS_URL to a running Redis."
        )
    say("redis-server is missing: installing it with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "redis-server"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"could not install redis-server ({' '.join(command)}):\n{result.stderr[-2000:]}")
    found = _redis_binary()
    if not found:
        raise StackError("apt-get installed redis-server but no redis-server binary is on PATH")
    return found


class RedisServer:
    """A throwaway Redis on a free loopback port, without persistence; restartable."""

    def __init__(self) -> None:
        self.binary = ensure_redis_server()
        self.workdir = Path(tempfile.mkdtemp(prefix="ledger-redis-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, noted: Noted = lambda kind, value: None) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            process_group=0,  # stopped by whoever started it, not by the terminal's Ctrl-C
        )
        noted("group", str(self.process.pid))  # before it answers: killed meanwhile, it is stopped all the same
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise StackError("Redis did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def redis_server(noted: Noted = lambda kind, value: None) -> Iterator[str]:
    server = RedisServer()
    noted("remove", str(server.workdir))
    say(f"starting a throwaway Redis on 127.0.0.1:{server.port}")
    try:
        server.start(noted)
        yield server.url
    finally:
        server.remove()


@contextlib.contextmanager
def services(fast: bool = False, noted: Noted = lambda kind, value: None) -> Iterator[tuple[str, str]]:
    """DATABASE_URL and REDIS_URL: the configured ones, or throwaway servers started here.
    `noted` is told of each server as it starts (`ledger run`'s watchdog, infra.watchdog)."""
    with contextlib.ExitStack() as stack:
        database_url = os.environ.get("DATABASE_URL") or stack.enter_context(postgres(fast, noted))
        redis_url = os.environ.get("REDIS_URL") or stack.enter_context(redis_server(noted))
        yield database_url, redis_url
