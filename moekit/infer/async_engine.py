"""asyncio front of the engine: many concurrent callers, one stepping loop, tokens streamed.

The engine itself is single-threaded: adds and aborts are queued by the callers and applied by
the loop between steps; each step runs in a worker thread so the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from moekit.errors import ConfigError
from moekit.infer.engine import Engine, RequestOutput
from moekit.infer.sampling import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending: list[tuple[str, object]] = []  # ("add", (rid, prompt, params)) | ("abort", rid)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.errors = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop once the step in flight has finished (the engine is single-threaded),
        then abort everything and tell every consumer."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            await self._task
            self._task = None
            self._stopping = False
        for rid, q in list(self._queues.items()):
            self._pending.append(("abort", rid))
            q.put_nowait(RuntimeError("the engine is shutting down"))
        self._apply_pending()

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; cancelling the consumer aborts the request."""
        self.start()
        if request_id in self._queues or request_id in self.engine.requests:
            raise ConfigError(f"request id {request_id!r} is already in use")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        self._pending.append(("add", (request_id, prompt, params)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._pending.append(("abort", request_id))
                self._wake.set()

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for kind, arg in pending:
            if kind == "add":
                rid, prompt, params = arg
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                except Exception as e:  # reported to the caller, the loop goes on
                    if rid in self._queues:
                        self._queues[rid].put_nowait(e)
            else:
                self.engine.abort(arg)

    async def _loop(self) -> None:
        while not self._stopping:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self._pending and not self._stopping:
                    await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # a failed step fails the requests in it, not the server
                self.errors += 1
                for rid in list(self.engine.requests):
                    self.engine.abort(rid)
                    if rid in self._queues:
                        self._queues[rid].put_nowait(RuntimeError(f"engine step failed: {e}"))
                continue
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)
