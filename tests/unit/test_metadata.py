"""broker.store.metadata on a temp SQLite file: secrets, tokens, usage, the audit checkpoint."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from broker.core.errors import SecretExists, SecretNotFound
from broker.gateway.usage import UsageRow
from broker.store.metadata import Metadata, SecretMeta, TokenMeta, read_instance_id

META = SecretMeta("openai_api_key", "openai", "api_key", "file-vault", "hmac:1", 1,
                  "2026-01-01T00:00:00Z", None, None)
TOKEN = TokenMeta("t1", "sha256:aa", "agent", None, "2026-01-01T00:00:00Z", None, None, None,
                  None)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Metadata]:
    """A fresh metadata.db in a temp dir."""
    m = Metadata(tmp_path / "metadata.db")
    yield m
    m.close()


def test_created_private_with_generation_zero(tmp_path: Path, db: Metadata) -> None:
    """A new database file is 0600 and starts at generation 0."""
    assert stat.S_IMODE((tmp_path / "metadata.db").stat().st_mode) == 0o600
    assert db.generation() == 0


def test_insert_find_get_all_delete(db: Metadata) -> None:
    """A secret's record round-trips; a missing one is None from find, SecretNotFound from get."""
    db.insert(META)
    assert db.find("openai_api_key") == META and db.get("openai_api_key") == META
    assert db.all() == [META]
    db.delete("openai_api_key")
    assert db.find("openai_api_key") is None and db.all() == []
    with pytest.raises(SecretNotFound, match="secret-broker list"):
        db.get("openai_api_key")


def test_duplicates_and_case_twins_are_refused(db: Metadata) -> None:
    """The same ref is SecretExists on insert; require_absent also refuses a case twin."""
    db.insert(META)
    with pytest.raises(SecretExists, match="rotate"):
        db.insert(META)
    with pytest.raises(SecretExists, match="only in case"):
        db.require_absent("OpenAI_API_key")
    assert db.case_twin("OPENAI_API_KEY") == "openai_api_key"
    db.require_absent("anthropic_api_key")
    db.insert(replace(META, version=2), replace=True)
    assert db.get("openai_api_key").version == 2


def test_generation_moves_on_changes_not_on_touches(db: Metadata) -> None:
    """Adding, rotating, removing secrets and tokens bump the generation; touches do not."""
    db.insert(META)
    assert db.generation() == 1
    db.touch("openai_api_key", "2026-01-02T00:00:00Z")
    db.set_meta("audit_seq", "5")
    assert db.generation() == 1
    db.set_value_info("openai_api_key", "hmac:2", 2, "2026-01-03T00:00:00Z")
    assert db.generation() == 2
    assert db.get("openai_api_key").rotated_at == "2026-01-03T00:00:00Z"
    db.insert_token(TOKEN)
    db.touch_token("t1", "2026-01-04T00:00:00Z")
    assert db.generation() == 3
    db.delete("openai_api_key")
    assert db.generation() == 4


def test_revoke_tokens_returns_only_those_active(db: Metadata) -> None:
    """Revoking by id or by consumer returns what was active, and only once."""
    db.insert_token(TOKEN)
    db.insert_token(replace(TOKEN, id="t2", hash="sha256:bb"))
    db.insert_token(replace(TOKEN, id="t3", hash="sha256:cc", consumer="other"))
    assert [t.id for t in db.revoke_tokens("now", token_id="t1")] == ["t1"]
    assert [t.id for t in db.revoke_tokens("later", consumer="agent")] == ["t2"]
    assert db.revoke_tokens("again", consumer="agent") == []
    revoked = {t.id: t.revoked_at for t in db.tokens()}
    assert revoked == {"t1": "now", "t2": "later", "t3": None}
    assert "hash" not in TOKEN.as_json()


def test_usage_adds_up_and_unknown_counts_stay_unknown(db: Metadata) -> None:
    """Flushed rows add to the day's row; a NULL count added to NULL stays NULL."""
    row = UsageRow("agent", "openai", "gpt", "v1/chat/completions", "2026-01-01", 1, 0, 5, None)
    db.add_usage([row], {("t1", "2026-01-01"): 10})
    db.add_usage([replace(row, errors=1, input_tokens=None, output_tokens=3)],
                 {("t1", "2026-01-01"): 7})
    (total,) = db.usage()
    assert (total.requests, total.errors, total.input_tokens, total.output_tokens,
            total.cached_tokens) == (2, 1, 5, 3, None)
    assert db.usage(since_day="2026-01-02") == [] and db.usage(consumer="other") == []
    assert db.token_spend("2026-01-01") == {("t1", "2026-01-01"): 17}


def test_checkpoint_only_moves_forward_and_keeps_bad_evidence(db: Metadata) -> None:
    """The audit checkpoint starts at seq 1, only advances, and a wrong seal freezes it."""
    def seal(seq: int, mac: str) -> str:
        return f"seal-{seq}-{mac}"

    db.advance_checkpoint(2, "m2", seal)  # no checkpoint yet and not the first line: kept out
    assert db.checkpoint() is None
    db.advance_checkpoint(1, "m1", seal)
    db.advance_checkpoint(3, "m3", seal)
    db.advance_checkpoint(2, "m2", seal)
    assert db.checkpoint() == (3, "m3", "seal-3-m3")
    db.set_meta("audit_seal", "forged")
    db.advance_checkpoint(4, "m4", seal)
    assert db.checkpoint() == (3, "m3", "forged")
    db.replace_checkpoint((4, "m4", "seal-4-m4"))
    assert db.checkpoint() == (4, "m4", "seal-4-m4")
    db.replace_checkpoint(None)
    assert db.checkpoint() is None


def test_read_instance_id_is_read_only_and_tolerant(tmp_path: Path, db: Metadata) -> None:
    """Another home's instance id reads without writing; a missing file or row gives None."""
    assert read_instance_id(tmp_path / "metadata.db") is None
    db.set_meta("instance_id", "abc")
    assert read_instance_id(tmp_path / "metadata.db") == "abc"
    assert read_instance_id(tmp_path / "absent.db") is None
    assert not (tmp_path / "absent.db").exists()
