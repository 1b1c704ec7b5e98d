"""Changes to a team vault, as new file contents: pure, so a change is computed, verified
in memory with `verify_team`, and only then written and committed.

Each function takes the verified team and the acting member (name and identity) and
returns `Files`: path -> new bytes, or None to delete. Roster changes re-encrypt the groups
whose readers changed in the same change, so no commit ever holds a half-done revocation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from broker.team.format import (
    FIXED_FILES,
    Card,
    Envelope,
    Exposure,
    FormatError,
    Member,
    Roster,
    open_plaintext,
    plaintext,
    roster_path,
    secret_paths,
    sha256,
)
from broker.team.keys import Identity, encrypt
from broker.team.verify import Verified

Files = dict[str, bytes | None]


def apply(files: Mapping[str, bytes], change: Files) -> dict[str, bytes]:
    """The files of a commit once `change` is made to them (None deletes a path)."""
    out = dict(files)
    for path, data in change.items():
        if data is None:
            out.pop(path, None)
        else:
            out[path] = data
    return out


@dataclasses.dataclass(frozen=True)
class Actor:
    """Who makes a change: the member's name in the roster, their identity, and the time."""
    name: str
    identity: Identity
    now: str


def _signed_roster(roster: Roster, actor: Actor) -> Roster:
    roster = dataclasses.replace(roster, signed_by=actor.name, signature="")
    return dataclasses.replace(roster, signature=actor.identity.sign("roster", roster.body()))


def new_team(team_id: str, name: str, actor: Actor) -> Files:
    """The fixed files and the genesis roster, with the creator as its one admin."""
    me = Member(actor.name, "admin", (), actor.identity.recipient, actor.identity.verify_key)
    genesis = _signed_roster(Roster(team_id, name, 1, None, actor.now, (), {actor.name: me}),
                             actor)
    return {**FIXED_FILES, roster_path(1): genesis.file()}


def _seal(team_id: str, roster: Roster, old: Envelope | None, group: str, ref: str,
          value: str, actor: Actor, *, provider: str, kind: str, new_value: bool) -> Files:
    """The `.age` file and the signed envelope of one secret, for the roster's readers."""
    readers = roster.readers(group)
    version = (old.version if old else 0) + (1 if new_value else 0)
    body = plaintext(team_id, group, ref, version, value)
    data = encrypt(body, readers.values())
    envelope = Envelope(
        "secret", team_id, group, ref, seq=(old.seq if old else 0) + 1, version=version,
        value_generation=roster.generation if new_value or old is None else old.value_generation,
        provider=provider, kind=kind, age_sha256=sha256(data), recipients=readers,
        roster_generation=roster.generation, written_at=actor.now, signed_by=actor.name)
    envelope = dataclasses.replace(
        envelope, signature=actor.identity.sign("envelope", envelope.body()))
    age_path, json_path = secret_paths(group, ref)
    return {age_path: data, json_path: envelope.file()}


def set_secret(team: Verified, group: str, ref: str, value: str, actor: Actor, *,
               provider: str, kind: str) -> Files:
    """A new secret, or a new value of one (version + 1)."""
    current = team.secrets.get(ref)
    old = current.envelope if current else team.tombstones.get(ref)
    files: Files = {}
    if old is not None and old.group != group:
        if current is not None:
            raise FormatError(secret_paths(old.group, ref)[1], "duplicate-ref",
                              f"@{ref} is in group {old.group}; remove it there first")
        files[secret_paths(old.group, ref)[1]] = None  # the tombstone moves with the ref
    files.update(_seal(team.team_id, team.roster, old, group, ref, value, actor,
                       provider=provider, kind=kind, new_value=True))
    return files


def remove_secret(team: Verified, ref: str, actor: Actor) -> Files:
    """A signed tombstone instead of the secret, so its absence is not a rollback."""
    old = team.secrets[ref].envelope
    tomb = Envelope("tombstone", team.team_id, old.group, ref, seq=old.seq + 1,
                    version=old.version, value_generation=old.value_generation,
                    provider=old.provider, kind=old.kind, age_sha256=None, recipients={},
                    roster_generation=team.roster.generation, written_at=actor.now,
                    signed_by=actor.name)
    tomb = dataclasses.replace(tomb, signature=actor.identity.sign("tombstone", tomb.body()))
    age_path, json_path = secret_paths(old.group, ref)
    return {age_path: None, json_path: tomb.file()}


def value_of(team: Verified, ref: str, identity: Identity) -> str:
    """A secret's value, decrypted with this member's identity and bound to its envelope."""
    secret = team.secrets[ref]
    age_path = secret_paths(secret.envelope.group, ref)[0]
    return open_plaintext(age_path, identity.decrypt(secret.age), secret.envelope)


def rekey(team: Verified, roster: Roster, actor: Actor,
          groups: Iterable[str] | None = None, *, everything: bool = False) -> Files:
    """Re-encrypt (and re-sign) every secret whose recipients are not `roster`'s readers of
    its group (every secret, with `everything`); the value and its version stay, `seq`
    grows."""
    wanted = None if groups is None else set(groups)
    files: Files = {}
    for ref, secret in sorted(team.secrets.items()):
        old = secret.envelope
        if wanted is not None and old.group not in wanted:
            continue
        if not everything and dict(old.recipients) == roster.readers(old.group):
            continue
        files.update(_seal(team.team_id, roster, old, old.group, ref,
                           value_of(team, ref, actor.identity), actor, provider=old.provider,
                           kind=old.kind, new_value=False))
    return files


def change_roster(team: Verified, actor: Actor, *, members: Mapping[str, Member] | None = None,
                  groups: Iterable[str] | None = None,
                  exposed: Iterable[Exposure] = ()) -> Files:
    """The next roster generation, and every secret re-encrypted for it where needed."""
    old = team.roster
    new = _signed_roster(dataclasses.replace(
        old, generation=old.generation + 1, previous=sha256(team.roster_bytes),
        created_at=actor.now, groups=tuple(old.groups if groups is None else groups),
        members=dict(old.members if members is None else members),
        exposed=old.exposed + tuple(exposed)), actor)
    files: Files = {roster_path(new.generation): new.file()}
    files.update(rekey(team, new, actor))
    return files


def readable_refs(team: Verified, member: Member, groups: Iterable[str] | None = None) -> list[str]:
    """`group/ref` of each live secret the member can read (in `groups` only, if given)."""
    within = set(team.roster.groups if groups is None else groups)
    return sorted(f"{s.envelope.group}/{ref}" for ref, s in team.secrets.items()
                  if s.envelope.group in within and member.reads(s.envelope.group))


def add_member(team: Verified, card: Card, role: str, groups: Iterable[str],
               actor: Actor) -> Files:
    member = Member(card.name, role, tuple(sorted(set(groups))), card.age, card.sign)
    return change_roster(team, actor, members={**team.roster.members, card.name: member})


def remove_member(team: Verified, name: str, actor: Actor) -> Files:
    gone = team.roster.members[name]
    members = {n: m for n, m in team.roster.members.items() if n != name}
    refs = tuple(readable_refs(team, gone))
    exposure = Exposure(name, team.roster.generation + 1, "removed", refs)
    return change_roster(team, actor, members=members, exposed=[exposure] if refs else [])


def set_groups(team: Verified, name: str, groups: Iterable[str], actor: Actor) -> Files:
    """Grant or revoke: the member's groups become `groups`; a group taken away records its
    refs as exposed (to rotate), as a removal does."""
    member = team.roster.members[name]
    new = dataclasses.replace(member, groups=tuple(sorted(set(groups))))
    lost = [g for g in member.groups if g not in new.groups]
    refs = readable_refs(team, member, lost) if member.role != "admin" else []
    exposure = Exposure(name, team.roster.generation + 1, "revoked", tuple(refs))
    return change_roster(team, actor, members={**team.roster.members, name: new},
                         exposed=[exposure] if refs else [])
