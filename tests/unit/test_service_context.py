"""The service layer's Context: acting as another actor shares one opened home."""

from __future__ import annotations

from pathlib import Path

from broker.core.home import Home
from broker.service.context import Context
from broker.service.new_home import init_home
from broker.service.queries import Queries
from broker.service.secrets import Secrets


def test_as_actor_shares_the_session_and_names_its_actor(tmp_path: Path) -> None:
    """`as_actor` keeps the same DB and audit writer, so both actors extend one valid chain."""
    home = Home(tmp_path / "home")
    init_home(home, "file-vault", {})
    broker = Context.open(home, {}, actor="broker")
    admin = broker.as_actor("admin")
    try:
        assert admin.session is broker.session and admin.metadata is broker.metadata
        Secrets(admin).add("shared_key", "openai", "api_key", "sk-context-test")
        broker.record("broker.started")
        assert admin.audit_log is broker.audit_log
        events = Queries(broker).audit_events(limit=2)
        assert [(e["event"], e["actor"]) for e in events] == [
            ("secret.added", "admin"), ("broker.started", "broker")]
        assert Queries(admin).verify_audit().ok
    finally:
        broker.audit_log.close()
        broker.metadata.close()
