"""Every change a member makes to a team: roster, groups, secrets, re-encryption. Each is
computed as file contents (`team.edit`) and committed through `Teams.commit`, which
verifies it first; each is one commit, audited in the home that made it."""

from __future__ import annotations

from collections.abc import Iterable

from broker.core.errors import NotFound, SecretNotFound, UsageError
from broker.service.team import Checkout, Teams, check_name
from broker.team import edit
from broker.team.format import ROLES, FormatError, Member, parse_card
from broker.team.keys import card_is_genuine


class TeamChanges:
    """Every change a member can make, each one commit, each audited in this home."""

    def __init__(self, teams: Teams, checkout: Checkout) -> None:
        self.teams, self.checkout = teams, checkout
        self.name = checkout.config.name

    def _admin(self) -> None:
        me = self.checkout.me
        if me is None or me.role != "admin":
            raise UsageError(f"only an admin of team {self.name} can change its roster")

    def _writer(self, group: str) -> None:
        me = self.checkout.me
        if me is None or not me.writes(group):
            raise UsageError(f"you cannot write group {group} of team {self.name}: ask an "
                             "admin (`team grant NAME GROUP` gives writers a group)")

    def add_member(self, name: str, card_text: str, role: str, groups: Iterable[str]) -> str:
        self._admin()
        checkout = self.checkout
        try:
            card = parse_card(card_text)
        except FormatError as exc:
            raise UsageError(f"this is not a member card: {exc.detail}") from None
        if card.name != name:
            raise UsageError(f"the card is {card.name}'s, not {name}'s: check who sent it")
        if not card_is_genuine(card):
            raise UsageError(f"the card of {card.name} fails its self-signature: ask them to "
                             "send it again (`secret-broker team card`)")
        if role not in ROLES:
            raise UsageError(f"--role must be one of {', '.join(ROLES)}")
        roster = checkout.team.roster
        if card.name in roster.members:
            raise UsageError(f"{card.name} is already a member; `team grant` changes groups")
        groups = list(groups)
        self.require_groups( groups)
        change = edit.add_member(checkout.team, card, role, groups, self.teams.actor(checkout))
        return self.teams.commit(checkout, change, f"team: add {card.name} ({role})",
                           "team.member_added", member=card.name, role=role, groups=groups)

    def require_groups(self, groups: Iterable[str]) -> None:
        checkout = self.checkout
        known = checkout.team.roster.groups
        for group in groups:
            if group not in known:
                raise UsageError(f"team {checkout.config.name} has no group {group!r}; groups: "
                                 f"{', '.join(known) or 'none yet (`team group add G`)'}")

    def require_member(self, name: str) -> Member:
        checkout = self.checkout
        member = checkout.team.roster.members.get(name)
        if member is None:
            raise NotFound(f"team {checkout.config.name} has no member {name!r}; members: "
                           f"{', '.join(sorted(checkout.team.roster.members))}")
        return member

    def remove_member(self, name: str) -> tuple[str, list[str]]:
        self._admin()
        member = self.require_member(name)
        if member.role == "admin" and sum(
                m.role == "admin" for m in self.checkout.team.roster.members.values()) == 1:
            raise UsageError(f"{name} is the last admin: add another admin first")
        refs = edit.readable_refs(self.checkout.team, member)
        commit = self.teams.commit(
            self.checkout, edit.remove_member(self.checkout.team, name,
                                              self.teams.actor(self.checkout)),
            f"team: remove {name}", "team.member_removed", member=name, refs=refs)
        return commit, refs

    def set_groups(self, name: str, group: str, grant: bool) -> tuple[str, list[str]]:
        self._admin()
        self.require_groups([group])
        member = self.require_member(name)
        groups = set(member.groups) | {group} if grant else set(member.groups) - {group}
        lost = [] if grant or member.role == "admin" else [group]
        refs = edit.readable_refs(self.checkout.team, member, lost) if lost else []
        change = edit.set_groups(self.checkout.team, name, groups, self.teams.actor(self.checkout))
        event = "team.granted" if grant else "team.revoked"
        commit = self.teams.commit(self.checkout, change,
                                   f"team: {'grant' if grant else 'revoke'} {name} {group}",
                                   event, member=name, group=group, refs=refs)
        return commit, refs

    def group(self, group: str, add: bool) -> str:
        self._admin()
        check_name("group", group)
        roster = self.checkout.team.roster
        if add:
            if group in roster.groups:
                raise UsageError(f"team {self.name} has a group {group} already")
            groups = [*roster.groups, group]
        else:
            self.require_groups([group])
            used = [r for r, s in self.checkout.team.secrets.items() if s.envelope.group == group]
            members = [m.name for m in roster.members.values() if group in m.groups]
            if used or members:
                raise UsageError(f"group {group} still holds {len(used)} secret(s) and "
                                 f"{len(members)} member(s): `team rm` and `team revoke` them "
                                 "first")
            groups = [g for g in roster.groups if g != group]
        change = edit.change_roster(self.checkout.team, self.teams.actor(self.checkout),
                                    groups=groups)
        return self.teams.commit(self.checkout, change,
                                 f"team: {'add' if add else 'remove'} group {group}",
                                 "team.group_added" if add else "team.group_removed",
                                 group=group)

    def set_secret(self, ref: str, group: str, provider: str, kind: str, value: str) -> str:
        self.require_groups([group])
        self._writer(group)
        if not value:
            raise UsageError("the value is empty; nothing was stored")
        team = self.checkout.team
        existed = ref in team.secrets
        try:
            change = edit.set_secret(team, group, ref, value, self.teams.actor(self.checkout),
                                     provider=provider, kind=kind)
        except FormatError as exc:
            raise UsageError(exc.detail) from None
        return self.teams.commit(self.checkout, change, f"team: {'rotate' if existed else 'add'} "
                                 f"@{ref}", "secret.rotated" if existed else "secret.added",
                                 secret_ref=ref, group=group)

    def remove_secret(self, ref: str) -> str:
        secret = self.checkout.team.secrets.get(ref)
        if secret is None:
            raise SecretNotFound(f"team {self.name} has no secret @{ref}")
        self._writer(secret.envelope.group)
        change = edit.remove_secret(self.checkout.team, ref, self.teams.actor(self.checkout))
        return self.teams.commit(self.checkout, change, f"team: remove @{ref}", "secret.removed",
                                 secret_ref=ref, group=secret.envelope.group)

    def rekey(self, group: str | None) -> str | None:
        if group is None:
            self._admin()
        else:
            self.require_groups([group])
            self._writer(group)
        team = self.checkout.team
        change = edit.rekey(team, team.roster, self.teams.actor(self.checkout),
                            None if group is None else [group])
        if not change:
            return None
        return self.teams.commit(self.checkout, change, "team: re-encrypt to the roster",
                                 "team.rekeyed", group=group, count=len(change) // 2)
