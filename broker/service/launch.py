"""Launching with secrets: the values `exec` and `inject` hand out, and the profiles whose
grants allow them; every value handed out is audited first, every refusal too."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from broker.core.errors import SecretNotFound
from broker.core.refs import parse_ref
from broker.service.context import Context
from broker.service.secrets import Secrets

if TYPE_CHECKING:
    from broker.service.profiles import Profile


class Launch:
    """Values and profiles for a process about to start, as the context's actor."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def resolve_for(self, refs: Iterable[str], event: str, consumer: str | None = None,
                    env: Mapping[str, str] | None = None) -> dict[str, str]:
        """ref -> value for every ref, or nothing: all missing refs are named at once.

        One `event` per ref is audited (never a value) before any value is handed back;
        `env` (ref -> variable names) records where exec puts each one.
        """
        secrets = Secrets(self.ctx)
        wanted = list(dict.fromkeys(parse_ref(ref) for ref in refs))
        local, served = wanted, {}
        if self.ctx.session.config.teams:  # only then pay for the team modules (age, nacl)
            from broker.service.team import Teams

            teams = Teams(self.ctx)
            local = teams.split_refs(wanted)[0]
            served = teams.values(r for r in wanted if r not in local)
        missing = [ref for ref in local if self.ctx.metadata.find(ref) is None]
        if missing:
            raise SecretNotFound(f"no secret {', '.join('@' + r for r in missing)}; "
                                 "see `secret-broker list`")
        values = {ref: secrets.value(ref) for ref in local} | served
        for ref in wanted:
            self.ctx.record(event, secret_ref=ref, consumer=consumer,
                            env=None if env is None else env[ref], outcome="allowed")
            if ref in local:
                secrets.touch(ref)
        return values

    def authorized_profile(self, name: str) -> Profile:
        """A profile whose consumer holds an env grant for each of its refs.

        Deny by default: each refused ref is audited, then the launch is refused as a
        whole, naming the grants to add.
        """
        # Imported here: a plain `exec` needs neither profiles nor the grants loader.
        from broker.service.profiles import denied, env_denials, find_profile, load_profiles
        from grants import load_grants

        profile = find_profile(load_profiles(self.ctx.home.profiles), name, self.ctx.home.profiles)
        denials = env_denials(profile, load_grants(self.ctx.home.grants))
        for ref, reason in denials.items():
            self.ctx.record("secret.exec", secret_ref=ref, consumer=profile.consumer,
                        delivery="env", outcome="denied", reason=reason)
        if denials:
            raise denied(profile, denials, self.ctx.home.grants)
        return profile

