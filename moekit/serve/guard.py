"""Pure ASGI middleware in front of /v1/: API key, body size (Content-Length and streamed
bodies), and request metrics for every answer, rejections included.

A pure ASGI layer (not Starlette's BaseHTTPMiddleware) keeps the client's own `receive`
channel visible to the handlers, so a client that goes away is seen and its request aborted.
"""

from __future__ import annotations

import json
import time


def _error(status: int, message: str, code: str) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return status, json.dumps(body).encode()


class GuardMiddleware:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        start, path = time.monotonic(), scope["path"]
        status_seen = {}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_seen["status"] = message["status"]
            await send(message)

        try:
            rejection = self._check_headers(scope)
            body = b""
            if rejection is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, rejection = await self._read_body(receive)
            if rejection is not None:
                return await self._respond(send_counted, *rejection)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # afterwards: the client's own channel (disconnects)

            await self.app(scope, replay, send_counted)
        finally:
            self.metrics.request(path, status_seen.get("status", 499), time.monotonic() - start)

    def _check_headers(self, scope):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "invalid or missing API key", "invalid_api_key")
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body):
            return _error(413, f"request body larger than {self.max_body} bytes", "body_too_large")
        return None

    async def _read_body(self, receive):
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", (499, b"")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:  # streamed (chunked) bodies have no Content-Length to check
                return b"", _error(413, f"request body larger than {self.max_body} bytes", "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    @staticmethod
    async def _respond(send, status: int, body: bytes):
        if status == 499:  # the client is gone: nothing to send
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
