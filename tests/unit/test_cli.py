"""What `ledger run` tells a user about the servers it started."""

from __future__ import annotations

from infra.cli import throwaway_hint


def test_the_hint_gives_the_exports_for_the_throwaway_servers_started() -> None:
    hint = throwaway_hint(
        {"DATABASE_URL": "postgresql://ledger@127.0.0.1:53145/ledger", "REDIS_URL": "redis://127.0.0.1:49945/0"}
    )
    assert hint.endswith("export DATABASE_URL=postgresql://ledger@127.0.0.1:53145/ledger REDIS_URL=redis://127.0.0.1:49945/0")


def test_the_hint_names_only_what_was_started() -> None:
    hint = throwaway_hint({"REDIS_URL": "redis://127.0.0.1:49945/0"})
    assert hint.endswith("export REDIS_URL=redis://127.0.0.1:49945/0")
    assert "DATABASE_URL" not in hint


def test_no_hint_when_every_server_was_configured() -> None:
    assert throwaway_hint({}) == ""
