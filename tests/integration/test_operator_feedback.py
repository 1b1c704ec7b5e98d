"""What the owner is told and what a running daemon takes in: denials that say what to grant
and where, config.toml reloaded on SIGHUP, and status (text and JSON) saying when the file
changed."""

from __future__ import annotations

import json
import signal
from typing import Any

from tests.conftest import wait_for, write_grants
from tests.support.gateway import JINA_BODY, Broker, configure, real_key
from tests.support.sdk_clients import jina_post
from tests.support.standins import StandIn


def _embed(gateway: Broker) -> tuple[int, Any]:
    status, _, body = jina_post(gateway.root("jina"), gateway.daemon.token, "v1/embeddings",
                                JINA_BODY)
    return status, json.loads(body)


def _config_status(gateway: Broker) -> dict[str, Any]:
    return dict(gateway.daemon.client(unix=True).status()["config"])


def test_denial_without_any_grant_names_request_file_and_explain(gateway: Broker) -> None:
    """An empty grants file: the 403 names consumer, purpose, delivery, host, the grants
    file and the `grants explain` command to run."""
    write_grants(gateway.cli.home, "")
    status, body = _embed(gateway)
    message = body["detail"]  # Jina's error shape
    assert status == 403 and body["code"] == "grant_denied"
    assert "no grant for secret 'jina_api_key'" in message
    for part in ("consumer 'default'", "purpose 'llm.embeddings'",
                 "delivery 'http_header_inject'", f"host '{gateway.standins['jina'].host}'",
                 str(gateway.cli.home / "secrets.grants.toml"),
                 "secret-broker grants explain --consumer default --secret @jina_api_key"):
        assert part in message, part


def test_sighup_reloads_a_providers_base_url(gateway: Broker) -> None:
    """After config.toml points jina elsewhere, status says the file changed; SIGHUP loads
    it and the next request goes to the new upstream."""
    assert _embed(gateway)[0] == 200
    assert _config_status(gateway)["changed_since_load"] is False
    with StandIn("jina", real_key("jina")) as moved:
        configure(gateway.cli, {**gateway.standins, "jina": moved})
        assert _config_status(gateway)["changed_since_load"] is True
        pid = gateway.daemon.proc.pid
        assert f"changed since it was loaded: `kill -HUP {pid}` reloads it" in \
            gateway.cli.ok("status")
        before = _config_status(gateway)["loaded_at"]
        gateway.daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _config_status(gateway)["changed_since_load"] is False,
                 what="the daemon to reload config.toml")
        assert _config_status(gateway)["loaded_at"] >= before
        assert "changed since" not in gateway.cli.ok("status")
        gateway.standins["jina"].clear()
        wait_for(lambda: _embed(gateway)[0] == 200, what="the moved upstream to answer")
        assert moved.requests and not gateway.standins["jina"].requests
    assert gateway.audit("config.reloaded")


def test_sighup_with_an_invalid_config_keeps_the_old_one(gateway: Broker) -> None:
    """A config.toml that fails validation on SIGHUP: the daemon keeps serving with the
    config it had, logs and audits the error, and status still says the file changed."""
    config = gateway.cli.home / "config.toml"
    config.write_text(config.read_text() + "\n[limits]\nmax_body_bytes = \"lots\"\n")
    gateway.daemon.proc.send_signal(signal.SIGHUP)
    events = wait_for(lambda: gateway.audit("config.invalid"), what="config.invalid audited")
    assert "max_body_bytes" in events[-1]["reason"]
    assert "config.invalid" in gateway.daemon.log()
    assert gateway.daemon.proc.poll() is None
    assert _config_status(gateway)["changed_since_load"] is True
    assert _embed(gateway)[0] == 200


def test_sighup_names_settings_that_need_a_restart(gateway: Broker) -> None:
    """A changed [limits] header_timeout_secs cannot apply to bound sockets: status and the
    audit say a restart is needed, and the live settings still apply."""
    config = gateway.cli.home / "config.toml"
    config.write_text(config.read_text().replace(
        '[store]\n', '[limits]\nheader_timeout_secs = 7\n\n[store]\n', 1))
    gateway.daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: _config_status(gateway)["restart_needed"] == ["header_timeout_secs"],
             what="status to name the setting that needs a restart")
    assert gateway.audit("config.reloaded")[-1]["reason"] == (
        "SIGHUP; a restart applies header_timeout_secs")
    assert "a restart applies: header_timeout_secs" in gateway.cli.ok("status")
    assert _embed(gateway)[0] == 200
