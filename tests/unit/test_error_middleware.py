"""The error middleware maps every exception: an unforeseen one is a JSON 500 with a request id."""

from __future__ import annotations

import sqlite3

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from broker.server.middlewares import REQUEST_ID, errors_middleware
from broker.server.state import SERVER, ServerInfo

DETAIL = "no such table: secrets_canary_detail"


async def _fails(request: web.Request) -> web.Response:
    raise sqlite3.OperationalError(DETAIL)


async def test_unforeseen_exception_is_json_500_with_request_id() -> None:
    """A sqlite3 error in a handler: JSON `internal_error`, the id in body and header, the
    traceback logged once under that id, the exception's text neither sent nor logged."""
    app = web.Application(middlewares=[errors_middleware])
    app[SERVER] = ServerInfo("127.0.0.1:0")
    app.router.add_get("/v1/boom", _fails)
    with capture_logs() as logged:
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/v1/boom")
            body = await response.json()
            text = await response.text()
    assert response.status == 500
    assert response.headers["Content-Type"] == "application/json"
    assert body["error"]["code"] == "internal_error"
    request_id = response.headers[REQUEST_ID]
    assert request_id and request_id in body["error"]["message"]
    assert DETAIL not in text and "sqlite" not in text.lower()
    failures = [e for e in logged if e["event"] == "request.failed"]
    assert len(failures) == 1
    assert failures[0]["request_id"] == request_id
    assert failures[0]["error"] == "OperationalError" and "_fails" in failures[0]["traceback"]
    assert DETAIL not in repr(logged)
    assert app[SERVER].requests["500"] == 1
