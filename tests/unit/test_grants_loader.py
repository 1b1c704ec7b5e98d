"""grants.loader: every validation error names its line and key; all are reported at once."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from grants import Grant, GrantsError, Problem, load_grants, parse_grants
from grants.loader import REQUIRED_KEYS
from grants.tomlfile import MAX_FILE_BYTES

SPEC_EXAMPLE = """\
[[grants]]
secret_ref = "openai_api_key"
consumer = "ugent-core"
purposes = ["llm.chat", "llm.embeddings"]
delivery = ["native", "http_header_inject"]
allowed_hosts = ["api.openai.com"]
ttl_secs = 300
"""
# Line of each key in SPEC_EXAMPLE, so a test can say where its problem must be reported.
KEY_LINE = {key: n for n, key in enumerate(REQUIRED_KEYS, 2)}
VECTORS = sorted((Path(__file__).parents[1] / "vectors" / "grants").glob("*.toml"))


def with_value(key: str, toml_value: str | None) -> str:
    """SPEC_EXAMPLE with `key` set to a raw TOML value, or removed when None."""
    lines = SPEC_EXAMPLE.splitlines()
    n = KEY_LINE[key] - 1
    if toml_value is None:
        del lines[n]
    else:
        lines[n] = f"{key} = {toml_value}"
    return "\n".join(lines) + "\n"


def only_problem(text: str) -> Problem:
    """The single problem `text` must have."""
    with pytest.raises(GrantsError) as info:
        parse_grants(text)
    assert len(info.value.problems) == 1, info.value
    return info.value.problems[0]


def test_spec_example_parses_to_exact_grant() -> None:
    """The SPEC §5 example parses to exactly the expected Grant."""
    assert parse_grants(SPEC_EXAMPLE) == (
        Grant(
            index=0,
            line=1,
            secret_ref="openai_api_key",
            consumer="ugent-core",
            purposes=("llm.chat", "llm.embeddings"),
            delivery=("native", "http_header_inject"),
            allowed_hosts=("api.openai.com",),
            ttl_secs=300,
        ),
    )


def test_ref_at_sign_is_dropped_and_hosts_lower_cased() -> None:
    """`@ref` and `ref` name the same secret; hosts compare case-insensitively."""
    text = with_value("secret_ref", '"@openai_api_key"').replace("api.openai.com", "API.OpenAI.com")
    (grant,) = parse_grants(text)
    assert grant.secret_ref == "openai_api_key"
    assert grant.allowed_hosts == ("api.openai.com",)


@pytest.mark.parametrize(
    "text",
    ["", "# all grants commented out\n# [[grants]]\n# consumer = 'x'\n", "grants = []\n"],
)
def test_no_grants_is_valid_and_empty(text: str) -> None:
    """An empty or all-commented file (as `init` writes) is valid and grants nothing."""
    assert parse_grants(text) == ()


def test_grants_get_index_and_header_line() -> None:
    """Each grant records its 0-based index and the line of its own [[grants]] header."""
    text = "# owner's grants\n\n" + SPEC_EXAMPLE + "\n" + SPEC_EXAMPLE.replace("ugent", "other")
    first, second = parse_grants(text)
    assert (first.index, first.line, second.index, second.line) == (0, 3, 1, 11)
    assert second.consumer == "other-core"


def test_toml_syntax_error_names_its_line() -> None:
    """A TOML syntax error is one problem at the line tomllib reports."""
    problem = only_problem(SPEC_EXAMPLE.replace("ttl_secs = 300", "ttl_secs = "))
    assert problem.line == 7 and problem.key is None
    assert problem.message.startswith("invalid TOML:")


@pytest.mark.parametrize("text", ["a = " + "9" * 5000, "a = " + "[" * 5000])
def test_toml_that_python_cannot_hold_is_a_grants_error(text: str) -> None:
    """Oversized integers and runaway nesting become GrantsError, not ValueError/RecursionError."""
    assert only_problem(text).message.startswith("invalid TOML:")


def test_unknown_top_level_key() -> None:
    """A key outside [[grants]] is an error naming it and its line."""
    problem = only_problem("version = 2\n" + SPEC_EXAMPLE)
    assert (problem.line, problem.key) == (1, "version")
    assert "unknown top-level key" in problem.message


def test_singular_grant_header_suggests_grants() -> None:
    """`[[grant]]` is a typo for `[[grants]]` and is reported as one."""
    problem = only_problem(SPEC_EXAMPLE.replace("[[grants]]", "[[grant]]"))
    assert (problem.line, problem.key) == (1, "grant")
    assert "did you mean 'grants'?" in problem.message


@pytest.mark.parametrize(
    ("text", "line"),
    [("grants = 1\n", 1), ("# x\n[grants]\nconsumer = 'x'\n", 2), ('grants = ["a"]\n', 1)],
)
def test_grants_must_be_array_of_tables(text: str, line: int) -> None:
    """`grants` as a value or a single table is an error at its line."""
    problem = only_problem(text)
    assert (problem.line, problem.key) == (line, "grants")
    assert "array of tables" in problem.message


def test_inline_grant_tables_are_refused() -> None:
    """Inline tables have no header line to report, so they are refused."""
    problem = only_problem('grants = [{ secret_ref = "a" }]\n')
    assert (problem.line, problem.key) == (1, "grants")
    assert "[[grants]]" in problem.message


def test_typo_purpose_names_key_line_and_suggests_purposes() -> None:
    """`purpose` is unknown, reported at its line with 'purposes' suggested."""
    text = SPEC_EXAMPLE.replace("purposes =", "purpose =")
    with pytest.raises(GrantsError) as info:
        parse_grants(text)
    assert [str(p) for p in info.value.problems] == [
        "line 1, grant 0, key 'purposes': missing required key",
        "line 4, grant 0, key 'purpose': unknown key (did you mean 'purposes'?)",
    ]


def test_unknown_key_without_close_match_lists_allowed_keys() -> None:
    """An unknown key with no near match lists the keys a grant may have."""
    problem = only_problem(SPEC_EXAMPLE + "colour = 'red'\n")
    assert (problem.line, problem.key) == (8, "colour")
    assert "expected secret_ref, consumer, purposes" in problem.message


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_every_key_is_required(key: str) -> None:
    """Leaving out any of the six keys is an error at the grant's header line."""
    problem = only_problem(with_value(key, None))
    assert (problem.line, problem.index, problem.key) == (1, 0, key)
    assert problem.message == "missing required key"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("secret_ref", "1", "must be a string, not an integer"),
        ("consumer", '["ugent-core"]', "must be a string, not an array"),
        ("purposes", '"llm.chat"', "must be an array of strings, not a string"),
        ("purposes", '["llm.chat", 1]', "entry 2: must be a string, not an integer"),
        ("delivery", "{ a = 1 }", "must be an array of strings, not a table"),
        ("allowed_hosts", '"api.openai.com"', "must be an array of strings, not a string"),
        ("ttl_secs", '"300"', "must be an integer number of seconds, not a string"),
        ("ttl_secs", "true", "not a boolean"),
        ("ttl_secs", "300.0", "not a float"),
        ("ttl_secs", "1979-05-27", "not a date"),
    ],
)
def test_wrong_types(key: str, value: str, expected: str) -> None:
    """A value of the wrong TOML type is an error at the key's own line."""
    problem = only_problem(with_value(key, value))
    assert (problem.line, problem.key) == (KEY_LINE[key], key)
    assert expected in problem.message


@pytest.mark.parametrize("key", ["purposes", "delivery", "allowed_hosts"])
def test_empty_lists(key: str) -> None:
    """An empty list would silently grant nothing, so it is an error."""
    problem = only_problem(with_value(key, "[]"))
    assert (problem.line, problem.key, problem.message) == (KEY_LINE[key], key, "must not be empty")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("secret_ref", '""', "must not be empty"),
        ("consumer", '""', "must not be empty"),
        ("purposes", '["llm.chat", ""]', "entry 2: must not be empty"),
        ("consumer", '"ugent-core "', "must not start or end with whitespace"),
    ],
)
def test_empty_or_padded_strings(key: str, value: str, expected: str) -> None:
    """Empty or whitespace-padded strings never match a request, so they are errors."""
    problem = only_problem(with_value(key, value))
    assert (problem.line, problem.key) == (KEY_LINE[key], key)
    assert expected in problem.message


@pytest.mark.parametrize("ref", ["open ai", "a" * 129, "@@key", "key/../x", "clé"])
def test_invalid_secret_ref(ref: str) -> None:
    """A ref outside `@?[A-Za-z0-9_.-]{1,128}` is an error naming the line and key, not
    the value (it may be a key pasted by mistake)."""
    problem = only_problem(with_value("secret_ref", f'"{ref}"'))
    assert (problem.line, problem.key) == (2, "secret_ref")
    assert "is not a secret ref" in problem.message and ref not in str(problem)


def test_longest_secret_ref_is_accepted() -> None:
    """128 characters is the longest ref, and it is allowed."""
    (grant,) = parse_grants(with_value("secret_ref", '"' + "a" * 128 + '"'))
    assert grant.secret_ref == "a" * 128


def test_unknown_delivery_suggests_close_match() -> None:
    """An unknown delivery is an error with the nearest valid one suggested."""
    problem = only_problem(with_value("delivery", '["native", "http_header_injection"]'))
    assert (problem.line, problem.key) == (5, "delivery")
    assert "entry 2: unknown delivery" in problem.message
    assert "http_header_injection" not in problem.message
    assert "did you mean 'http_header_inject'?" in problem.message


@pytest.mark.parametrize("ttl", ["0", "-5", "86401"])
def test_ttl_out_of_range(ttl: str) -> None:
    """A TTL outside 1..86400 is an error at the ttl_secs line."""
    problem = only_problem(with_value("ttl_secs", ttl))
    assert (problem.line, problem.key) == (7, "ttl_secs")
    assert problem.message == "is outside 1..86400"


@pytest.mark.parametrize("ttl", [1, 86400])
def test_ttl_bounds_are_inclusive(ttl: int) -> None:
    """1 and 86400 seconds are both valid TTLs."""
    (grant,) = parse_grants(with_value("ttl_secs", str(ttl)))
    assert grant.ttl_secs == ttl


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("https://api.openai.com", "has a scheme"),
        ("api.openai.com/v1", "has a path"),
        ("*.openai.com", "wildcard"),
        ("api.openai.com ", "whitespace"),
        ("api openai.com", "whitespace"),
        ("api.openai.com:0", "bad port"),
        ("api.openai.com:65536", "bad port"),
        ("api.openai.com:0443", "bad port"),
        ("api.openai.com:", "bad port"),
        ("api.openai.com:https", "bad port"),
        ("::1", "brackets"),
        ("[::1", "not a host"),
        ("[::1]443", "not a host"),
        ("[not-ipv6]:443", "not a bracketed IPv6 address"),
        ("256.1.1.1", "not a valid IPv4 address"),
        ("1.2.3", "not a valid IPv4 address"),
        ("api..openai.com", "not a host name"),
        ("api.openai.com.", "not a host name"),
        ("-api.openai.com", "not a host name"),
        ("user@api.openai.com", "not a host name"),
        ("", "not a host name"),
        ("bücher.example", "punycode"),
    ],
)
def test_malformed_hosts(host: str, expected: str) -> None:
    """A host that is not a plain name or literal with an optional port is an error."""
    problem = only_problem(with_value("allowed_hosts", f'["api.openai.com", "{host}"]'))
    assert (problem.line, problem.key) == (6, "allowed_hosts")
    assert "entry 2: " in problem.message and expected in problem.message
    assert repr(host) not in problem.message  # the value is never quoted


@pytest.mark.parametrize(
    ("host", "stored"),
    [
        ("API.OpenAI.com", "api.openai.com"),
        ("localhost", "localhost"),
        ("127.0.0.1:9000", "127.0.0.1:9000"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]:8080"),
        ("[FE80::1]:65535", "[fe80::1]:65535"),
        ("my_service:1", "my_service:1"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_valid_hosts(host: str, stored: str) -> None:
    """Names, IPv4 and bracketed IPv6 literals, with or without a port, are accepted."""
    (grant,) = parse_grants(with_value("allowed_hosts", f'["{host}"]'))
    assert grant.allowed_hosts == (stored,)


def test_all_problems_are_reported_at_once() -> None:
    """Problems from every grant and the top level come together, in line order."""
    text = (
        "owner = 'me'\n"
        + SPEC_EXAMPLE.replace("ttl_secs = 300", "ttl_secs = 0")
        + "\n"
        + SPEC_EXAMPLE.replace('"native", ', '"nativ", ').replace("ugent-core", "")
    )
    with pytest.raises(GrantsError) as info:
        parse_grants(text, source="home/secrets.grants.toml")
    found = [(p.line, p.index, p.key) for p in info.value.problems]
    assert found == [
        (1, None, "owner"),
        (8, 0, "ttl_secs"),
        (12, 1, "consumer"),
        (14, 1, "delivery"),
    ]
    assert str(info.value).splitlines()[0] == "home/secrets.grants.toml: 4 problems:"
    assert "  line 8, grant 0, key 'ttl_secs': is outside 1..86400" in str(info.value)


def test_comments_and_multiline_strings_do_not_confuse_line_numbers() -> None:
    """Header-like text in comments or multi-line strings is not taken for a grant."""
    text = (
        '# [[grants]]\nnote = """\n[[grants]]\nttl_secs = 1\n"""\n'  # lines 1-5
        + SPEC_EXAMPLE.replace("ttl_secs = 300", "# ttl_secs = 1\nttl_secs = 0  # [[grants]]")
    )
    with pytest.raises(GrantsError) as info:
        parse_grants(text)
    assert [(p.line, p.key) for p in info.value.problems] == [(2, "note"), (13, "ttl_secs")]


def test_crlf_line_endings_keep_line_numbers() -> None:
    """Windows line endings neither break parsing nor shift reported lines."""
    problem = only_problem(with_value("ttl_secs", "0").replace("\n", "\r\n"))
    assert (problem.line, problem.key) == (7, "ttl_secs")


def test_quoted_keys_are_located() -> None:
    """A quoted key (`"purpose" = ...`) is still found on its line."""
    problem = only_problem(SPEC_EXAMPLE + '"colour" = "red"\n')
    assert (problem.line, problem.key) == (8, "colour")


def test_grants_error_survives_pickling() -> None:
    """GrantsError keeps its source and problems through pickle (e.g. across processes)."""
    with pytest.raises(GrantsError) as info:
        parse_grants("x = 1\n")
    copy = pickle.loads(pickle.dumps(info.value))  # noqa: S301  # our own bytes
    assert (copy.source, copy.problems, str(copy)) == (
        info.value.source,
        info.value.problems,
        str(info.value),
    )


def test_load_missing_file_denies_everything(tmp_path: Path) -> None:
    """A missing grants file is no grants, not an error (SPEC §2)."""
    assert load_grants(tmp_path / "secrets.grants.toml") == ()


def test_load_valid_file(tmp_path: Path) -> None:
    """A valid file loads to the same grants as parsing its text."""
    path = tmp_path / "secrets.grants.toml"
    path.write_text(SPEC_EXAMPLE, encoding="utf-8")
    assert load_grants(path) == parse_grants(SPEC_EXAMPLE)


def test_load_invalid_file_names_the_path(tmp_path: Path) -> None:
    """Problems in a loaded file are reported against its path."""
    path = tmp_path / "secrets.grants.toml"
    path.write_text(with_value("ttl_secs", "0"), encoding="utf-8")
    with pytest.raises(GrantsError) as info:
        load_grants(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: 1 problem:")


def test_load_unreadable_file_is_a_grants_error(tmp_path: Path) -> None:
    """A read failure is a GrantsError problem, never an OSError."""
    with pytest.raises(GrantsError) as info:
        load_grants(tmp_path)  # a directory: open() fails with IsADirectoryError
    assert "cannot read the file" in info.value.problems[0].message


def test_load_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are reported at their line."""
    path = tmp_path / "secrets.grants.toml"
    path.write_bytes(SPEC_EXAMPLE.encode() + b"# caf\xe9\n")
    with pytest.raises(GrantsError) as info:
        load_grants(path)
    assert (info.value.problems[0].line, info.value.problems[0].message) == (8, "not UTF-8 text")


def test_load_oversized_file_is_refused(tmp_path: Path) -> None:
    """A file over the size cap is refused without being parsed."""
    path = tmp_path / "secrets.grants.toml"
    path.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(GrantsError) as info:
        load_grants(path)
    assert "larger than" in info.value.problems[0].message


def read_expectation(path: Path) -> tuple[str, str]:
    """A vector's first line: `# expect: ok` or `# expect: <key|-> <text in str(problem)>`."""
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    key, _, text = first.removeprefix("# expect: ").partition(" ")
    return key, text


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path: Path) -> None:
    """Each vector file parses, or fails with a problem naming the expected key and text."""
    key, text = read_expectation(path)
    if key == "ok":
        assert all(isinstance(g, Grant) for g in load_grants(path))
        return
    with pytest.raises(GrantsError) as info:
        load_grants(path)
    expected_key = None if key == "-" else key
    matches = [p for p in info.value.problems if p.key == expected_key and text in str(p)]
    assert matches, f"no problem with key {key!r} containing {text!r} in:\n{info.value}"
    assert all(p.line is not None for p in info.value.problems)


def test_vectors_exist() -> None:
    """The vector directory is found, so test_vector cannot pass by running nothing."""
    assert len(VECTORS) >= 20


@given(st.text())
def test_random_text_only_raises_grants_error(text: str) -> None:
    """Any text either parses or raises GrantsError with at least one problem."""
    try:
        parse_grants(text)
    except GrantsError as e:
        assert e.problems and str(e)


_scalars = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False),
    st.sampled_from(["openai_api_key", "@a.b-c_1", "native", "env", "api.openai.com:443"]),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=4))
_keys = st.sampled_from([*REQUIRED_KEYS, "purpose", "hosts", "ttl", "grants"]) | st.text(max_size=8)
_fragments = st.one_of(
    st.just("[[grants]]"),
    st.sampled_from(["[grants]", "[[grant]]", "[other]", "# comment", '"""', "", "x = ["]),
    st.dictionaries(_keys, _values, max_size=3).map(tomli_w.dumps),
    st.text(max_size=20),
)


@given(st.lists(_fragments, max_size=20).map("\n".join))
def test_toml_ish_text_only_raises_grants_error(text: str) -> None:
    """Generated near-valid grant files either parse or raise GrantsError."""
    try:
        grants = parse_grants(text)
    except GrantsError as e:
        assert e.problems and str(e)
    else:
        assert all(g.line >= 1 and g.ttl_secs >= 1 for g in grants)
