"""One small exception hierarchy for the whole broker.

Each class carries its HTTP status, its JSON `code` and its CLI exit code, so the mapping
lives in the class and is applied in exactly two places: `cli.main()` and the daemon's
error middleware. Messages name the ref, file and fix, never a value.
"""

from __future__ import annotations


class BrokerError(Exception):
    code = "broker_error"
    status = 500
    exit_code = 1

    def __init__(self, message: str, *, code: str | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Why, where that names this machine's files: the daemon tells its owner, and logs it
        # for a consumer instead (the CLI, the owner's own, prints it).
        self.detail = detail
        if code is not None:
            self.code = code


class UsageError(BrokerError):
    """Bad input from the caller: a malformed ref, flag or request body."""

    code = "invalid_request"
    status = 400
    exit_code = 2


class ConfigError(BrokerError):
    """A config, grants or profile file that cannot be used."""

    code = "config_invalid"


class InsecureFile(BrokerError):
    """A token, vault or audit file readable by group or others."""

    code = "insecure_file"


class NotInitialized(BrokerError):
    code = "not_initialized"


class NotFound(BrokerError):
    """Something named does not exist (a secret, token, lease)."""

    code = "not_found"
    status = 404
    exit_code = 3


class SecretNotFound(NotFound):
    code = "secret_not_found"


class SecretExists(BrokerError):
    code = "secret_exists"
    status = 409


class ReadOnlyBackend(BrokerError):
    """A write to a ref that a team vault serves: it changes only through `team set`."""

    code = "read_only_backend"
    status = 409


class Denied(BrokerError):
    """A grant (or the lack of one) refuses the request."""

    code = "grant_denied"
    status = 403
    exit_code = 4


class UnlockFailed(BrokerError):
    """The store cannot be unlocked or a value cannot be decrypted."""

    code = "unlock_failed"
    status = 503
    exit_code = 5


class TeamInvalid(BrokerError):
    """A team vault's commit fails verification (integrity or rollback), or a value in it
    cannot be decrypted with this member's identity. The message names the file and rule."""

    code = "team_invalid"
    status = 503
    exit_code = 5


class GitFailed(BrokerError):
    """git refused (a dirty checkout, a non-fast-forward, a rejected push) or is missing.
    `transient`: a lock file or a timeout, worth trying again later."""

    code = "git_failed"

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class KeychainUnavailable(BrokerError):
    code = "keychain_unavailable"
    status = 503
    exit_code = 5


class BrokerNotRunning(BrokerError):
    code = "broker_not_running"
    status = 503
    exit_code = 6


class AuditUnavailable(BrokerError):
    """The decision could not be recorded, so the action is refused."""

    code = "audit_unavailable"
    status = 503


class Unauthorized(BrokerError):
    code = "unauthorized"
    status = 401
    exit_code = 4

    def __init__(self, message: str, *, code: str | None = None,
                 token_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.token_id = token_id  # a known (revoked or expired) token, for the audit


class Forbidden(BrokerError):
    """Refused before any grant is looked at (foreign Host, Origin, wrong token kind)."""

    code = "forbidden"
    status = 403
    exit_code = 4


class BudgetExceeded(BrokerError):
    code = "budget_exceeded"
    status = 429
    exit_code = 4


class RouteNotFound(BrokerError):
    code = "route_not_found"
    status = 404


class MethodNotAllowed(BrokerError):
    code = "method_not_allowed"
    status = 405


class BodyTooLarge(BrokerError):
    code = "body_too_large"
    status = 413


class SecretUnavailable(BrokerError):
    code = "secret_unavailable"
    status = 503


class UpstreamUnreachable(BrokerError):
    code = "upstream_unreachable"
    status = 502


class UpstreamTimeout(BrokerError):
    code = "upstream_timeout"
    status = 504
