"""Talks to the server's /api/v1: over the unix socket (trusted, no key) when `cli.address`
is empty, else to `cli.address` with `Authorization: Bearer <cli.api_key>` (a bare host:port
means https://, as Headscale's CLI)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from pyheadscale.config import Config

ERR_API_KEY_NOT_SET = "HEADSCALE_CLI_API_KEY environment variable needs to be set"


class ConnectError(Exception):
    """The server could not be reached (or the client is misconfigured)."""


class APIFailure(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("local", timeout=timeout)
        self.path_ = path

    def connect(self) -> None:
        # The server may still be starting: retry with backoff (50ms -> 1s) until the timeout.
        deadline = time.monotonic() + (self.timeout or 5)
        delay = 0.05
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path_)
                self.sock = s
                return
            except PermissionError as e:
                s.close()
                raise ConnectError(
                    f"unable to read/write to headscale socket {self.path_!r}, do you have the "
                    f"correct permissions? {e}") from None
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                if time.monotonic() + delay > deadline:
                    raise ConnectError(f"connecting to {self.path_}: {e}") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)


class Client:
    def __init__(self, *, unix_socket: str = "", address: str = "", api_key: str = "",
                 timeout: float = 5.0, insecure: bool = False) -> None:
        self.unix_socket = unix_socket
        self.address = address.strip()
        self.api_key = api_key
        self.timeout = timeout or 5.0
        self.insecure = insecure
        if self.address and not self.api_key:
            raise ConnectError(ERR_API_KEY_NOT_SET)

    @classmethod
    def from_config(cls, cfg: Config) -> Client:
        c = cfg.cli
        return cls(unix_socket=cfg.unix_socket, address=c.address, api_key=c.api_key,
                   timeout=c.timeout.total_seconds(), insecure=c.insecure)

    def _connection(self) -> tuple[http.client.HTTPConnection, str]:
        if not self.address:
            return _UnixConnection(self.unix_socket, self.timeout), ""
        url = self.address if "://" in self.address else f"https://{self.address}"
        u = urlsplit(url)
        if u.scheme == "https":
            ctx = ssl.create_default_context()
            if self.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                u.netloc, timeout=self.timeout, context=ctx)
        elif u.scheme == "http":
            conn = http.client.HTTPConnection(u.netloc, timeout=self.timeout)
        else:
            raise ConnectError(f"unsupported cli.address scheme {u.scheme!r}")
        return conn, u.path.rstrip("/")

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, Any] | None = None) -> Any:
        conn, base = self._connection()
        target = base + path
        q = {k: v for k, v in (query or {}).items() if v not in (None, "")}
        if q:
            target += "?" + urlencode(q)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.address:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, target, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except ConnectError:
            raise
        except (OSError, http.client.HTTPException) as e:
            where = self.address or self.unix_socket
            raise ConnectError(f"connecting to {where}: {e}") from None
        finally:
            conn.close()
        if resp.status == 401:
            raise APIFailure(401, "Unauthorized")
        try:
            payload = json.loads(raw) if raw.strip() else {}
        except ValueError:
            payload = None
        if not 200 <= resp.status < 300:
            msg = payload.get("message") if isinstance(payload, dict) else None
            raise APIFailure(resp.status, msg or raw.decode(errors="replace").strip()
                             or f"HTTP {resp.status}")
        if payload is None:
            raise APIFailure(resp.status, "invalid JSON in the server's answer")
        return payload


def seg(s: str) -> str:
    """One path segment, escaped."""
    return quote(s, safe="")
