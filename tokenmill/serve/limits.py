"""Request framing and size limits, enforced on what is actually read (an ASGI middleware).

- The body limit counts the bytes received, whatever the framing: a chunked body cannot walk
  around a check of Content-Length alone. Over the limit: 413, and the rest is not read.
- A request with both Content-Length and Transfer-Encoding (or several Content-Lengths) is
  ambiguous framing, the stuff of request smuggling behind a proxy: 400, connection closed.
- A body that stalls longer than `body_timeout_s` between chunks ends with 408 (slow-body
  clients hold a connection and a task). Once the body is whole, the wait for a disconnect
  (as long as a response streams) has no timeout. Header read time is the HTTP server's (uvicorn's
  `timeout_keep_alive` covers idle connections); put a proxy in front for slow headers.
"""

from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException

Scope = dict
Message = dict


class LimitExceeded(HTTPException):
    """Raised from the body stream: FastAPI passes an HTTPException through body parsing, so
    the app's handler answers it (with Connection: close) instead of a generic 400."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status, message, headers={"Connection": "close"})
        self.status, self.message, self.code = status, message, code


class RequestLimits:
    def __init__(self, app, max_body_bytes: int, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check_framing(scope)
        except LimitExceeded as e:
            return await _refuse(send, e, close=True)
        received = 0
        started = False
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later receives wait for the disconnect, as long as a stream runs
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                raise LimitExceeded(
                    408, "the request body stalled; send it whole", "timeout"
                ) from None
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise LimitExceeded(
                        413,
                        f"request body exceeds the limit of {self.max_body_bytes} bytes",
                        "request_too_large",
                    )
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except LimitExceeded as e:
            if not started:
                await _refuse(send, e, close=True)

    def _check_framing(self, scope: Scope) -> None:
        headers = [(k.lower(), v) for k, v in scope.get("headers", [])]
        lengths = [v for k, v in headers if k == b"content-length"]
        chunked = any(k == b"transfer-encoding" for k, _ in headers)
        if (lengths and chunked) or len(set(lengths)) > 1:
            raise LimitExceeded(
                400,
                "ambiguous framing: Content-Length with Transfer-Encoding (or several "
                "Content-Lengths); send one",
                "ambiguous_framing",
            )
        if lengths and lengths[0].isdigit() and int(lengths[0]) > self.max_body_bytes:
            raise LimitExceeded(
                413,
                f"request body of {int(lengths[0])} bytes exceeds the limit of "
                f"{self.max_body_bytes} bytes",
                "request_too_large",
            )


async def _refuse(send, e: LimitExceeded, close: bool) -> None:
    kind = "invalid_request_error"
    body = json.dumps(
        {"error": {"message": e.message, "type": kind, "param": None, "code": e.code}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
