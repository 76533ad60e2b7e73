"""`make test`: throwaway PostgreSQL and Redis (unless configured), then every test."""

from __future__ import annotations

import os
import subprocess
import sys

from infra.stack import services


def main() -> int:
    with services(fast=True) as (database_url, redis_url):
        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
        return subprocess.run([sys.executable, "-m", "pytest", *sys.argv[1:]], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
