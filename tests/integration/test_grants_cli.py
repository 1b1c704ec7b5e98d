"""`secret-broker grants check` as a user runs it: the SPEC example, and broken variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.unit.test_grants_loader import SPEC_EXAMPLE


def test_spec_example_prints_back(cli: Cli, tmp_path: Path) -> None:
    """The SPEC §5 example validates and is printed back as its effective grant."""
    path = tmp_path / "g.toml"
    path.write_text(SPEC_EXAMPLE)
    out = cli.ok("grants", "check", str(path))
    assert "valid, 1 grant(s)" in out
    for part in ("@openai_api_key", "ugent-core", "llm.chat,llm.embeddings",
                 "native,http_header_inject", "api.openai.com", "300"):
        assert part in out
    doc = json.loads(cli.ok("grants", "check", str(path), "--json"))
    assert doc["grants"] == [{
        "index": 0, "line": 1, "secret_ref": "openai_api_key", "consumer": "ugent-core",
        "purposes": ["llm.chat", "llm.embeddings"], "delivery": ["native", "http_header_inject"],
        "allowed_hosts": ["api.openai.com"], "ttl_secs": 300}]
    assert doc["warnings"] == []


def test_purpose_no_route_uses_is_valid_but_warned(cli: Cli, tmp_path: Path) -> None:
    """A purpose typo is legal (custom purposes are) but named, with the likely fix."""
    path = tmp_path / "g.toml"
    path.write_text(SPEC_EXAMPLE.replace('"llm.embeddings"', '"embeddings", "ci.deploy"'))
    proc = cli("grants", "check", str(path))
    assert proc.returncode == 0 and "valid, 1 grant(s)" in proc.stdout
    assert 'grant 0 (line 1) allows purpose "embeddings", which no gateway route uses' \
        in proc.stderr
    assert 'replace "embeddings" with "llm.embeddings"' in proc.stderr
    assert 'leases that ask for purpose "ci.deploy" by name' in proc.stderr
    assert '"llm.chat"' not in proc.stderr
    doc = json.loads(cli.ok("grants", "check", str(path), "--json"))
    assert [w["message"].split(",")[0] for w in doc["warnings"]] == [
        f'grant 0 (line 1) allows purpose "{p}"' for p in ("embeddings", "ci.deploy")]


@pytest.mark.parametrize("old, new, key", [
    ("purposes =", "purpose =", "purpose"),
    ("ttl_secs = 300", "ttl_secs = 0", "ttl_secs"),
    ("ttl_secs = 300", "ttl_secs = 86401", "ttl_secs"),
    ('["native", "http_header_inject"]', '["fax"]', "delivery"),
    ('["api.openai.com"]', "[]", "allowed_hosts"),
    ('["api.openai.com"]', '["https://api.openai.com/v1"]', "allowed_hosts"),
    ('consumer = "ugent-core"', "consumer = 7", "consumer"),
    ('secret_ref = "openai_api_key"', 'secret_ref = "bad ref"', "secret_ref"),
    ("ttl_secs = 300", 'ttl_secs = 300\nextra = "x"', "extra"),
])
def test_broken_variants_name_the_key_and_line(cli: Cli, tmp_path: Path, old: str, new: str,
                                               key: str) -> None:
    """Each broken variant exits 1 and names the key at fault, with its line."""
    path = tmp_path / "g.toml"
    path.write_text(SPEC_EXAMPLE.replace(old, new))
    proc = cli("grants", "check", str(path))
    assert proc.returncode == 1
    assert f"'{key}'" in proc.stderr and "line" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_error_reported_at_once(cli: Cli, tmp_path: Path) -> None:
    """Two broken grants give both errors in one run."""
    path = tmp_path / "g.toml"
    path.write_text(SPEC_EXAMPLE.replace("ttl_secs = 300", "ttl_secs = -1") + "\n"
                    + SPEC_EXAMPLE.replace("purposes =", "purpose ="))
    proc = cli("grants", "check", str(path))
    assert proc.returncode == 1
    assert "'ttl_secs'" in proc.stderr and "'purpose'" in proc.stderr


def test_default_file_from_init_is_valid_and_empty(cli: Cli) -> None:
    """The example file `init` writes is valid and grants nothing."""
    out = cli.ok("grants", "check")
    assert "valid, 0 grant(s)" in out
