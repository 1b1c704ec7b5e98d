"""Whether one commit of a team vault can be trusted, as one pure function.

`verify_team` takes what this machine remembers (the pinned genesis fingerprint, the
highest roster generation and envelope `seq` it has seen, whether the commit descends from
the last one it verified) and the files of the commit, and returns the verified team or the
first rule broken, with the file. The CLI, `check` and the daemon all call it, so they
never disagree on what a valid team is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.team.format import (
    DIR,
    FIXED_FILES,
    FORMAT,
    Envelope,
    FormatError,
    Roster,
    age_recipient_count,
    parse_envelope,
    parse_roster,
    roster_path,
    secret_paths,
    sha256,
)
from broker.team.keys import verify

# Rule -> what it means, for `team check` and the docs.
RULES = {
    "format": f"{DIR}/FORMAT is missing or names a format other than {FORMAT}",
    "parse": "a file is not well-formed (JSON, keys, types or names)",
    "unknown-file": f"a file under {DIR}/ that is no roster, secret or fixed file",
    "fingerprint": "the first roster is not the one this machine pinned (another team?)",
    "roster-chain": "roster generations are not consecutive or not chained by hash",
    "roster-signature": "a roster generation is not signed by an admin of the one before",
    "envelope-signature": "an envelope is not signed by a current writer of its group",
    "binding": "an envelope names another team, group, ref or roster than where it lies",
    "age-digest": "an .age file is not the one its envelope signed",
    "recipient-count": "an .age file has another number of recipients than its envelope",
    "recipients": "a secret is not encrypted to exactly its group's current readers",
    "revocation-incomplete": "a secret is still encrypted to someone who lost access",
    "pairing": "an .age file without its envelope, or the reverse",
    "duplicate-ref": "two groups hold the same ref",
    "rollback": "the commit is older than one this machine already verified",
    "vanished": "a secret disappeared without a signed tombstone",
}
_ROSTER_FILE = re.compile(rf"{DIR}/roster/(\d{{6}})\.json")
_SECRET_FILE = re.compile(rf"{DIR}/secrets/([^/]+)/([^/]+)\.(age|json)")


@dataclass(frozen=True)
class Marks:
    """This machine's memory of the newest team state it verified (rollback protection)."""
    generation: int = 0
    seqs: Mapping[str, int] = field(default_factory=dict)  # ref -> highest seq seen


@dataclass(frozen=True)
class Secret:
    envelope: Envelope
    age: bytes


@dataclass(frozen=True)
class Verified:
    team_id: str
    fingerprint: str
    roster: Roster  # the newest generation
    roster_bytes: bytes  # its file, which the next generation names by hash
    secrets: Mapping[str, Secret]  # ref -> the live secrets
    tombstones: Mapping[str, Envelope]

    @property
    def marks(self) -> Marks:
        seqs = {ref: s.envelope.seq for ref, s in self.secrets.items()}
        seqs.update({ref: t.seq for ref, t in self.tombstones.items()})
        return Marks(self.roster.generation, seqs)

    def to_rotate(self) -> dict[str, list[str]]:
        """ref -> who could read its current value and lost access since it was set."""
        out: dict[str, list[str]] = {}
        for exposure in self.roster.exposed:
            for item in exposure.refs:
                ref = item.partition("/")[2]
                secret = self.secrets.get(ref)
                if secret is not None and secret.envelope.value_generation < exposure.generation:
                    out.setdefault(ref, []).append(exposure.member)
        return out


@dataclass(frozen=True)
class Broken:
    file: str
    rule: str
    detail: str

    @property
    def message(self) -> str:
        return f"{self.file}: {self.detail} (rule {self.rule}: {RULES[self.rule]})"


def verify_team(pin: str | None, marks: Marks, files: Mapping[str, bytes], *,
                descends: bool = True) -> Verified | Broken:
    """The team as the files of one commit hold it, or the first rule they break.

    `pin` None accepts any genesis (for `team init` and for computing a fingerprint);
    `descends` says whether the commit descends from the last one this machine verified.
    """
    try:
        return _verify(pin, marks, files, descends)
    except FormatError as exc:
        return Broken(exc.file, exc.rule, exc.detail)


def _fail(file: str, rule: str, detail: str) -> FormatError:
    return FormatError(file, rule, detail)


def _verify(pin: str | None, marks: Marks, files: Mapping[str, bytes],
            descends: bool) -> Verified:
    format_file = f"{DIR}/FORMAT"
    if format_file not in files:
        raise _fail(format_file, "format", "missing: this is no team vault")
    if files[format_file].strip() != FORMAT.encode():
        raise _fail(format_file, "format", "names another format; upgrade secret-broker")
    if not descends:
        raise _fail("HEAD", "rollback", "the commit does not descend from the last one this "
                                        "machine verified; if the history was rewritten on "
                                        "purpose, run `secret-broker team trust-reset`")
    rosters: dict[int, tuple[str, bytes]] = {}
    pieces: dict[tuple[str, str], dict[str, tuple[str, bytes]]] = {}
    for path, data in files.items():
        if path in FIXED_FILES:
            continue
        if m := _ROSTER_FILE.fullmatch(path):
            rosters[int(m.group(1))] = (path, data)
        elif m := _SECRET_FILE.fullmatch(path):
            pieces.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = (path, data)
        else:
            raise _fail(path, "unknown-file", "not a roster, secret or fixed file")
    roster, roster_bytes = _chain(pin, rosters)
    if roster.generation < marks.generation:
        raise _fail(roster_path(roster.generation), "rollback",
                    f"roster generation {roster.generation} is older than generation "
                    f"{marks.generation}, which this machine already verified")
    secrets: dict[str, Secret] = {}
    tombstones: dict[str, Envelope] = {}
    for (group, ref), parts in sorted(pieces.items()):
        age_path, json_path = secret_paths(group, ref)
        if "json" not in parts:
            raise _fail(age_path, "pairing", "an .age file without its envelope")
        envelope = parse_envelope(json_path, parts["json"][1])
        _check_envelope(json_path, envelope, roster, group, ref)
        if ref in secrets or ref in tombstones:
            raise _fail(json_path, "duplicate-ref", f"@{ref} is also held by another group")
        if envelope.seq < marks.seqs.get(ref, 0):
            raise _fail(json_path, "rollback", f"seq {envelope.seq} is older than seq "
                                               f"{marks.seqs[ref]}, already verified here")
        if envelope.type == "tombstone":
            if "age" in parts:
                raise _fail(age_path, "pairing", "an .age file beside a tombstone")
            tombstones[ref] = envelope
            continue
        if "age" not in parts:
            raise _fail(json_path, "pairing", "an envelope without its .age file")
        data = parts["age"][1]
        _check_age(age_path, data, envelope, roster)
        secrets[ref] = Secret(envelope, data)
    for ref in sorted(marks.seqs):
        if ref not in secrets and ref not in tombstones:
            raise _fail(f"{DIR}/secrets/…/{ref}.json", "vanished",
                        f"@{ref} disappeared without a signed tombstone")
    return Verified(roster.team_id, sha256(rosters[1][1]), roster, roster_bytes, secrets,
                    tombstones)


def _chain(pin: str | None, rosters: Mapping[int, tuple[str, bytes]]) -> tuple[Roster, bytes]:
    """The newest roster, once every generation is shown to follow from the pinned one."""
    if 1 not in rosters:
        raise _fail(roster_path(1), "roster-chain", "the first roster generation is missing")
    newest = max(rosters)
    if sorted(rosters) != list(range(1, newest + 1)):
        gap = next(g for g in range(1, newest + 1) if g not in rosters)
        raise _fail(roster_path(gap), "roster-chain", f"roster generation {gap} is missing")
    genesis_path, genesis_bytes = rosters[1]
    if pin is not None and sha256(genesis_bytes) != pin:
        raise _fail(genesis_path, "fingerprint", "the first roster does not match the "
                                                 "fingerprint this machine pinned")
    previous: Roster | None = None
    previous_bytes = b""  # the newest roster's file, once the loop ends
    for generation in range(1, newest + 1):
        path, data = rosters[generation]
        roster = parse_roster(path, data)
        if roster.generation != generation:
            raise _fail(path, "roster-chain", f"the file says generation {roster.generation}")
        # Generation 1 is signed by its own first admin; every later one by an admin of the
        # generation before it.
        authority = roster if previous is None else previous
        expected_previous = None if previous is None else sha256(previous_bytes)
        if roster.previous != expected_previous:
            raise _fail(path, "roster-chain", "does not name the hash of the generation "
                                              "before it")
        if previous is not None and roster.team_id != previous.team_id:
            raise _fail(path, "binding", "names another team id than generation 1")
        signer = authority.members.get(roster.signed_by)
        if (signer is None or signer.role != "admin"
                or not verify("roster", roster.body(), signer.sign, roster.signature)):
            raise _fail(path, "roster-signature", f"not signed by an admin of generation "
                                                  f"{authority.generation}")
        previous, previous_bytes = roster, data
    assert previous is not None
    return previous, previous_bytes


def _check_envelope(path: str, envelope: Envelope, roster: Roster, group: str,
                    ref: str) -> None:
    if (envelope.team_id, envelope.group, envelope.ref) != (roster.team_id, group, ref):
        raise _fail(path, "binding", "names another team, group or ref than where it lies")
    if group not in roster.groups:
        raise _fail(path, "binding", f"group {group} is not in the roster")
    if envelope.roster_generation > roster.generation:
        raise _fail(path, "binding", f"names roster generation {envelope.roster_generation}, "
                                     "which does not exist")
    signer = roster.members.get(envelope.signed_by)
    if (signer is None or not signer.writes(group)
            or not verify(envelope.domain, envelope.body(), signer.sign, envelope.signature)):
        raise _fail(path, "envelope-signature", f"not signed by a current writer of group "
                                                f"{group}")


def _check_age(path: str, data: bytes, envelope: Envelope, roster: Roster) -> None:
    if sha256(data) != envelope.age_sha256:
        raise _fail(path, "age-digest", "the file is not the one its envelope signed")
    if age_recipient_count(data) != len(envelope.recipients):
        raise _fail(path, "recipient-count", "the file's header names another number of "
                                             "recipients than its envelope")
    readers = roster.readers(envelope.group)
    if dict(envelope.recipients) == readers:
        return
    gone = sorted(set(envelope.recipients) - set(readers))
    if gone:
        raise _fail(path, "revocation-incomplete",
                    f"still encrypted to {', '.join(gone)}, who lost access: run "
                    "`secret-broker team rekey`")
    raise _fail(path, "recipients", "not encrypted to exactly the group's current readers: "
                                    "run `secret-broker team rekey`")
