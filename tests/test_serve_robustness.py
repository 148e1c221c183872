"""The OpenAI-compatible server under bad input and stress, over real uvicorn servers on
127.0.0.1: a suite of bad requests (4xx with OpenAI's error body, the server keeps serving), auth,
overload, timeouts, a bounded load test with disconnecting clients, and graceful shutdown.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import httpx
import openai
import pytest

from serve_helpers import MODEL_NAME, chat, comp, health, metric_value, iter_sse, slow_down, slowed, sse_events, start_server, wait_idle

C, CH = "/v1/completions", "/v1/chat/completions"
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


# ------------------------------------------------------------------------------------------------
# 3. bad input: 4xx with OpenAI's error body, and the server keeps serving

ANY = object()  # do not check this part of the error


def drop(d, key):
    d = dict(d)
    del d[key]
    return d


def msg(**m):
    return chat(messages=[m])


class Raw(bytes):
    """A body sent as is (not JSON-encoded)."""


LONG_PROMPT = "Hello " * 300  # > 256 tokens
BAD = "invalid_request_error"

# (id, method, path, body, status, type, param, code)
CASES = [
    ("malformed_json", "POST", C, Raw(b'{"model": "moekit", "prompt": '), 400, BAD, None, "invalid_json"),
    ("trailing_garbage_json", "POST", CH, Raw(b'{"model": "moekit"} xx'), 400, BAD, None, "invalid_json"),
    ("body_is_list", "POST", C, [1, 2, 3], 400, BAD, None, "invalid_value"),
    ("body_is_string", "POST", CH, "hello", 400, BAD, None, "invalid_value"),
    ("body_is_null", "POST", C, None, 400, BAD, ANY, "invalid_value"),
    ("missing_model", "POST", C, drop(comp(), "model"), 400, BAD, "model", "invalid_value"),
    ("missing_model_chat", "POST", CH, drop(chat(), "model"), 400, BAD, "model", "invalid_value"),
    ("missing_prompt", "POST", C, drop(comp(), "prompt"), 400, BAD, "prompt", "invalid_value"),
    ("missing_messages", "POST", CH, drop(chat(), "messages"), 400, BAD, "messages", "invalid_value"),
    ("max_tokens_str", "POST", C, comp(max_tokens="ten"), 400, BAD, "max_tokens", "invalid_value"),
    ("temperature_str", "POST", CH, chat(temperature="hot"), 400, BAD, "temperature", "invalid_value"),
    ("n_float", "POST", C, comp(n=1.5), 400, BAD, "n", "invalid_value"),
    pytest.param("stream_yes", "POST", C, comp(stream="yes"), 400, BAD, "stream", "invalid_value",
                 id="stream_yes"),
    pytest.param("max_tokens_numeric_str", "POST", C, comp(max_tokens="2"), 400, BAD, "max_tokens", "invalid_value",
                 id="max_tokens_numeric_str"),
    pytest.param("n_bool", "POST", CH, chat(n=True), 400, BAD, "n", "invalid_value",
                 id="n_bool"),
    ("stop_int", "POST", C, comp(stop=5), 400, BAD, "stop", "invalid_value"),
    ("stop_list_of_int", "POST", CH, chat(stop=[1, 2]), 400, BAD, "stop", "invalid_value"),
    ("temperature_negative", "POST", C, comp(temperature=-1), 400, BAD, "temperature", "invalid_value"),
    ("temperature_3", "POST", CH, chat(temperature=3), 400, BAD, "temperature", "invalid_value"),
    ("top_p_0", "POST", C, comp(top_p=0), 400, BAD, "top_p", "invalid_value"),
    ("top_p_1.5", "POST", CH, chat(top_p=1.5), 400, BAD, "top_p", "invalid_value"),
    ("max_tokens_0", "POST", C, comp(max_tokens=0), 400, BAD, "max_tokens", "invalid_value"),
    ("max_tokens_-5", "POST", CH, chat(max_tokens=-5), 400, BAD, "max_tokens", "invalid_value"),
    ("max_completion_tokens_0", "POST", CH, chat(max_completion_tokens=0), 400, BAD, "max_completion_tokens",
     "invalid_value"),
    ("n_0", "POST", C, comp(n=0), 400, BAD, "n", "invalid_value"),
    ("n_100", "POST", CH, chat(n=100), 400, BAD, "n", "invalid_value"),
    ("presence_penalty_5", "POST", C, comp(presence_penalty=5), 400, BAD, "presence_penalty", "invalid_value"),
    ("frequency_penalty_-3", "POST", CH, chat(frequency_penalty=-3), 400, BAD, "frequency_penalty", "invalid_value"),
    ("logprobs_10", "POST", C, comp(logprobs=10), 400, BAD, "logprobs", "invalid_value"),
    ("top_logprobs_50", "POST", CH, chat(logprobs=True, top_logprobs=50), 400, BAD, "top_logprobs", "invalid_value"),
    ("top_logprobs_without_logprobs", "POST", CH, chat(top_logprobs=2), 400, BAD, ANY, "invalid_value"),
    ("top_k_-1", "POST", C, comp(top_k=-1), 400, BAD, "top_k", "invalid_value"),
    ("seed_-1", "POST", CH, chat(seed=-1), 400, BAD, "seed", "invalid_value"),
    ("seed_2**64", "POST", C, comp(seed=2**64), 400, BAD, "seed", "invalid_value"),
    ("unknown_model", "POST", C, comp(model="gpt-4"), 404, BAD, "model", "model_not_found"),
    ("unknown_model_chat", "POST", CH, chat(model="nope"), 404, BAD, "model", "model_not_found"),
    ("prompt_over_context", "POST", C, comp(prompt=LONG_PROMPT), 400, BAD, "prompt", "context_length_exceeded"),
    ("messages_over_context", "POST", CH, msg(role="user", content=LONG_PROMPT), 400, BAD, "messages",
     "context_length_exceeded"),
    ("max_tokens_over_context", "POST", C, comp(max_tokens=300), 400, BAD, "max_tokens", "context_length_exceeded"),
    ("chat_max_tokens_over_context", "POST", CH, chat(max_tokens=256), 400, BAD, "max_tokens",
     "context_length_exceeded"),
    ("empty_prompt", "POST", C, comp(prompt=""), 400, BAD, "prompt", "invalid_value"),
    ("empty_token_prompt", "POST", C, comp(prompt=[]), 400, BAD, "prompt", "invalid_value"),
    ("two_prompts", "POST", C, comp(prompt=["a", "b"]), 400, BAD, "prompt", "invalid_value"),
    ("empty_messages", "POST", CH, chat(messages=[]), 400, BAD, "messages", "invalid_value"),
    ("bad_role", "POST", CH, msg(role="robot", content="hi"), 400, BAD, "messages", "invalid_value"),
    ("missing_content", "POST", CH, msg(role="user"), 400, BAD, "messages", "invalid_value"),
    ("content_int", "POST", CH, msg(role="user", content=5), 400, BAD, "messages", "invalid_value"),
    ("content_bad_part", "POST", CH, msg(role="user", content=[{"type": "image_url", "image_url": "x"}]), 400, BAD,
     "messages", "invalid_value"),
    ("messages_not_objects", "POST", CH, chat(messages=["hi"]), 400, BAD, "messages", "invalid_value"),
    ("messages_without_text", "POST", CH, msg(role="user", content=""), 400, BAD, ANY, "invalid_value"),
    ("five_stops", "POST", C, comp(stop=["a", "b", "c", "d", "e"]), 400, BAD, "stop", "invalid_value"),
    ("empty_stop", "POST", CH, chat(stop=""), 400, BAD, "stop", "invalid_value"),
    ("stop_too_long", "POST", C, comp(stop=["x" * 300]), 400, BAD, "stop", "invalid_value"),
    ("unknown_field", "POST", C, comp(frobnicate=1), 400, BAD, "frobnicate", "invalid_value"),
    ("unknown_field_chat", "POST", CH, chat(tools=[]), 400, BAD, "tools", "invalid_value"),
    ("logit_bias", "POST", C, comp(logit_bias={"5": 10}), 400, BAD, "logit_bias", "invalid_value"),
    ("echo", "POST", C, comp(echo=True), 400, BAD, ANY, "invalid_value"),
    ("suffix", "POST", C, comp(suffix="x"), 400, BAD, ANY, "invalid_value"),
    ("best_of", "POST", C, comp(best_of=3), 400, BAD, ANY, "invalid_value"),
    ("token_out_of_vocab", "POST", C, comp(prompt=[[1, 2, 99999]]), 400, BAD, "prompt", None),
    ("token_negative", "POST", C, comp(prompt=[[1, -2]]), 400, BAD, "prompt", "invalid_value"),
    ("stream_options_without_stream", "POST", C, comp(stream_options={"include_usage": True}), 400, BAD, ANY,
     "invalid_value"),
    ("stream_options_unknown_key", "POST", CH, chat(stream=True, stream_options={"foo": 1}), 400, BAD,
     "stream_options", "invalid_value"),
    ("get_on_post_route", "GET", C, None, 405, BAD, None, None),
    ("put_on_chat_route", "PUT", CH, chat(), 405, BAD, None, None),
    ("unknown_route", "POST", "/v1/embeddings", comp(), 404, BAD, None, None),
    ("unknown_get_route", "GET", "/v1/nope", None, 404, BAD, None, None),
]


def _send(client: httpx.Client, method: str, path: str, body):
    if method == "GET":
        return client.get(path)
    if isinstance(body, Raw):
        return client.request(method, path, content=bytes(body), headers={"content-type": "application/json"})
    return client.request(method, path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def assert_error(r: httpx.Response, status: int, type_: str, param=ANY, code=ANY) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == type_
    if param is not ANY:
        assert err["param"] == param, err
    if code is not ANY:
        assert err["code"] == code, err
    return err


def assert_still_serving(client: httpx.Client) -> None:
    r = client.post(C, json=comp(max_tokens=1))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("name,method,path,body,status,type_,param,code",
                         [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in CASES])
def test_bad_request(http, name, method, path, body, status, type_, param, code):
    assert_error(_send(http, method, path, body), status, type_, param, code)
    assert_still_serving(http)


@pytest.fixture(scope="module")
def small_body_srv(ckpt_dir):
    s = start_server(ckpt_dir, max_body_bytes=512)
    yield s
    s.stop()


def test_oversized_body_is_413(small_body_srv):
    with httpx.Client(base_url=small_body_srv.url, timeout=30) as c:
        r = c.post(C, json=comp(prompt="Hello " * 200))
        assert_error(r, 413, BAD, None, "body_too_large")
        r = c.post(CH, content=b"x" * 10_000, headers={"content-type": "application/json"})
        assert_error(r, 413, BAD, None, "body_too_large")
        assert_still_serving(c)


def test_oversized_chunked_body_is_413(small_body_srv):
    body = json.dumps(comp(prompt="Hello " * 200, max_tokens=1)).encode()
    with httpx.Client(base_url=small_body_srv.url, timeout=30) as c:
        r = c.post(C, content=iter([body[:100], body[100:]]), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413, BAD, None, "body_too_large")


# errors raised by cross-field (model-level) checks, or by the server after validation, should still
# name the field at fault in "param", as OpenAI does
PARAM_CASES = [
    ("top_logprobs_without_logprobs", CH, chat(top_logprobs=2), "top_logprobs"),
    ("stream_options_without_stream", C, comp(stream_options={"include_usage": True}), "stream_options"),
    ("echo", C, comp(echo=True), "echo"),
    ("suffix", C, comp(suffix="x"), "suffix"),
    ("best_of", C, comp(best_of=3), "best_of"),
    ("max_completion_tokens_over_context", CH, chat(max_completion_tokens=300), "max_completion_tokens"),
]


@pytest.mark.parametrize("name,path,body,param", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_cross_field_errors_name_the_field(http, name, path, body, param):
    assert_error(http.post(path, json=body), 400, BAD, param)


def test_405_has_allow_header(http):
    r = http.get(C)
    assert r.status_code == 405
    assert r.headers.get("allow") == "POST"


def test_server_survives_a_burst_of_garbage(http):
    for body in (b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"model": 1}', json.dumps(comp(n=-1)).encode()):
        r = http.post(C, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and "error" in r.json()
    assert_still_serving(http)
    assert health(str(http.base_url).rstrip("/"))["status"] == "ok"


# ------------------------------------------------------------------------------------------------
# 4. auth

def test_api_key(ckpt_dir):
    s = start_server(ckpt_dir, api_key="sekret")
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            assert_error(c.get("/v1/models"), 401, BAD, None, "invalid_api_key")
            assert_error(c.post(C, json=comp()), 401, BAD, None, "invalid_api_key")
            assert_error(c.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401, BAD, None,
                         "invalid_api_key")
            assert_error(c.get("/v1/models", headers={"authorization": "sekret"}), 401, BAD)
            ok = {"authorization": "Bearer sekret"}
            assert c.get("/v1/models", headers=ok).status_code == 200
            assert c.post(C, json=comp(), headers=ok).status_code == 200
            assert c.get("/health").status_code == 200 and c.get("/health").json()["status"] == "ok"
            assert c.get("/metrics").status_code == 200
        with openai.OpenAI(base_url=s.v1, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=s.v1, api_key="sekret", max_retries=0) as good:
            assert good.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices
    finally:
        s.stop()


def test_rejected_requests_are_counted(ckpt_dir):
    s = start_server(ckpt_dir, api_key="sekret")
    try:
        httpx.get(f"{s.v1}/models", timeout=10)
        assert metric_value(httpx.get(f"{s.url}/metrics").text, "moekit_requests_total",
                            endpoint="/v1/models", status="401") == 1
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------
# 5. overload

async def _post_many(url: str, n: int, body: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n + 5)) as c:
        return await asyncio.gather(*[c.post(C, json=body) for _ in range(n)])


async def _raw_burst(port: int, n: int, body: dict) -> list[int]:
    """n requests on n connections opened beforehand, all written at once, so they reach the server in
    the same instant; returns their status codes (responses read to the end)."""
    payload = json.dumps(body).encode()
    head = (f"POST {C} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    for _, w in conns:
        w.write(head + payload)
    await asyncio.gather(*[w.drain() for _, w in conns])

    async def read(r, w):
        data = await asyncio.wait_for(r.read(), 60)
        w.close()
        return int(data.split(b" ", 2)[1])

    return await asyncio.gather(*[read(r, w) for r, w in conns])


@pytest.fixture
def busy_srv(ckpt_dir):
    s = start_server(ckpt_dir, max_pending=2)
    slow_down(s.engine, 0.002)  # 200 tokens take > 0.4 s
    peak = {"n": 0}
    real_add = s.engine.add_request

    def add(*a, **kw):
        rid = real_add(*a, **kw)
        peak["n"] = max(peak["n"], len(s.engine.requests))
        return rid

    s.engine.add_request = add
    s.peak = peak
    yield s
    s.stop()


def test_overload_429(busy_srv):
    long = comp(max_tokens=200, temperature=0)

    async def main():
        # two long requests fill the server (max_pending=2), then a burst of ten more arrives
        first = [asyncio.create_task(_post_many(busy_srv.url, 1, long)) for _ in range(2)]
        deadline = time.monotonic() + 10
        while busy_srv.aengine.num_in_flight < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        burst = await _post_many(busy_srv.url, 10, long)
        return [r for f in first for r in await f] + burst

    res = asyncio.run(main())
    codes = [r.status_code for r in res]
    assert set(codes) <= {200, 429}
    assert codes[:2] == [200, 200] and codes.count(429) >= 1
    for r in res:
        if r.status_code == 429:
            assert_error(r, 429, "rate_limit_error", None, "server_overloaded")
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    h = wait_idle(busy_srv.url)
    assert h["status"] == "ok" and h["kv_blocks_used"] == 0 and h["running"] == h["waiting"] == 0
    with httpx.Client(base_url=busy_srv.url, timeout=30) as c:
        assert_still_serving(c)


@pytest.mark.parametrize("stream", [False, True])
def test_max_pending_bounds_simultaneous_requests(busy_srv, stream):
    real_generate = busy_srv.aengine.generate

    async def generate(*a, **kw):  # a busy event loop: requests reach the engine a little after admit()
        await asyncio.sleep(0.2)
        async for out in real_generate(*a, **kw):
            yield out

    busy_srv.aengine.generate = generate
    codes = asyncio.run(_raw_burst(busy_srv.port, 12, comp(max_tokens=200, temperature=0, stream=stream)))
    wait_idle(busy_srv.url)
    assert set(codes) <= {200, 429}
    assert busy_srv.peak["n"] <= 2, f"{busy_srv.peak['n']} requests in the engine at once with max_pending=2"
    assert codes.count(200) <= 2


# ------------------------------------------------------------------------------------------------
# 6. request timeout

def test_request_timeout(ckpt_dir):
    s = start_server(ckpt_dir, request_timeout=0.01)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            r = c.post(C, json=comp(max_tokens=200, temperature=0))
            assert_error(r, 408, "timeout_error", None, "request_timeout")
            r = c.post(CH, json=chat(max_tokens=200, n=3))
            assert_error(r, 408, "timeout_error", None, "request_timeout")
            # a stream has sent its 200 already: the timeout arrives as an error event, then [DONE]
            with c.stream("POST", C, json=comp(max_tokens=200, stream=True)) as r:
                assert r.status_code == 200
                events = sse_events(r.iter_lines())
            assert events[-1] == "[DONE]"
            assert any(isinstance(e, dict) and e.get("error", {}).get("type") == "timeout_error" for e in events)
            h = wait_idle(s.url)
            assert h["kv_blocks_used"] == 0 and h["running"] == 0 and h["waiting"] == 0
            assert s.engine.requests == {} and s.aengine.num_in_flight == 0
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------
# 7. bounded load test: 200 concurrent streams, a fifth of the clients hang up mid-stream

def test_load_200_streams_with_disconnects(srv):
    n, max_tokens = 200, 12
    dropouts = set(range(0, n, 5))  # 20%

    async def one(c, i):
        body = {"model": MODEL_NAME, "prompt": f"Request number {i}:", "max_tokens": max_tokens,
                "temperature": 0.7, "stream": True}
        if i % 2:
            body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Hi {i}"}],
                    "max_tokens": max_tokens, "stream": True}
        t0 = time.monotonic()
        async with c.stream("POST", CH if i % 2 else C, json=body) as r:
            assert r.status_code == 200, await r.aread()
            events = []
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                if i in dropouts and len(events) >= 1 + i % 2:
                    return i, None, None  # leaving the block closes the connection mid-stream
        finish = [ch["finish_reason"] for e in events if isinstance(e, dict) for ch in e.get("choices", [])
                  if ch.get("finish_reason")]
        assert events[-1] == "[DONE]", events[-3:]
        return i, finish, time.monotonic() - t0

    async def main():
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            return await asyncio.gather(*[one(c, i) for i in range(n)])

    t0 = time.monotonic()
    results = asyncio.run(main())
    wall = time.monotonic() - t0
    completed = [(i, f, dt) for i, f, dt in results if i not in dropouts]
    assert len(completed) == n - len(dropouts)
    for i, finish, _ in completed:
        assert len(finish) == 1 and finish[0] in ("length", "stop"), (i, finish)
    lat = sorted(dt for _, _, dt in completed)
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"\n[load] {n} streams ({len(dropouts)} hung up), wall {wall:.2f}s, latency p50 {p50 * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms")
    h = wait_idle(srv.url, timeout=10)
    assert h["kv_blocks_used"] == 0 and h["running"] == 0 and h["waiting"] == 0, h
    assert srv.engine.requests == {} and srv.aengine.num_in_flight == 0
    assert srv.aengine.errors == 0


def test_stream_disconnect_aborts_request(srv):
    aborted = []
    real_abort = srv.engine.abort
    srv.engine.abort = lambda rid: aborted.append(real_abort(rid)) or aborted[-1]
    try:
        with slowed(srv.engine, 0.005), httpx.Client(base_url=srv.url, timeout=30) as c:
            with c.stream("POST", C, json=comp(prompt="Hello", max_tokens=240, temperature=0, stream=True)) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
            t0 = time.monotonic()
            h = wait_idle(srv.url, timeout=5)
            assert time.monotonic() - t0 < 0.8  # well before the 240 tokens (> 1.2 s) were done
        assert h["kv_blocks_used"] == 0 and h["running"] == 0
        assert aborted == [True]  # the request was cut short, not run to the end
    finally:
        srv.engine.abort = real_abort


def test_non_stream_disconnect_aborts_request(ckpt_dir):
    s = start_server(ckpt_dir)
    aborted = []
    real_abort = s.engine.abort
    slow_down(s.engine, 0.005)  # 200 tokens take > 1 s: an abort is easy to tell from the end
    s.engine.abort = lambda rid: aborted.append(real_abort(rid)) or aborted[-1]
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{s.v1}/completions", json=comp(prompt="Hello", max_tokens=200, temperature=0), timeout=0.3)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 and not aborted and s.engine.has_unfinished():
            time.sleep(0.02)
        assert aborted == [True], "the request was not aborted when its client went away"
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------
# 9. graceful shutdown

def _stream_in_thread(url: str, body: dict):
    got = {"events": [], "error": None}

    def run():
        try:
            with httpx.stream("POST", f"{url}{C}", json={**body, "stream": True}, timeout=30) as r:
                for e in iter_sse(r.iter_lines()):
                    got["events"].append(e)
        except Exception as e:  # noqa: BLE001 - reported to the test
            got["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def _wait_events(got: dict, n: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(got["events"]) < n:
        assert got["error"] is None and time.monotonic() < deadline, got
        time.sleep(0.005)


def test_graceful_shutdown(ckpt_dir):
    s = start_server(ckpt_dir)
    slow_down(s.engine, 0.01)  # 64 tokens take > 0.6 s
    t, got = _stream_in_thread(s.url, comp(prompt="Hello", max_tokens=64, temperature=0))
    _wait_events(got, 2)
    assert s.engine.has_unfinished()  # shutting down while the stream is in flight
    t0 = time.monotonic()
    s.server.should_exit = True
    s.thread.join(10)
    assert not s.thread.is_alive() and time.monotonic() - t0 < 5
    t.join(10)
    # the stream in flight was let finish, then the engine stopped
    assert got["error"] is None and got["events"][-1] == "[DONE]"
    assert any(ch["finish_reason"] for e in got["events"] if isinstance(e, dict) for ch in e["choices"])
    assert not s.engine.has_unfinished() and s.engine.requests == {}
    assert s.aengine.num_in_flight == 0 and s.engine.kv.allocator.num_used == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health", timeout=2)


def test_shutdown_past_grace_period_frees_everything(ckpt_dir):
    s = start_server(ckpt_dir, uvicorn_kw={"timeout_graceful_shutdown": 0.3})
    slow_down(s.engine, 0.01)  # 240 tokens take > 2 s
    t, got = _stream_in_thread(s.url, comp(prompt="Hello", max_tokens=240, temperature=0))
    _wait_events(got, 2)
    assert s.engine.has_unfinished()
    t0 = time.monotonic()
    s.server.should_exit = True
    s.thread.join(10)
    assert not s.thread.is_alive() and time.monotonic() - t0 < 3
    t.join(10)
    assert not s.engine.has_unfinished() and s.engine.requests == {}
    assert s.aengine.num_in_flight == 0 and s.engine.kv.allocator.num_used == 0


def test_shutdown_never_aborts_during_a_step(ckpt_dir):
    s = start_server(ckpt_dir, uvicorn_kw={"timeout_graceful_shutdown": 0.3})
    e = s.engine
    st = {"in_step": False, "hold": False, "overlaps": 0}
    blocked, release = threading.Event(), threading.Event()
    real_step, real_abort = e.step, e.abort

    def step():
        st["in_step"] = True
        try:
            time.sleep(0.005)  # 200 tokens take > 1 s
            if st["hold"]:
                blocked.set()
                release.wait(1.0)  # a step that is slow to finish
            return real_step()
        finally:
            st["in_step"] = False

    def abort(rid):
        st["overlaps"] += st["in_step"]
        release.set()
        return real_abort(rid)

    e.step, e.abort = step, abort
    t, got = _stream_in_thread(s.url, comp(prompt="Hello", max_tokens=200, temperature=0))
    _wait_events(got, 2)
    st["hold"] = True
    assert blocked.wait(5)
    s.server.should_exit = True
    s.thread.join(10)
    t.join(10)
    assert not s.thread.is_alive()
    assert not e.has_unfinished() and e.kv.allocator.num_used == 0
    assert st["overlaps"] == 0, "engine.abort ran while engine.step was running in another thread"
