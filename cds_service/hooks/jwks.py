"""A trusted issuer's public keys (its JWKS), fetched within a hard deadline and cached.

The JWKS endpoint is the EHR's, but it can be slow, down or trickling: no hook call may wait on it
for long, and no caller may make the service hammer it.

- One fetch has one deadline (JWKS_TIMEOUT_S) for everything it does on the socket — connect, TLS
  handshake, request, headers, body. `requests`-style timeouts bound each read only, so an endpoint
  sending a byte a second would hold a call for as long as it liked; here each blocking socket call
  waits at most for what is left of the deadline.
- At most one fetch per issuer runs at a time. While it runs, other callers use the keys already
  cached (a caller with no keys at all waits for that fetch, within its deadline).
- A fetch is tried at most once per JWKS_REFRESH_COOLDOWN_S, counted from the end of the previous
  attempt, successful or not: a forged token's unknown `kid` (the attacker's choice) costs the EHR
  at most one request per cooldown, whatever the number of such tokens.
- Keys are fresh for JWKS_LIFESPAN_S; then the next call refreshes them. While refreshing fails the
  last keys stay in use, for at most JWKS_STALE_MAX_S (an EHR outage must not lock every client out,
  nor a key the EHR withdrew stay trusted for long).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from jwt import PyJWK, PyJWKSet
from jwt.exceptions import PyJWKError, PyJWKSetError

JWKS_LIFESPAN_S = 300.0
JWKS_REFRESH_COOLDOWN_S = 30.0
JWKS_TIMEOUT_S = 5.0
JWKS_MAX_BYTES = 256 * 1024
JWKS_STALE_MAX_S = 3600.0


class KeysUnavailable(Exception):
    """No usable keys: the JWKS could not be fetched (the message says why, without upstream text)."""


class UnknownKid(Exception):
    """The issuer's JWKS holds no signing key with this kid."""


class IssuerKeys:
    """The signing keys of one JWKS URL, by kid."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.attempts = 0  # fetches tried (for tests and the curious)
        self._fetch_lock = threading.Lock()
        self._keys: dict[str, PyJWK] | None = None
        self._keys_at = 0.0  # when the fetch that got them ended
        self._attempt_end: float | None = None
        self._error = "not fetched yet"

    def key(self, kid: str) -> PyJWK:
        """The key `kid`; KeysUnavailable or UnknownKid otherwise."""
        keys = self._keys
        if keys is not None and time.monotonic() - self._keys_at < JWKS_LIFESPAN_S and kid in keys:
            return keys[kid]  # the common case: no lock, no fetch
        keys = self._refresh(wait=self._usable() is None)
        if keys is None:
            raise KeysUnavailable(self._error)
        if kid not in keys:
            raise UnknownKid(kid)
        return keys[kid]

    def _usable(self) -> dict[str, PyJWK] | None:
        keys = self._keys
        if keys is not None and time.monotonic() - self._keys_at < JWKS_STALE_MAX_S:
            return keys
        return None

    def _refresh(self, *, wait: bool) -> dict[str, PyJWK] | None:
        """Fetch now if no fetch runs and the cooldown is over; the keys to use either way."""
        acquired = (
            self._fetch_lock.acquire(timeout=JWKS_TIMEOUT_S + 1)
            if wait
            else self._fetch_lock.acquire(blocking=False)
        )
        if not acquired:  # another caller is fetching: use what we have meanwhile
            return self._usable()
        try:
            if (
                self._attempt_end is not None
                and time.monotonic() - self._attempt_end < JWKS_REFRESH_COOLDOWN_S
            ):
                return self._usable()
            self.attempts += 1
            try:
                keys = _signing_keys(fetch_json(self.uri))
            except KeysUnavailable as exc:
                self._error = str(exc)
            else:
                self._keys, self._keys_at = keys, time.monotonic()
            finally:
                self._attempt_end = time.monotonic()
            return self._usable()
        finally:
            self._fetch_lock.release()


def _signing_keys(document: Any) -> dict[str, PyJWK]:
    if not isinstance(document, dict):
        raise KeysUnavailable("the JWKS is not a JSON object")
    try:
        jwk_set = PyJWKSet.from_dict(document)
    except (PyJWKSetError, PyJWKError):
        raise KeysUnavailable("the JWKS holds no usable key") from None
    keys = {k.key_id: k for k in jwk_set.keys if k.key_id and k.public_key_use in ("sig", None)}
    if not keys:
        raise KeysUnavailable("the JWKS holds no signing key with a kid")
    return keys


# --- one fetch, one deadline ------------------------------------------------------------------------

_DEADLINE = threading.local()  # the deadline of the fetch running on this thread


def _arm(sock: socket.socket) -> None:
    """Let the next blocking call on `sock` wait only for what is left of this thread's deadline."""
    at: float | None = getattr(_DEADLINE, "at", None)
    if at is None:
        return
    left = at - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    sock.settimeout(left)


class _DeadlineSocket(socket.socket):
    def connect(self, address: Any) -> None:
        _arm(self)
        super().connect(address)

    def recv_into(self, *args: Any, **kwargs: Any) -> int:
        _arm(self)
        return super().recv_into(*args, **kwargs)

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        _arm(self)
        return super().recv(*args, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> int:
        _arm(self)
        return super().send(*args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        _arm(self)
        super().sendall(*args, **kwargs)


class _DeadlineSSLSocket(ssl.SSLSocket):
    def do_handshake(self, *args: Any, **kwargs: Any) -> None:
        _arm(self)
        super().do_handshake(*args, **kwargs)

    def read(self, *args: Any, **kwargs: Any) -> Any:
        _arm(self)
        return super().read(*args, **kwargs)

    def write(self, *args: Any, **kwargs: Any) -> int:
        _arm(self)
        return super().write(*args, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> int:
        _arm(self)
        return super().send(*args, **kwargs)

    def sendall(self, *args: Any, **kwargs: Any) -> None:
        _arm(self)
        super().sendall(*args, **kwargs)


def _resolve(host: str, port: int) -> list[tuple[Any, ...]]:
    """getaddrinfo within what is left of the deadline.

    The system resolver takes no timeout of ours (a DNS server that never answers holds it for its
    own retries, tens of seconds), so it runs on a daemon thread and the fetch stops waiting at the
    deadline. A stuck lookup's thread ends when the resolver gives up; the per-issuer fetch lock and
    cooldown keep such threads to one per issuer at a time.
    """
    at: float | None = getattr(_DEADLINE, "at", None)
    if at is None:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    result: list[Any] = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except OSError as exc:
            result.append(exc)

    worker = threading.Thread(target=lookup, name="jwks-dns", daemon=True)
    worker.start()
    worker.join(max(0.0, at - time.monotonic()))
    if not result:
        raise TimeoutError("name lookup did not finish within the deadline")
    if isinstance(result[0], OSError):
        raise result[0]
    return list(result[0])


def _create_connection(
    address: tuple[str, int], timeout: Any = None, source_address: Any = None
) -> socket.socket:
    """socket.create_connection, with a socket that honours the deadline on every call."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in _resolve(host, port):
        sock = _DeadlineSocket(family, kind, proto)
        try:
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError(f"cannot resolve {host}")


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _create_connection


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _create_connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self) -> None:
        context = ssl.create_default_context()
        context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(context=context)
        self._tls = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_HTTPSConnection, req, context=self._tls)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The JWKS URL is configured; a redirect would let whoever answers there choose another one.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def fetch_json(uri: str) -> Any:
    """The JSON document at `uri`, read within JWKS_TIMEOUT_S in all; KeysUnavailable otherwise.

    The reason names the kind of failure only: what the endpoint sent never reaches the log.
    """
    opener = urllib.request.build_opener(_NoRedirect(), _HTTPHandler(), _HTTPSHandler())
    request = urllib.request.Request(uri, headers={"Accept": "application/json"})
    _DEADLINE.at = time.monotonic() + JWKS_TIMEOUT_S
    try:
        with opener.open(request, timeout=JWKS_TIMEOUT_S) as response:
            body = response.read(JWKS_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise KeysUnavailable(f"cannot fetch {uri}: HTTP {exc.code}") from None
    except TimeoutError:
        raise KeysUnavailable(f"cannot fetch {uri}: not read within {JWKS_TIMEOUT_S:g} s") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # URLError wraps the socket's error; name its kind, not its text
        cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(cause, TimeoutError):
            raise KeysUnavailable(f"cannot fetch {uri}: not read within {JWKS_TIMEOUT_S:g} s") from None
        raise KeysUnavailable(f"cannot fetch {uri}: {type(cause).__name__}") from None
    finally:
        _DEADLINE.at = None
    if len(body) > JWKS_MAX_BYTES:
        raise KeysUnavailable(f"cannot fetch {uri}: JWKS larger than {JWKS_MAX_BYTES} bytes")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise KeysUnavailable(f"cannot fetch {uri}: not JSON") from None
