"""`moekit serve`: an OpenAI-compatible HTTP server over the async engine (FastAPI + uvicorn).

Every invalid request gets a 4xx with OpenAI's error body naming the field, and the server stays
up; a client that goes away aborts its request (its KV blocks are freed at once); a bounded queue
answers 429 with Retry-After when full; each request has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moekit.data.tokenizer import Tokenizer
from moekit.errors import MoekitError
from moekit.infer.async_engine import AsyncEngine
from moekit.infer.engine import RequestOutput
from moekit.infer.sampling import SamplingParams
from moekit.serve.chat import DEFAULT_CHAT_TEMPLATE, render_chat
from moekit.serve.guard import GuardMiddleware
from moekit.serve.metrics import ServerMetrics
from moekit.serve.protocol import ChatCompletionRequest, CompletionRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ServerConfig:
    model_name: str = "moekit"
    api_key: str | None = None
    max_pending: int = 512  # requests in flight (running + waiting) before 429
    request_timeout: float = 600.0  # seconds per request
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256
    chat_template: str = DEFAULT_CHAT_TEMPLATE


@dataclass
class _Choice:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


def create_app(aengine: AsyncEngine, tokenizer: Tokenizer, cfg: ServerConfig | None = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    engine = aengine.engine
    metrics = ServerMetrics(engine)

    @asynccontextmanager
    async def lifespan(app):
        aengine.start()
        yield
        await aengine.stop()  # uvicorn has let in-flight requests finish (or its grace period ended)

    app = FastAPI(title="moekit", lifespan=lifespan)
    app.state.metrics = metrics

    # -- errors --------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body("request body is not valid JSON", "invalid_request_error", None,
                                           "invalid_json"), status_code=400)
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        return JSONResponse(error_body(f"{where}: {msg}", "invalid_request_error", param, "invalid_value"),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, None), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    app.add_middleware(GuardMiddleware, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes, metrics=metrics)

    # -- helpers -------------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != cfg.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req, max_tokens: int | None, prompt_len: int, param: str, logprobs: int | None,
                 max_param: str = "max_tokens") -> list[SamplingParams]:
        room = engine.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context window is {engine.max_model_len}",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, room)
        elif max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + prompt {prompt_len} tokens exceeds the context window "
                                f"of {engine.max_model_len}", param=max_param, code="context_length_exceeded")
        out = []
        for i in range(req.n):
            sp = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                seed=None if req.seed is None else req.seed + i, stop=list(req.stop or []),
                                logprobs=logprobs, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty)
            try:
                out.append(sp.validate())
            except MoekitError as e:
                raise APIError(400, str(e)) from None
        return out

    admitted = {"n": 0}  # choices admitted and not yet finished: the bound on work in flight

    def admit(n: int) -> None:
        if admitted["n"] + n > cfg.max_pending:
            raise APIError(429, "the server is at capacity; retry shortly", type="rate_limit_error",
                           code="server_overloaded", headers={"Retry-After": "1"})
        admitted["n"] += n

    async def run_choice(ids: list[int], sp: SamplingParams, rid: str, choice: _Choice, queue: asyncio.Queue | None):
        t_first = None
        out: RequestOutput | None = None
        try:
            async for out in aengine.generate(ids, sp, rid):
                if t_first is None:
                    t_first = time.monotonic()  # engine and server share time.monotonic
                    metrics.first_token(t_first - out.arrival_time)
                choice.token_ids += out.new_token_ids
                choice.text += out.delta
                choice.logprobs += list(zip(out.new_token_ids, out.new_logprobs))
                if out.finished:
                    choice.finish_reason = out.finish_reason
                if queue is not None:
                    await queue.put((choice.index, out))
        finally:
            admitted["n"] -= 1
        if out is not None:
            metrics.finished(len(ids), len(choice.token_ids), time.monotonic() - out.arrival_time,
                             None if t_first is None else t_first - out.arrival_time)

    def start_choices(ids, params, queue=None) -> tuple[list[asyncio.Task], list[_Choice]]:
        """Submit every choice at once (right after admit(): the admission count stays exact)."""
        base = uuid.uuid4().hex
        choices = [_Choice(i) for i in range(len(params))]
        tasks = [asyncio.create_task(run_choice(ids, sp, f"{base}-{i}", c, queue))
                 for i, (sp, c) in enumerate(zip(params, choices))]
        return tasks, choices

    async def finish_all(tasks) -> None:
        for t in tasks:
            t.cancel()  # aborts the engine request when unfinished
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run_all(ids, params, request: Request) -> list[_Choice]:
        tasks, choices = start_choices(ids, params)
        watcher = asyncio.create_task(watch_disconnect(request, tasks))
        try:
            done, pending = await asyncio.wait(tasks, timeout=cfg.request_timeout,
                                               return_when=asyncio.FIRST_EXCEPTION)
            if pending:
                if watcher.done() and watcher.result():
                    raise APIError(499, "client closed the request", code="client_closed")
                raise APIError(408, f"request took longer than {cfg.request_timeout:g} s", type="timeout_error",
                               code="request_timeout")
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    e = t.exception()
                    raise APIError(400, str(e)) if isinstance(e, MoekitError) else e
        finally:
            watcher.cancel()
            await finish_all(tasks)
        return choices

    async def watch_disconnect(request: Request, tasks) -> bool:
        while not all(t.done() for t in tasks):
            if await request.is_disconnected():
                for t in tasks:
                    t.cancel()
                return True
            await asyncio.sleep(0.05)
        return False

    def token_str(t: int) -> str:
        return tokenizer.decode([t])

    def completion_logprobs(pairs, start_offset: int = 0) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        off = start_offset
        for tok, lp in pairs:
            s = token_str(tok)
            tokens.append(s)
            lps.append(lp[0])
            top: dict[str, float] = {}
            for t, v in lp[1]:  # best first; tokens that decode alike keep the best entry
                top.setdefault(token_str(t), v)
            tops.append(top)
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(pairs) -> dict:
        def entry(t, v):
            return {"token": token_str(t), "logprob": v, "bytes": list(tokenizer.token_bytes(t))}
        return {"content": [{**entry(tok, lp[0]), "top_logprobs": [entry(t, v) for t, v in lp[1]]}
                            for tok, lp in pairs]}

    def usage(prompt_len: int, choices: list[_Choice]) -> dict:
        done = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt_len, "completion_tokens": done, "total_tokens": prompt_len + done}

    def chunker(rid: str, created: int, obj: str, choice):
        """Stream chunk builder: choice(i, delta, logprobs, finish) -> the choice dict; a call with
        use= gives the final usage chunk."""
        def chunk(i, delta, lp, finish, use=None):
            base = {"id": rid, "object": obj, "created": created, "model": cfg.model_name}
            if use is not None:
                return {**base, "choices": [], "usage": use}
            return {**base, "choices": [choice(i, delta, lp, finish)]}
        return chunk

    def include_usage(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def stream_response(ids, params, make_chunk, include_usage: bool, chat: bool) -> StreamingResponse:
        queue: asyncio.Queue = asyncio.Queue()
        tasks, choices = start_choices(ids, params, queue)
        offsets = [0] * len(params)  # completion text_offset runs on across chunks

        async def gen():
            try:
                if chat:
                    for i in range(len(params)):
                        yield sse(make_chunk(i, {"role": "assistant", "content": ""}, None, None))
                deadline = time.monotonic() + cfg.request_timeout
                finished = 0
                while finished < len(params):
                    try:
                        if time.monotonic() > deadline:
                            raise asyncio.TimeoutError
                        idx, out = await asyncio.wait_for(queue.get(), timeout=max(0.001, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        yield sse(error_body(f"request took longer than {cfg.request_timeout:g} s", "timeout_error",
                                             None, "request_timeout"))
                        break
                    lp = None
                    if out.new_logprobs:
                        pairs = list(zip(out.new_token_ids, out.new_logprobs))
                        if chat:
                            lp = chat_logprobs(pairs)
                        else:
                            lp = completion_logprobs(pairs, offsets[idx])
                    offsets[idx] += sum(len(token_str(t)) for t in out.new_token_ids)
                    if out.delta or lp or out.finished:
                        yield sse(make_chunk(idx, out.delta, lp, out.finish_reason))
                    finished += out.finished
                    if all(t.done() for t in tasks) and queue.empty() and finished < len(params):
                        failed = [t.exception() for t in tasks if not t.cancelled() and t.exception()]
                        if failed:
                            yield sse(error_body(str(failed[0]), "invalid_request_error"))
                            break
                if include_usage and finished == len(params):
                    yield sse(make_chunk(None, None, None, None, usage(len(ids), choices)))
                yield "data: [DONE]\n\n"
            finally:
                await finish_all(tasks)

        return StreamingResponse(gen(), media_type="text/event-stream")

    # -- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "moekit", "max_model_len": engine.max_model_len}]}

    def encode_prompt(prompt, param: str) -> list[int]:
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(t >= engine.model.cfg.vocab_size for t in ids):
                raise APIError(400, f"token ids must be < {engine.model.cfg.vocab_size}", param=param)
        if not ids:
            raise APIError(400, f"{param} is empty after tokenization", param=param)
        return ids

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        ids = encode_prompt(body.prompt, "prompt")
        params = sampling(body, body.max_tokens if body.max_tokens is not None else 16, len(ids), "prompt",
                          body.logprobs)
        admit(len(params))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            chunk = chunker(rid, created, "text_completion", lambda i, text, lp, finish: {
                "index": i, "text": text, "logprobs": lp, "finish_reason": finish})
            return stream_response(ids, params, chunk, include_usage(body), chat=False)
        choices = await run_all(ids, params, request=request)
        return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                             "logprobs": completion_logprobs(c.logprobs) if body.logprobs is not None else None}
                            for c in choices],
                "usage": usage(len(ids), choices)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        try:
            text = render_chat([{"role": m.role, "content": m.text} for m in body.messages], cfg.chat_template)
        except Exception as e:  # a broken template is a server problem, not the client's
            raise APIError(500, f"chat template failed: {e}", type="server_error") from None
        ids = encode_prompt(text, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        lp = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling(body, max_tokens, len(ids), "messages", lp,
                          "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
        admit(len(params))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def choice(i, delta, lp_, finish):
                d = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
                return {"index": i, "delta": d, "logprobs": lp_, "finish_reason": finish}
            chunk = chunker(rid, created, "chat.completion.chunk", choice)
            return stream_response(ids, params, chunk, include_usage(body), chat=True)
        choices = await run_all(ids, params, request=request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": chat_logprobs(c.logprobs) if body.logprobs else None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": usage(len(ids), choices)}

    return app
