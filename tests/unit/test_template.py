"""Pure cores of SPEC §13: the template parser/renderer, env-file lines and profiles.toml."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.errors import ConfigError, NotFound, UsageError
from broker.service.envfile import env_uses, parse_env_file, parse_env_flag
from broker.service.profiles import (
    denied,
    env_denials,
    find_profile,
    grant_snippet,
    parse_profiles,
)
from broker.service.template import TemplateError, find_refs, ref_template, render
from grants import AccessRequest, Allow, decide, parse_grants
from tests.conftest import grant

SECRET_LOOKALIKE = "sk-pasted-by-mistake-0123456789"

# --- templates ------------------------------------------------------------------------------


def test_find_refs_reads_both_forms_with_or_without_spaces() -> None:
    """`${{ secrets.NAME }}` and `{{ @ref }}`, spaced or not, each name listed once in order."""
    text = ("a: ${{ secrets.OPENAI_API_KEY }}\nb: ${{secrets.jina.key}}\n"
            "c: {{ @openai_api_key }} d: {{@OPENAI_API_KEY}} e: ${{\tsecrets.x-1 \t}}\n"
            "f: ${{ secrets.OPENAI_API_KEY }}")
    assert find_refs(text) == ["OPENAI_API_KEY", "jina.key", "openai_api_key", "x-1"]


def test_text_that_is_no_reference_passes_through() -> None:
    """Other `${{ }}` expressions, `{{ name }}`, `$VAR` and lone braces are left as they are."""
    text = ("run: ${{ github.sha }} {{ secrets.X }} {{ name }} ${{ Secrets.X }} $HOME ${X} "
            "{ @x } @x {{ }}\r\n")
    assert find_refs(text) == []
    assert render(text, {}) == text


def test_render_is_one_pass_and_verbatim() -> None:
    """A value that looks like a template stays as it is; the refs inside it are not read."""
    values = {"a": "${{ secrets.b }}", "c": "{{ @a }}\n$x \\1 \\g<0>"}
    assert render("A=${{ secrets.a }}\r\nC={{ @c }}!", values) == (
        "A=${{ secrets.b }}\r\nC={{ @a }}\n$x \\1 \\g<0>!")


def test_render_needs_every_ref_resolved() -> None:
    """render() never leaves a reference behind: an unresolved name is a KeyError."""
    with pytest.raises(KeyError):
        render("{{ @a }} {{ @b }}", {"a": "1"})


def test_ref_names_are_limited_to_128_characters() -> None:
    """128 characters is a ref; 129 is a malformed reference, not text."""
    assert find_refs("{{ @" + "a" * 128 + " }}") == ["a" * 128]
    with pytest.raises(TemplateError):
        find_refs("{{ @" + "a" * 129 + " }}")


@pytest.mark.parametrize(("text", "line", "column", "opening"), [
    ("ok\n  key: ${{ secrets.bad/name }} " + SECRET_LOOKALIKE, 2, 8, "'${{ secrets.'"),
    ("x = {{ @openai api key }}", 1, 5, "'{{ @'"),
    ("{{@x}} ${{secrets.}}", 1, 8, "'${{secrets.'"),
    ("a\nb\n{{ @x\n}}", 3, 1, "'{{ @'"),
])
def test_malformed_reference_names_line_and_column_not_the_text(
        text: str, line: int, column: int, opening: str) -> None:
    """An opening that does not complete a reference is an error at its line and column."""
    with pytest.raises(TemplateError) as caught:
        find_refs(text)
    assert (caught.value.line, caught.value.column) == (line, column)
    assert str(caught.value).startswith(f"line {line}, column {column}: {opening} does not")
    assert SECRET_LOOKALIKE not in str(caught.value)


_VALUE = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
# Without "{" no text can open a reference, so it must pass through untouched.
_PLAIN = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="{"),
                 max_size=30)


@settings(deadline=None)  # pure and fast; a loaded machine must not make it flaky
@given(st.lists(st.tuples(_PLAIN, _VALUE), min_size=1, max_size=5))
def test_render_equals_joining_the_values(parts: list[tuple[str, str]]) -> None:
    """Any plain text around refs survives, and each value lands exactly where its ref was."""
    values = {f"r{i}": value for i, (_, value) in enumerate(parts)}
    text = "".join(f"{plain}{{{{ @r{i} }}}}" for i, (plain, _) in enumerate(parts))
    assert find_refs(text) == list(values)
    assert render(text, values) == "".join(plain + value for plain, value in parts)


def test_ref_template_round_trips() -> None:
    """The template standing for one ref resolves to exactly that ref."""
    assert find_refs(ref_template("a.b-c")) == ["a.b-c"]
    assert render(ref_template("a"), {"a": "v"}) == "v"


# --- env files --------------------------------------------------------------------------------


def test_env_file_with_mixed_lines() -> None:
    """@refs, ${{ }} refs, plain values, comments, blanks, export, quotes and CRLF."""
    text = ("# the plugin's environment\r\n\r\n"
            "OPENAI_API_KEY=@openai_api_key\r\n"
            "  JINA_API_KEY=${{ secrets.jina_api_key }}\n"
            "AUTH=Bearer {{ @token }}\n"
            "export LOG_LEVEL=debug\n"
            'QUOTED="@quoted_ref"\n'
            "SINGLE='a b  '\n"
            "EMPTY=\n"
            "HASH=a#b\n"
            "\t# indented comment\n")
    assert parse_env_file(text, "plugin.env") == {
        "OPENAI_API_KEY": "{{ @openai_api_key }}",
        "JINA_API_KEY": "${{ secrets.jina_api_key }}",
        "AUTH": "Bearer {{ @token }}",
        "LOG_LEVEL": "debug",
        "QUOTED": "{{ @quoted_ref }}",
        "SINGLE": "a b  ",
        "EMPTY": "",
        "HASH": "a#b",
    }


@pytest.mark.parametrize(("text", "needle"), [
    ("A=@a\n\n" + SECRET_LOOKALIKE + "\n", "plugin.env, line 3: not VAR=value"),
    ("A=@a\nexport\n", "plugin.env, line 2: not VAR=value"),
    ("1A=x\n", "plugin.env, line 1: the name before '='"),
    ("A = x\n", "plugin.env, line 1: the name before '='"),
    ("A=@" + SECRET_LOOKALIKE + "/x\n", "plugin.env, line 1: a value starting with '@'"),
    ("# c\nA=${{ secrets.bad/x }}" + SECRET_LOOKALIKE + "\n",
     "plugin.env, line 2: '${{ secrets.' does not start"),
    ("A=1\nB=2\nA=3\n", "plugin.env, line 3: A is already set on line 1"),
])
def test_env_file_errors_name_the_line_not_its_text(text: str, needle: str) -> None:
    """A malformed line is a usage error naming file and line; the line is never echoed."""
    with pytest.raises(UsageError) as caught:
        parse_env_file(text, "plugin.env")
    assert needle in caught.value.message
    assert SECRET_LOOKALIKE not in caught.value.message


def test_env_flags_and_uses() -> None:
    """`--env VAR=@ref` becomes a template; env_uses maps each ref to the variables it fills."""
    assert parse_env_flag("KEY=@openai_api_key") == ("KEY", "{{ @openai_api_key }}")
    for bad in ("KEY=openai_api_key", "1KEY=@a", "KEY"):
        with pytest.raises(UsageError, match="VAR=@ref"):
            parse_env_flag(bad)
    templates = {"A": "{{ @a }}", "B": "${{ secrets.b }}-{{ @a }}", "C": "plain"}
    assert env_uses(templates) == {"a": "A,B", "b": "B"}


# --- profiles ---------------------------------------------------------------------------------

PROFILES = """\
[profiles.context-engine]
consumer = "context-engine"
env = { SERVICE_TOKENS = "@context_engine_service_tokens", OPENAI_API_KEY = "@openai_api_key" }

[profiles.plain-refs]
consumer = "plugin"
env = { A = "a", B = "@a" }
"""


def test_profiles_parse_to_frozen_values() -> None:
    """Each [profiles.NAME] becomes a Profile; "@" is optional in TOML (SPEC §1)."""
    profiles = parse_profiles(PROFILES)
    engine = profiles["context-engine"]
    assert engine.consumer == "context-engine"
    assert engine.env == (("SERVICE_TOKENS", "context_engine_service_tokens"),
                          ("OPENAI_API_KEY", "openai_api_key"))
    assert engine.templates() == {"SERVICE_TOKENS": "{{ @context_engine_service_tokens }}",
                                  "OPENAI_API_KEY": "{{ @openai_api_key }}"}
    assert profiles["plain-refs"].refs == ("a",)
    with pytest.raises(AttributeError):
        engine.consumer = "other"  # type: ignore[misc]  # frozen: the check is the point
    assert parse_profiles("") == {}


@pytest.mark.parametrize(("text", "needle"), [
    ('[profiles.p]\nconsumer = "c"\nenvs = { A = "@a" }\n', "profiles.p.envs: unknown key"),
    ('[profiles.p]\nconsumer = "c"\nenv = { A = "@a" }\nttl = 3\n', "profiles.p.ttl: unknown key"),
    ('[profile.p]\nconsumer = "c"\n', "unknown top-level key 'profile'"),
    ('[profiles.p]\nenv = { A = "@a" }\n', "profiles.p.consumer: missing"),
    ('[profiles.p]\nconsumer = 7\nenv = { A = "@a" }\n', "profiles.p.consumer: must be a string"),
    ('[profiles.p]\nconsumer = "c"\nenv = ["A"]\n', "profiles.p.env: must be a non-empty table"),
    ('[profiles.p]\nconsumer = "c"\nenv = {}\n', "profiles.p.env: must be a non-empty table"),
    ('[profiles.p]\nconsumer = "c"\nenv = { A = 1 }\n', "profiles.p.env.A: must be a string"),
    ('[profiles.p]\nconsumer = "c"\nenv = { "1A" = "@a" }\n', "profiles.p.env.1A: not a variable"),
    ('[profiles."a b"]\nconsumer = "c"\nenv = { A = "@a" }\n', "profiles.a b: a profile name"),
    ('profiles = 3\n', "'profiles' must hold tables"),
    ("[profiles.p]\nconsumer = \"c\n", "invalid TOML"),
])
def test_profile_problems_name_the_key(text: str, needle: str) -> None:
    """Unknown keys, missing keys and wrong types are ConfigErrors naming the key."""
    with pytest.raises(ConfigError) as caught:
        parse_profiles(text, "profiles.toml")
    assert caught.value.message.startswith("profiles.toml: ")
    assert needle in caught.value.message


@pytest.mark.parametrize("var", ["PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH",
                                 "DYLD_INSERT_LIBRARIES", "DYLD_LIBRARY_PATH"])
def test_profile_cannot_set_loader_variables(var: str) -> None:
    """PATH, LD_PRELOAD, LD_LIBRARY_PATH, PYTHONPATH and DYLD_* are refused, by name."""
    with pytest.raises(ConfigError) as caught:
        parse_profiles(f'[profiles.p]\nconsumer = "c"\nenv = {{ OK = "@a", {var} = "@b" }}\n')
    assert f"profiles.p.env.{var}: {var} cannot be set from a profile" in caught.value.message


def test_profile_value_is_never_echoed() -> None:
    """A pasted key where a ref belongs is refused without showing it."""
    with pytest.raises(ConfigError) as caught:
        parse_profiles(f'[profiles.p]\nconsumer = "c"\nenv = {{ K = "{SECRET_LOOKALIKE}!" }}\n')
    assert "profiles.p.env.K: must be a secret ref" in caught.value.message
    assert SECRET_LOOKALIKE not in caught.value.message


def test_every_problem_is_reported_at_once() -> None:
    """Two bad profiles: both problems in one error, as the grants loader does."""
    text = ('[profiles.a]\nconsumer = "c"\nenv = { PATH = "@x" }\n'
            '[profiles.b]\nconsumer = "c"\nenv = { A = "@x" }\nextra = 1\n')
    with pytest.raises(ConfigError) as caught:
        parse_profiles(text)
    assert "profiles.a.env.PATH" in caught.value.message
    assert "profiles.b.extra: unknown key" in caught.value.message


def test_find_profile_names_the_known_ones() -> None:
    """An unknown profile is NotFound (exit 3), listing the profiles there are."""
    from pathlib import Path

    with pytest.raises(NotFound) as caught:
        find_profile(parse_profiles(PROFILES), "nope", Path("/h/profiles.toml"))
    assert caught.value.exit_code == 3
    assert "no profile 'nope' in /h/profiles.toml (profiles: context-engine, plain-refs)" in (
        caught.value.message)


def test_denials_come_with_a_grant_that_fixes_them() -> None:
    """Deny by default; the suggested [[grants]] snippet parses and allows exactly that."""
    from pathlib import Path

    profile = parse_profiles(PROFILES)["context-engine"]
    native_only = parse_grants(
        grant("openai_api_key", "context-engine", purposes='"llm.chat"', delivery='"native"',
              ttl=60))
    denials = env_denials(profile, native_only)
    assert list(denials) == ["context_engine_service_tokens", "openai_api_key"]
    assert "delivery" in denials["openai_api_key"]
    error = denied(profile, denials, Path("/h/secrets.grants.toml"))
    assert error.exit_code == 4
    assert "not launched" in error.message
    assert "add to /h/secrets.grants.toml:" in error.message
    snippet = error.message.split(":\n\n", 1)[1]
    assert snippet == "\n".join(grant_snippet(ref, "context-engine") for ref in denials)
    assert tomllib.loads(snippet)["grants"][1]["delivery"] == ["env"]
    fixed = parse_grants(snippet)
    assert env_denials(profile, fixed) == {}
    decision = decide(fixed, AccessRequest("context-engine", "openai_api_key", None, "env", None))
    assert isinstance(decision, Allow)
    assert env_denials(profile, ()) == {
        "context_engine_service_tokens": "no grant for secret 'context_engine_service_tokens' "
                                         "(asked: consumer 'context-engine', delivery 'env')",
        "openai_api_key": "no grant for secret 'openai_api_key' "
                          "(asked: consumer 'context-engine', delivery 'env')"}
