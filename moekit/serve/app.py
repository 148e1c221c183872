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
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, None), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        start = time.monotonic()
        if request.url.path.startswith("/v1/"):
            if cfg.api_key is not None and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
                return JSONResponse(error_body("invalid or missing API key", "invalid_request_error", None,
                                               "invalid_api_key"), status_code=401)
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > cfg.max_body_bytes):
                return JSONResponse(error_body(f"request body larger than {cfg.max_body_bytes} bytes",
                                               "invalid_request_error", None, "body_too_large"), status_code=413)
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            metrics.request(request.url.path, response.status_code, time.monotonic() - start)
        return response

    # -- helpers -------------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != cfg.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(req, max_tokens: int | None, prompt_len: int, param: str, logprobs: int | None) -> list[SamplingParams]:
        room = engine.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt has {prompt_len} tokens; the context window is {engine.max_model_len}",
                           param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, room)
        elif max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + prompt {prompt_len} tokens exceeds the context window "
                                f"of {engine.max_model_len}", param="max_tokens", code="context_length_exceeded")
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

    def admit(n: int) -> None:
        if aengine.num_in_flight + n > cfg.max_pending:
            raise APIError(429, "the server is at capacity; retry shortly", type="rate_limit_error",
                           code="server_overloaded", headers={"Retry-After": "1"})

    async def run_choice(ids: list[int], sp: SamplingParams, rid: str, choice: _Choice, queue: asyncio.Queue | None):
        t_first = None
        out: RequestOutput | None = None
        async for out in aengine.generate(ids, sp, rid):
            if t_first is None:
                t_first = time.monotonic()
                metrics.first_token(t_first - out.arrival_time)  # engine and server share time.monotonic
            choice.token_ids += out.new_token_ids
            choice.text += out.delta
            choice.logprobs += list(zip(out.new_token_ids, out.new_logprobs))
            if out.finished:
                choice.finish_reason = out.finish_reason
            if queue is not None:
                await queue.put((choice.index, out))
        if out is not None:
            metrics.finished(len(ids), len(choice.token_ids), time.monotonic() - out.arrival_time,
                             None if t_first is None else t_first - out.arrival_time)

    async def run_all(ids, params, queue=None, request: Request | None = None) -> list[_Choice]:
        base = uuid.uuid4().hex
        choices = [_Choice(i) for i in range(len(params))]
        tasks = [asyncio.create_task(run_choice(ids, sp, f"{base}-{i}", c, queue))
                 for i, (sp, c) in enumerate(zip(params, choices))]
        watcher = asyncio.create_task(watch_disconnect(request, tasks)) if request is not None else None
        try:
            done = asyncio.gather(*tasks)
            await asyncio.wait_for(done, timeout=cfg.request_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"request took longer than {cfg.request_timeout:g} s", type="timeout_error",
                           code="request_timeout") from None
        except MoekitError as e:
            raise APIError(400, str(e)) from None
        finally:
            for t in tasks:
                t.cancel()  # aborts in the engine when unfinished
            if watcher is not None:
                watcher.cancel()
        return choices

    async def watch_disconnect(request: Request, tasks):
        while not all(t.done() for t in tasks):
            if await request.is_disconnected():
                for t in tasks:
                    t.cancel()
                return
            await asyncio.sleep(0.1)

    def token_str(t: int) -> str:
        return tokenizer.decode([t])

    def completion_logprobs(choice: _Choice, start_offset: int = 0) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        off = start_offset
        for tok, lp in choice.logprobs:
            s = token_str(tok)
            tokens.append(s)
            lps.append(lp[0])
            tops.append({token_str(t): v for t, v in lp[1]})
            offsets.append(off)
            off += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(pairs) -> dict:
        def entry(t, v):
            s = token_str(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
        return {"content": [{**entry(tok, lp[0]), "top_logprobs": [entry(t, v) for t, v in lp[1]]}
                            for tok, lp in pairs]}

    def usage(prompt_len: int, choices: list[_Choice]) -> dict:
        done = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt_len, "completion_tokens": done, "total_tokens": prompt_len + done}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def stream_response(ids, params, make_chunk, include_usage: bool, request: Request, chat: bool):
        queue: asyncio.Queue = asyncio.Queue()

        async def gen():
            choices_holder: list[_Choice] = []
            runner = asyncio.create_task(_collect(choices_holder))
            if chat:
                for i in range(len(params)):
                    yield sse(make_chunk(i, {"role": "assistant", "content": ""}, None, None))
            try:
                finished = 0
                while finished < len(params):
                    get = asyncio.create_task(queue.get())
                    done, _ = await asyncio.wait({get, runner}, return_when=asyncio.FIRST_COMPLETED)
                    if get not in done:
                        get.cancel()
                        if runner.exception() is not None:
                            e = runner.exception()
                            msg = e.message if isinstance(e, APIError) else str(e)
                            yield sse(error_body(msg, getattr(e, "type", "server_error")))
                            break
                        continue
                    idx, out = get.result()
                    lp = None
                    if out.new_logprobs:
                        pairs = list(zip(out.new_token_ids, out.new_logprobs))
                        lp = chat_logprobs(pairs) if chat else completion_logprobs(_Choice(idx, logprobs=pairs))
                    if out.delta or lp or out.finished:
                        yield sse(make_chunk(idx, out.delta, lp, out.finish_reason))
                    finished += out.finished
                if include_usage and runner.done() is False:
                    await runner
                if include_usage and choices_holder:
                    yield sse(make_chunk(None, None, None, None, usage(len(ids), choices_holder)))
                yield "data: [DONE]\n\n"
            finally:
                runner.cancel()

        async def _collect(holder):
            holder.extend(await run_all(ids, params, queue))

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
            def chunk(i, text, lp, finish, use=None):
                base = {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name}
                if use is not None:
                    return {**base, "choices": [], "usage": use}
                return {**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
            include = bool(body.stream_options and body.stream_options.include_usage)
            return await stream_response(ids, params, chunk, include, request, chat=False)
        choices = await run_all(ids, params, request=request)
        return {"id": rid, "object": "text_completion", "created": created, "model": cfg.model_name,
                "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                             "logprobs": completion_logprobs(c) if body.logprobs is not None else None}
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
        params = sampling(body, max_tokens, len(ids), "messages", lp)
        admit(len(params))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            def chunk(i, delta, lp_, finish, use=None):
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name}
                if use is not None:
                    return {**base, "choices": [], "usage": use}
                d = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
                return {**base, "choices": [{"index": i, "delta": d, "logprobs": lp_, "finish_reason": finish}]}
            include = bool(body.stream_options and body.stream_options.include_usage)
            return await stream_response(ids, params, chunk, include, request, chat=True)
        choices = await run_all(ids, params, request=request)
        return {"id": rid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": chat_logprobs(c.logprobs) if body.logprobs else None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": usage(len(ids), choices)}

    return app
