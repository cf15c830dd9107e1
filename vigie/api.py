"""The admin API: the same operations as `vigie override` and `vigie usage`, over HTTP, for a school portal or a
teacher's app. Every request carries `Authorization: Bearer <token>` (the token file is created 0600 on first
start); it listens on loopback unless `server.api.listen` says otherwise.

  GET    /v1/overrides                    the overrides in force
  POST   /v1/overrides                    {"action": "allow|block|lock", "group", "device", "domain", "for": "45m",
                                           "note", "author"} → 201 and the override
  DELETE /v1/overrides/<id>               end it now → 200 and the override, 404 if not in force
  GET    /v1/usage[?day=YYYY-MM-DD][&devices=1]   minutes per group (and per device on request)
Errors are JSON `{"error": "..."}`: 400 bad request, 401 no or wrong token, 404, 503 state store unreachable.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from datetime import UTC, date, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

from blocklists.errors import VigieError
from policy.model import Rules, SocketAddress
from policy.state import OverrideKind
from policy.state_store import OverrideNotFound, StateStore, StoreUnavailable, override_to_json
from vigie.overrides import OverrideRefused, OverrideRequest, budgets_now, make_override, report_to_json, usage_report

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 * 1024
MAX_CONNECTIONS = 64  # admin tools and the teacher page: a handful at once
IDLE_SECONDS = 10.0


def ensure_token(path: Path) -> str:
    """The API token: read from `path`, or created there (random, mode 0600) when missing."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if len(token) < 16:
            raise VigieError(f"{path}: the API token must be at least 16 characters (delete the file to have "
                             "Vigie create one)") from None
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users: chmod 600 %s", path, path)
        return token
    except OSError as exc:
        raise VigieError(f"cannot create the API token file {path}: {exc}") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w") as file:
        file.write(token + "\n")
    log.info("API token created in %s", path)
    return token


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most MAX_CONNECTIONS at once (more are closed at once), each closed after
    IDLE_SECONDS without a request: a client that opens connections and says nothing holds nothing for long."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Ipv6Server(_Server):
    address_family = socket.AF_INET6


class _ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminApi:
    def __init__(self, listen: SocketAddress, token: str, rules: Callable[[], Rules],
                 open_store: Callable[[], StateStore]) -> None:
        self.token = token
        self.rules = rules
        self._open_store = open_store
        self._store: StateStore | None = None
        self._store_lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "vigie-api"
            timeout = IDLE_SECONDS

            def do_GET(self) -> None:
                api.handle(self, "GET")

            def do_POST(self) -> None:
                api.handle(self, "POST")

            def do_DELETE(self) -> None:
                api.handle(self, "DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("api: " + format, *args)

        try:
            self.server = (_Ipv6Server if listen.is_ipv6 else _Server)((listen.host, listen.port), Handler)
        except OSError as exc:
            raise VigieError(f"admin API: cannot listen on {listen}: {exc} (server.api.listen)") from None
        self._thread = threading.Thread(target=self.server.serve_forever, name="vigie-api", daemon=True)

    @property
    def store(self) -> StateStore:
        """Opened at first use: a store that is away at start makes the API answer 503, not the service fail."""
        with self._store_lock:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._store is not None:
            self._store.close()

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        try:
            self._authorize(request)
            status, body = self._route(request, method)
        except _ApiError as exc:
            status, body = exc.status, {"error": str(exc)}
        except OverrideRefused as exc:
            status, body = HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        except OverrideNotFound as exc:
            status, body = HTTPStatus.NOT_FOUND, {"error": str(exc)}
        except StoreUnavailable as exc:
            status, body = HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)}
        except Exception:
            log.exception("admin API: internal error")
            status, body = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error (see the service's log)"}
        payload = json.dumps(body, ensure_ascii=False).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json; charset=utf-8")
        request.send_header("Content-Length", str(len(payload)))
        request.send_header("Cache-Control", "no-store")
        if status == HTTPStatus.UNAUTHORIZED:
            request.send_header("WWW-Authenticate", 'Bearer realm="vigie"')
        request.end_headers()
        request.wfile.write(payload)

    def _authorize(self, request: BaseHTTPRequestHandler) -> None:
        scheme, _, given = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise _ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong token (Authorization: Bearer <token from "
                            "server.api.token_file>)")

    def _route(self, request: BaseHTTPRequestHandler, method: str) -> tuple[HTTPStatus, Any]:
        url = urlsplit(request.path)
        parts = [p for p in url.path.split("/") if p]
        if parts[:2] == ["v1", "overrides"] and len(parts) == 2:
            if method == "GET":
                return HTTPStatus.OK, [override_to_json(o) for o in self.store.overrides(datetime.now(UTC))]
            if method == "POST":
                return HTTPStatus.CREATED, self._add(self._body(request))
        elif parts[:2] == ["v1", "overrides"] and len(parts) == 3 and method == "DELETE":
            cleared = self.store.clear_override(parts[2])
            log.info("override %s cleared through the API (%s)", cleared.id, cleared.describe())
            return HTTPStatus.OK, override_to_json(cleared)
        elif parts == ["v1", "usage"] and method == "GET":
            return HTTPStatus.OK, self._usage(parse_qs(url.query))
        else:
            raise _ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {method} {url.path} (see /v1/overrides, "
                            "/v1/usage)")
        raise _ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {url.path}")

    @staticmethod
    def _body(request: BaseHTTPRequestHandler) -> dict[str, Any]:
        try:
            length = int(request.headers.get("Content-Length") or 0)
        except ValueError:
            raise _ApiError(HTTPStatus.BAD_REQUEST, "bad Content-Length") from None
        if not 0 < length <= MAX_BODY_BYTES:
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"send a JSON object of at most {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(request.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            raise _ApiError(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None
        except RecursionError:
            raise _ApiError(HTTPStatus.BAD_REQUEST, "the body is nested too deeply: send a flat JSON object") from None
        if not isinstance(body, dict):
            raise _ApiError(HTTPStatus.BAD_REQUEST, "send a JSON object")
        if any(isinstance(value, dict | list) for value in body.values()):
            raise _ApiError(HTTPStatus.BAD_REQUEST, "send a flat JSON object (strings and numbers as values)")
        return body

    def _add(self, body: dict[str, Any]) -> dict[str, Any]:
        def text(name: str, required: bool = False) -> str | None:
            value = body.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str):
                raise _ApiError(HTTPStatus.BAD_REQUEST, f"{name!r} must be a string")
            return value

        unknown = set(body) - {"action", "group", "device", "domain", "for", "note", "author"}
        if unknown:
            raise _ApiError(HTTPStatus.BAD_REQUEST, f"unknown field(s): {', '.join(sorted(unknown))}")
        try:
            kind = OverrideKind(text("action", required=True))
        except ValueError:
            raise _ApiError(HTTPStatus.BAD_REQUEST, "'action' is one of: allow, block, lock") from None
        request = OverrideRequest(kind, text("group"), text("device"), text("domain"),
                                  text("for", required=True) or "", text("note") or "", text("author") or "")
        override = make_override(request, self.rules(), datetime.now(UTC))
        self.store.add_override(override)
        log.info("override %s added through the API: %s", override.id, override.describe())
        return override_to_json(override)

    def _usage(self, query: dict[str, list[str]]) -> dict[str, object]:
        rules = self.rules()
        now = datetime.now(UTC)
        try:
            day = date.fromisoformat(query["day"][0]) if "day" in query else \
                now.astimezone(ZoneInfo(rules.timezone)).date()
        except ValueError:
            raise _ApiError(HTTPStatus.BAD_REQUEST, "day is YYYY-MM-DD") from None
        with_devices = query.get("devices", ["0"])[0] in ("1", "true", "yes")
        report = usage_report(rules, self.store.usage(day), day, budgets_now(rules, now), with_devices=with_devices)
        return report_to_json(report)
