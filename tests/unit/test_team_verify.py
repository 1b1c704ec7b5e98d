"""The team vault format and its verification, pure: each case breaks one rule on purpose
and names the rule (and file) it expects."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

from broker.team import edit
from broker.team.format import (
    DIR,
    FormatError,
    Roster,
    parse_card,
    parse_envelope,
    parse_roster,
    plaintext,
    pretty,
    roster_path,
    secret_paths,
    sha256,
)
from broker.team.keys import Identity, card_is_genuine, encrypt
from broker.team.verify import Broken, Marks, Verified, verify_team

ALICE, BOB, CI, EVE = (Identity.generate() for _ in range(4))
VALUE = "sk-team-canary-0123456789"
NOW = "2026-12-05T00:00:00Z"
Files = dict[str, bytes]


def actor(name: str, identity: Identity) -> edit.Actor:
    return edit.Actor(name, identity, NOW)


def ok(files: Files, pin: str | None = None, marks: Marks | None = None) -> Verified:
    result = verify_team(pin, marks or Marks(), files)
    assert isinstance(result, Verified), result
    return result


def team() -> tuple[Files, str]:
    """alice (admin), bob (writer of llm), ci (reader of llm); two secrets in llm, one in prod."""
    files = edit.apply({}, edit.new_team("a" * 32, "acme", actor("alice", ALICE)))
    pin = sha256(files[roster_path(1)])
    a = actor("alice", ALICE)
    t = ok(files, pin)
    files = edit.apply(files, edit.change_roster(t, a, groups=["llm", "prod"]))
    for name, identity, role in (("bob", BOB, "writer"), ("ci", CI, "reader")):
        files = edit.apply(files, edit.add_member(ok(files, pin), identity.card(name), role,
                                             ["llm"], a))
    for ref, group in (("openai_api_key", "llm"), ("jina_api_key", "llm"), ("db", "prod")):
        files = edit.apply(files, edit.set_secret(ok(files, pin), group, ref, VALUE, a,
                                             provider="openai", kind="api_key"))
    return files, pin


FILES, PIN = team()
TEAM = ok(FILES, PIN)
OPENAI_AGE, OPENAI_JSON = secret_paths("llm", "openai_api_key")


def test_a_built_team_verifies_and_each_reader_decrypts() -> None:
    assert TEAM.roster.generation == 4
    assert sorted(TEAM.secrets) == ["db", "jina_api_key", "openai_api_key"]
    for identity in (ALICE, BOB, CI):
        assert edit.value_of(TEAM, "openai_api_key", identity) == VALUE
    with pytest.raises(Exception, match="decrypt"):  # ci does not read prod
        edit.value_of(TEAM, "db", CI)
    assert TEAM.secrets["openai_api_key"].envelope.recipients.keys() == {"alice", "bob", "ci"}
    assert VALUE.encode() not in b"".join(FILES.values())


def test_plaintext_is_padded_and_bound() -> None:
    text = plaintext("t", "g", "r", 1, "v")
    assert len(text) % 256 == 0 and json.loads(text)["value"] == "v"


def test_cards_are_self_signed() -> None:
    card = parse_card(BOB.card("bob").text())
    assert card_is_genuine(card)
    assert not card_is_genuine(dataclasses.replace(card, age=EVE.recipient))  # keys swapped
    assert not card_is_genuine(dataclasses.replace(card, name="mallory"))
    with pytest.raises(FormatError):
        parse_card("sbteam-card:1:not-base64-json")


def test_a_removed_member_cannot_read_what_is_rekeyed_after() -> None:
    before = TEAM
    files = edit.apply(FILES, edit.remove_member(before, "bob", actor("alice", ALICE)))
    after = ok(files, PIN)
    assert edit.value_of(before, "openai_api_key", BOB) == VALUE  # what bob already had
    with pytest.raises(Exception, match="decrypt"):
        edit.value_of(after, "openai_api_key", BOB)
    assert edit.value_of(after, "openai_api_key", CI) == VALUE
    assert after.to_rotate() == {"jina_api_key": ["bob"], "openai_api_key": ["bob"]}
    rotated = edit.apply(files, edit.set_secret(after, "llm", "openai_api_key", "new", actor(
        "alice", ALICE), provider="openai", kind="api_key"))
    assert ok(rotated, PIN).to_rotate() == {"jina_api_key": ["bob"]}


def test_a_removed_members_new_signature_is_refused() -> None:
    files = edit.apply(FILES, edit.remove_member(TEAM, "bob", actor("alice", ALICE)))
    forged = edit.apply(files, edit.set_secret(ok(files, PIN), "llm", "openai_api_key", "evil",
                                          actor("bob", BOB), provider="openai", kind="api_key"))
    broken = verify_team(PIN, Marks(), forged)
    assert isinstance(broken, Broken) and broken.rule == "envelope-signature"


def _edit_json(path: str, change: Callable[[dict[str, object]], None]) -> Callable[[Files], Files]:
    def mutate(files: Files) -> Files:
        doc = json.loads(files[path])
        change(doc)
        return {**files, path: pretty(doc)}
    return mutate


def _resign_roster(change: Callable[[Roster], Roster], signer: Identity,
                   name: str) -> Callable[[Files], Files]:
    def mutate(files: Files) -> Files:
        path = roster_path(TEAM.roster.generation)
        roster = change(parse_roster(path, files[path]))
        roster = dataclasses.replace(roster, signed_by=name)
        roster = dataclasses.replace(roster, signature=signer.sign("roster", roster.body()))
        return {**files, path: roster.file()}
    return mutate


def _reader_writes(files: Files) -> Files:
    return edit.apply(files, edit.set_secret(TEAM, "llm", "openai_api_key", "x",
                                        actor("ci", CI), provider="openai", kind="api_key"))


def _extra_recipient(files: Files) -> Files:
    env = parse_envelope(OPENAI_JSON, files[OPENAI_JSON])
    data = encrypt(b"x", [*env.recipients.values(), EVE.recipient])
    return {**files, OPENAI_AGE: data}


def _drop(path: str) -> Callable[[Files], Files]:
    return lambda files: {k: v for k, v in files.items() if k != path}


def _eve_genesis(files: Files) -> Files:
    other = edit.new_team("b" * 32, "acme", actor("alice", EVE))
    return {**files, roster_path(1): other[roster_path(1)] or b""}


def _old_recipients(files: Files) -> Files:
    """The envelope still lists (and the file is encrypted to) a member who was removed."""
    removed = edit.apply(files, edit.remove_member(TEAM, "bob", actor("alice", ALICE)))
    return {**removed, OPENAI_AGE: files[OPENAI_AGE], OPENAI_JSON: files[OPENAI_JSON]}


CASES: dict[str, tuple[Callable[[Files], Files], str, str]] = {
    # name: (mutation, rule, file it names)
    "format missing": (_drop(f"{DIR}/FORMAT"), "format", f"{DIR}/FORMAT"),
    "format v2": (lambda f: {**f, f"{DIR}/FORMAT": b"sb-team/2\n"}, "format", f"{DIR}/FORMAT"),
    "duplicate key": (lambda f: {**f, OPENAI_JSON: f[OPENAI_JSON].replace(
        b'{\n  "age_sha256"', b'{\n  "seq": 1,\n  "age_sha256"', 1)}, "parse", OPENAI_JSON),
    "unknown key": (_edit_json(OPENAI_JSON, lambda d: d.update(extra=1)), "parse", OPENAI_JSON),
    "wrong type": (_edit_json(OPENAI_JSON, lambda d: d.update(seq="9")), "parse", OPENAI_JSON),
    "bool for int": (_edit_json(OPENAI_JSON, lambda d: d.update(seq=True)), "parse",
                     OPENAI_JSON),
    "bad member name": (_resign_roster(lambda r: dataclasses.replace(
        r, members={**r.members, "Bad Name": r.members["ci"]}), ALICE, "alice"), "parse",
        roster_path(4)),
    "stray file": (lambda f: {**f, f"{DIR}/notes.txt": b"hi"}, "unknown-file",
                   f"{DIR}/notes.txt"),
    "another genesis": (_eve_genesis, "fingerprint", roster_path(1)),
    "roster gap": (_drop(roster_path(2)), "roster-chain", roster_path(2)),
    "roster edited": (_edit_json(roster_path(2), lambda d: d.update(created_at="x")),
                      "roster-signature", roster_path(2)),
    "roster signed by an outsider": (_resign_roster(lambda r: r, EVE, "alice"),
                                     "roster-signature", roster_path(4)),
    "roster signed by a writer": (_resign_roster(lambda r: r, BOB, "bob"), "roster-signature",
                                  roster_path(4)),
    "envelope edited": (_edit_json(OPENAI_JSON, lambda d: d.update(provider="jina")),
                        "envelope-signature", OPENAI_JSON),
    "reader signs": (_reader_writes, "envelope-signature", OPENAI_JSON),
    "envelope moved": (lambda f: {**f, secret_paths("llm", "other")[0]: f[OPENAI_AGE],
                                  secret_paths("llm", "other")[1]: f[OPENAI_JSON]},
                       "binding", secret_paths("llm", "other")[1]),
    "age swapped": (lambda f: {**f, OPENAI_AGE: f[secret_paths("llm", "jina_api_key")[0]]},
                    "age-digest", OPENAI_AGE),
    "age without envelope": (_drop(OPENAI_JSON), "pairing", OPENAI_AGE),
    "envelope without age": (_drop(OPENAI_AGE), "pairing", OPENAI_JSON),
    "revocation incomplete": (_old_recipients, "revocation-incomplete", OPENAI_AGE),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_broken_rule_is_named(case: str) -> None:
    mutate, rule, file = CASES[case]
    broken = verify_team(PIN, Marks(), mutate(FILES))
    assert isinstance(broken, Broken), case
    assert (broken.rule, broken.file) == (rule, file), broken.message


def test_recipient_count_is_checked_against_the_header() -> None:
    # An envelope re-signed by an admin over a file with one recipient more than it lists.
    files = _extra_recipient(FILES)
    env = parse_envelope(OPENAI_JSON, files[OPENAI_JSON])
    env = dataclasses.replace(env, age_sha256=sha256(files[OPENAI_AGE]))
    env = dataclasses.replace(env, signature=ALICE.sign("envelope", env.body()))
    broken = verify_team(PIN, Marks(), {**files, OPENAI_JSON: env.file()})
    assert isinstance(broken, Broken) and broken.rule == "recipient-count"


def test_rollback_rules() -> None:
    marks = TEAM.marks
    older = FILES  # the same commit is fine
    ok(older, PIN, marks)
    newer = edit.apply(FILES, edit.set_secret(TEAM, "llm", "openai_api_key", "v2",
                                         actor("alice", ALICE), provider="openai",
                                         kind="api_key"))
    high = ok(newer, PIN).marks
    for files, rule in ((FILES, "rollback"),
                        (_drop(roster_path(4))(_drop(OPENAI_AGE)(newer)), "roster-chain")):
        broken = verify_team(PIN, high, files)
        assert isinstance(broken, Broken) and broken.rule in (rule, "rollback"), broken
    gone = _drop(OPENAI_AGE)(_drop(OPENAI_JSON)(newer))
    broken = verify_team(PIN, high, gone)
    assert isinstance(broken, Broken) and broken.rule == "vanished"
    broken = verify_team(PIN, Marks(), FILES, descends=False)
    assert isinstance(broken, Broken) and broken.rule == "rollback"
    tomb = edit.apply(newer, edit.remove_secret(ok(newer, PIN), "openai_api_key",
                                           actor("alice", ALICE)))
    assert "openai_api_key" in ok(tomb, PIN, high).tombstones
