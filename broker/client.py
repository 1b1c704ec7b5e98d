"""A small synchronous client for the daemon, for the CLI and for sibling services.

Stdlib only (no aiohttp import), so a service can `resolve("@ref")` cheaply:

    from broker.client import BrokerClient
    key = BrokerClient.from_env().resolve("@openai_api_key", purpose="llm.chat")

It finds the daemon by `SECRET_BROKER_URL` (`http://127.0.0.1:18443` or
`unix:///path/broker.sock`) and `SECRET_BROKER_TOKEN`, else by the home's socket.
Errors are the broker's own typed exceptions, with the CLI's exit codes.

A token goes only where it cannot be read on the way or collected by someone else: a
loopback host over plain HTTP, or the Unix socket; and over TCP only to a listener of this
user's uid (any local user can listen on the port while the broker is down). An answer
other than 2xx is an error: a redirect is never followed.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.core import errors, netowner
from broker.core.home import Home
from broker.core.loopback import is_loopback_host

URL_FORMS = ("http://127.0.0.1:PORT (any loopback host: 127.0.0.0/8, [::1] or localhost) "
             "or unix:///path/to/broker.sock")

_BY_CODE: dict[str, type[errors.BrokerError]] = {
    "unauthorized": errors.Unauthorized,
    "grant_denied": errors.Denied,
    "secret_not_found": errors.SecretNotFound,
    "secret_exists": errors.SecretExists,
    "invalid_request": errors.UsageError,
    "audit_unavailable": errors.AuditUnavailable,
    "secret_unavailable": errors.SecretUnavailable,
    "route_not_found": errors.RouteNotFound,
    "owner_only": errors.Forbidden,
    "consumer_mismatch": errors.Forbidden,
    "host_header_refused": errors.Forbidden,
    "origin_not_allowed": errors.Forbidden,
    "token_not_found": errors.NotFound,
    "lease_not_found": errors.NotFound,
}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class _OwnTcpConnection(http.client.HTTPConnection):
    """Connects, then sends nothing until the kernel shows that the end it reached is a
    socket of this user's uid (where it can tell: Linux)."""

    def connect(self) -> None:
        super().connect()
        uid = netowner.far_end_uid(self.sock.getsockname(), self.sock.getpeername())
        if uid is not None and uid != os.getuid():
            self.sock.close()
            who = ("an unknown user" if uid == netowner.UNSHOWN
                   else f"uid {uid}, not yours ({os.getuid()})")
            raise errors.BrokerNotRunning(
                f"nothing was sent to port {self.port}: the socket listening there belongs to "
                f"{who}, so it is not your broker (is it down, and another user took its "
                "port?). Start it with `secret-broker start`, or use its Unix socket "
                "(SECRET_BROKER_URL=unix:///path/to/broker.sock)", code="port_not_owned")


def parse_url(url: str) -> tuple[str, int] | Path:
    """`unix:///path` as the socket's path, `http://LOOPBACK:PORT` as (host, port); anything
    else is refused, so a token is never sent in plaintext off this machine, nor to a URL
    whose scheme or path would be silently dropped."""
    parts = urlsplit(url)

    def refuse(why: str) -> errors.ConfigError:
        return errors.ConfigError(f"SECRET_BROKER_URL is not accepted ({why}): use {URL_FORMS}")

    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/") or parts.query or parts.fragment:
            raise refuse("a unix URL is unix:// and an absolute path, nothing else")
        return Path(parts.path)
    if parts.scheme != "http":
        raise refuse(f"the scheme must be http or unix, not {parts.scheme or 'none'}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise refuse("it must not carry a path, query, fragment or user name")
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        loopback, port = False, None
    else:
        loopback = is_loopback_host(host)
    if not loopback:
        raise refuse("the host must be a loopback address; a token is never sent off this "
                     "machine, where it could be read on the way")
    if port is None:
        raise refuse("it must name the port")
    return host, port


class BrokerClient:
    def __init__(self, *, socket_path: Path | None = None, url: str | None = None,
                 token: str | None = None, timeout: float = 30.0) -> None:
        if socket_path is None and url is None:
            raise ValueError("give socket_path or url")
        target = parse_url(url) if socket_path is None and url is not None else socket_path
        self._socket = target if isinstance(target, Path) else None
        self._tcp = target if isinstance(target, tuple) else None
        self._url = url
        self._token = token
        self._timeout = timeout

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 home: Home | None = None, timeout: float = 30.0) -> BrokerClient:
        env = os.environ if environ is None else environ
        token = env.get("SECRET_BROKER_TOKEN")
        url = env.get("SECRET_BROKER_URL")
        if url:
            return cls(url=url, token=token, timeout=timeout)
        return cls(socket_path=(home or Home.from_env(dict(env))).socket, token=token,
                   timeout=timeout)

    @property
    def where(self) -> str:
        return f"unix:{self._socket}" if self._socket is not None else str(self._url)

    def _connection(self) -> http.client.HTTPConnection:
        if self._socket is not None:
            return _UnixConnection(str(self._socket), self._timeout)
        host, port = self._tcp or ("127.0.0.1", 0)
        return _OwnTcpConnection(host, port, timeout=self._timeout)

    def exchange(self, method: str, path: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, limit: int | None = None
                 ) -> tuple[int, dict[str, str], bytes]:
        """One request, answered as it came: status, headers (lower-case names) and the
        body, of which at most `limit` bytes are read (the rest is dropped unread)."""
        sent = dict(headers or {})
        if self._token:
            sent["Authorization"] = f"Bearer {self._token}"
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            raw = response.read() if limit is None else response.read(limit)
        except (FileNotFoundError, ConnectionRefusedError):
            raise errors.BrokerNotRunning(
                f"the broker is not running ({self.where}); start it with "
                "`secret-broker start`") from None
        except OSError as exc:
            raise errors.BrokerNotRunning(
                f"cannot talk to the broker at {self.where}: {exc.strerror or exc}") from None
        except http.client.HTTPException as exc:  # e.g. an answer cut off mid-stream
            raise errors.BrokerError(f"the answer from the broker at {self.where} was cut off "
                                     f"({type(exc).__name__})") from None
        finally:
            conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, raw

    def request(self, method: str, path: str, body: Any = None,
                headers: Mapping[str, str] | None = None) -> Any:
        sent = {"Accept": "application/json", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        status, _headers, raw = self.exchange(method, path, data, sent)
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = {}
        if not 200 <= status < 300:  # a redirect included: never followed
            err = doc.get("error", {}) if isinstance(doc, dict) else {}
            code = str(err.get("code", "broker_error"))
            message = str(err.get("message", f"HTTP {status}"))
            error = _BY_CODE.get(code, errors.BrokerError)(message, code=code)
            error.status = status
            raise error
        return doc

    def health(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/health"))

    def status(self) -> dict[str, Any]:
        return dict(self.request("GET", "/v1/status"))

    def lease(self, ref: str, purpose: str, delivery: str = "native",
              consumer: str | None = None) -> dict[str, Any]:
        headers = {"X-Broker-Consumer": consumer} if consumer else None
        body = {"secret_ref": ref.lstrip("@"), "purpose": purpose, "delivery": delivery}
        return dict(self.request("POST", "/v1/leases", body, headers))

    def resolve(self, ref: str, purpose: str, consumer: str | None = None) -> str:
        """The value of `@ref` through a `native` lease (a grant must allow it)."""
        return str(self.lease(ref, purpose, "native", consumer)["value"])

    def leases(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/leases")["leases"])

    def revoke(self, lease_id: str) -> None:
        self.request("DELETE", f"/v1/leases/{lease_id}")
