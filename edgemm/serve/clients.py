"""Slow and greedy clients: a deadline on a request's head and body, and a cap on one client's open connections.

uvicorn sets no time limit on reading a request: a client that sends its headers and then a byte now and then
holds a connection (and a task) as long as it likes, and nothing bounds how many such connections one client
opens. Here:
- BodyDeadline (an ASGI middleware, in every app of create_app) gives a request's whole body
  Limits.body_seconds from the moment its head arrived; past that it is answered 408 in OpenAI's error shape, with
  Connection: close, and the app never sees it.
- capped_protocol(limits) is uvicorn's HTTP protocol (`uvicorn.run(http=...)`, plain `edgemm serve`) that counts
  the open connections of each client address: the one over Limits.client_connections is answered 429 and closed
  before anything of it is read, and a connection that has not sent a whole request head within
  Limits.body_seconds of connecting is closed. (Behind a reverse proxy every client is the proxy's address:
  the cap then bounds the proxy's connections.)
"""
from __future__ import annotations

import asyncio
import json
from collections import Counter

from .api import Limits, error_body


class BodyDeadline:
    """ASGI middleware: a request's body is read here, and must have arrived `seconds` after its head (else 408
    and the connection closes), before the app sees the request. A body declared or found larger than
    `max_bytes` is passed on as it comes (the app refuses it with 413 without waiting for it)."""

    def __init__(self, app, seconds: float, max_bytes: int, count=None):
        self.app, self.seconds, self.max_bytes, self.count = app, seconds, max_bytes, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.seconds:
            return await self.app(scope, receive, send)
        read = await self.read_body(scope, receive)
        if read is None:
            return await self.refuse(send)

        async def replay():
            return read.pop(0) if read else await receive()
        await self.app(scope, replay, send)

    async def read_body(self, scope, receive) -> list | None:
        """The body's messages, read within the deadline (None: it did not arrive in time)."""
        loop = asyncio.get_running_loop()
        at, got, size = loop.time() + self.seconds, [], 0
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return got
        while size <= self.max_bytes:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, at - loop.time()))
            except asyncio.TimeoutError:
                return None
            got.append(msg)
            size += len(msg.get("body", b""))
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                break
        return got

    async def refuse(self, send) -> None:
        body = json.dumps(error_body(f"the request body did not arrive within {self.seconds:g} s",
                                     "invalid_request_error", "body_timeout")).encode()
        if self.count is not None:
            self.count(408)
        await send({"type": "http.response.start", "status": 408,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def too_many_connections(cap: int) -> bytes:
    """The raw 429 a connection over the cap gets (it is closed right after)."""
    body = json.dumps(error_body(f"this client has {cap} connections open to the server, its limit; close some",
                                 "invalid_request_error", "too_many_connections")).encode()
    return (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body))


def capped_protocol(limits: Limits):
    """uvicorn's HTTP protocol class (httptools or h11, as uvicorn picks) with the per-client cap and the
    request-head deadline of `limits`."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    open_by_client: Counter = Counter()          # the event loop's thread only: no lock

    class CappedHTTP(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            self.edgemm_client, self.edgemm_timer = (peer[0] if peer else None), None
            if self.edgemm_client is None:
                return
            if open_by_client[self.edgemm_client] >= limits.client_connections:
                self.edgemm_client = None                     # not counted: closed now
                transport.write(too_many_connections(limits.client_connections))
                transport.close()
                return
            open_by_client[self.edgemm_client] += 1
            if limits.body_seconds:
                self.edgemm_timer = asyncio.get_running_loop().call_later(limits.body_seconds, self.head_overdue)

        def head_overdue(self):
            """No request head yet (uvicorn starts a cycle per request): the connection is closed."""
            if getattr(self, "cycle", True) is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc):
            if self.edgemm_timer is not None:
                self.edgemm_timer.cancel()
            if self.edgemm_client is not None:
                open_by_client[self.edgemm_client] -= 1
                if open_by_client[self.edgemm_client] <= 0:
                    del open_by_client[self.edgemm_client]
                self.edgemm_client = None
            super().connection_lost(exc)

    return CappedHTTP
