"""Queries over what a home has recorded: audit events (read, verified, resealed) and usage
rows, for the CLI (`audit`, `usage`) and the admin API alike."""

from __future__ import annotations

from typing import Any

from broker.core.clock import utc_day
from broker.core.errors import UsageError
from broker.core.home import check_private
from broker.core.refs import parse_ref
from broker.gateway.usage import DIMENSIONS, UsageRow, group
from broker.service.context import Context
from broker.store import audit


class Queries:
    """The audit log and usage of one home, read as the context's actor."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def audit_events(self, *, ref: str | None = None, event: str | None = None,
                     since: str | None = None, limit: int | None = None
                     ) -> list[dict[str, Any]]:
        """Matching events, newest last (the last `limit` of them)."""
        path = self.ctx.home.audit
        check_private(path)
        ref = parse_ref(ref) if ref else None
        after = audit.parse_since(since) if since else None
        if not limit:
            return [e for e in audit.read_events(path)
                    if audit.matches(e, ref=ref, event=event, since=after)]
        newest: list[dict[str, Any]] = []  # read from the end: memory bounded by `limit`
        for e in audit.read_events(path, newest_first=True):
            if audit.matches(e, ref=ref, event=event, since=after):
                newest.append(e)
                if len(newest) == limit:
                    break
        return newest[::-1]

    def verify_audit(self) -> audit.Verdict:
        path = self.ctx.home.audit
        check_private(path)
        with audit.appends_held(path) as size:
            checkpoint = self.ctx.metadata.checkpoint()
        return audit.verify(audit.read_lines(path, size), self.ctx.session.derived_key("audit-log"),
                            checkpoint)

    def reseal_audit(self) -> audit.Verdict:
        """Trust the log as it is now: when every line's MAC and the chain hold, seal a new
        checkpoint at its end and record that this was done (a deliberate owner's act)."""
        path = self.ctx.home.audit
        check_private(path)
        key = self.ctx.session.derived_key("audit-log")
        # Held throughout: a checkpoint sealed at the end must not fall behind an append.
        with audit.appends_held(path) as size:
            verdict, checkpoint = audit.resealed(audit.read_lines(path, size), key)
            if not verdict.ok:
                return verdict
            self.ctx.metadata.replace_checkpoint(checkpoint)
        self.ctx.record("audit.resealed", count=verdict.checked)
        return verdict

    def usage(self, *, since: str | None = None, by: str | None = None,
              consumer: str | None = None) -> list[UsageRow]:
        """Usage rows since a day (or a duration ago), added up over the `by` dimensions."""
        dims = tuple(d.strip() for d in by.split(",")) if by else DIMENSIONS
        unknown = [d for d in dims if d not in DIMENSIONS]
        if unknown:
            raise UsageError(f"cannot group usage by {', '.join(unknown)}: use "
                             f"{', '.join(DIMENSIONS)}")
        day = None
        if since:
            day = utc_day(audit.parse_since(since))
        return group(self.ctx.metadata.usage(day, consumer), dims)
