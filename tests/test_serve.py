"""The OpenAI-compatible server (moekit.serve) over real uvicorn servers on 127.0.0.1: the official
`openai` client, greedy parity with the engine, logprobs and Prometheus metrics. Bad requests,
auth, overload, timeouts, load and shutdown: test_serve_robustness.py.

A tiny random model and a byte-level tokenizer trained on a few sentences stand in for a trained
checkpoint (see serve_helpers.py; the server fixtures are in conftest.py).
"""

from __future__ import annotations


import pytest

from serve_helpers import MODEL_NAME, chat_prompt, comp, metric_value, engine_greedy, sse_events

C, CH = "/v1/completions", "/v1/chat/completions"
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


# ------------------------------------------------------------------------------------------------
# 1. the official openai client

def test_models_list(oai, srv):
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].max_model_len == srv.engine.max_model_len == 256


def test_completion(oai, tok):
    r = oai.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL_NAME and r.id.startswith("cmpl-")
    (c,) = r.choices
    assert c.index == 0 and isinstance(c.text, str) and c.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tok.encode("Hello world"))
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion(oai, tok):
    r = oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tok.encode(chat_prompt(MSGS)))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("prompt", ["def ", "The quick brown fox"])
def test_completion_stream_equals_non_stream(oai, prompt):
    full = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == full.usage.model_dump()
    assert all(ch.usage is None for ch in chunks[:-1])
    assert len({ch.id for ch in chunks}) == 1


def test_chat_stream_equals_non_stream(oai):
    full = oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=12, temperature=0)
    chunks = list(oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_n_choices(oai):
    r = oai.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=8, temperature=1.0, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("length", "stop") for c in r.choices)
    chat = oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=8, temperature=0.8, n=3)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    assert chat.usage.completion_tokens <= 3 * 8


def test_n_choices_stream(oai):
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=8, temperature=1.0,
                                         n=3, seed=7, stream=True, stream_options={"include_usage": True}))
    texts, finish = {0: "", 1: "", 2: ""}, {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                assert c.index not in finish
                finish[c.index] = c.finish_reason
    assert sorted(finish) == [0, 1, 2]
    # each streamed choice equals the same seeded request without streaming
    full = oai.completions.create(model=MODEL_NAME, prompt="Once upon", max_tokens=8, temperature=1.0, n=3, seed=7)
    assert {c.index: c.text for c in full.choices} == texts
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def _printable_stop(text: str) -> str | None:
    """A 2-character ASCII stop string that occurs in text after its first character."""
    for i in range(1, len(text) - 1):
        s = text[i:i + 2]
        if s.isascii() and s.isprintable() and not s.isspace():
            return s
    return None


def test_stop_strings(oai):
    for prompt in ("def ", "Hello world", "The quick brown fox", "import os"):
        full = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
        stop = _printable_stop(full)
        if stop:
            break
    assert stop, "no greedy output with an ASCII pair to stop at"
    expected = full[:full.find(stop)]
    r = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == expected and stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0,
                                         stop=stop, stream=True))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == ["stop"]


def test_stop_strings_chat(oai):
    full = oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = _printable_stop(text)
    if stop is None:
        pytest.skip("greedy chat output has no ASCII pair to stop at")
    r = oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=24, temperature=0, stop=stop)
    assert r.choices[0].message.content == text[:text.find(stop)]
    assert stop not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_seed_reproducible(oai):
    kw = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, temperature=1.0)
    a = oai.completions.create(seed=1234, **kw).choices[0].text
    b = oai.completions.create(seed=1234, **kw).choices[0].text
    assert a == b
    others = {oai.completions.create(seed=s, **kw).choices[0].text for s in (1, 2, 3)}
    assert len(others | {a}) > 1  # the seed matters
    ckw = dict(model=MODEL_NAME, messages=MSGS, max_tokens=12, temperature=1.0, seed=99)
    assert (oai.chat.completions.create(**ckw).choices[0].message.content
            == oai.chat.completions.create(**ckw).choices[0].message.content)


def test_completion_logprobs(oai):
    r = oai.completions.create(model=MODEL_NAME, prompt="def ", max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(v <= 0 for v in lp.token_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and all(v <= 0 for v in top.values())
        assert chosen >= max(top.values()) - 1e-5  # greedy picks the most likely token
    # sampled tokens have logprobs too, and they need not be the top ones
    r = oai.completions.create(model=MODEL_NAME, prompt="def ", max_tokens=6, temperature=1, seed=3, logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == r.usage.completion_tokens and all(v <= 0 for v in lp.token_logprobs)
    assert all(top == {} for top in lp.top_logprobs)


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2
        assert all(t.logprob <= 0 for t in e.top_logprobs)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)
    r = oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=4)
    assert r.choices[0].logprobs is None


def test_usage_counts_match_generated_tokens(oai, tok, ref_engine):
    for prompt in ("Hello world", "import os\n"):
        out = engine_greedy(ref_engine, prompt, 10)
        r = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0, logprobs=0)
        assert r.usage.prompt_tokens == len(tok.encode(prompt)) == out.num_prompt_tokens
        assert r.usage.completion_tokens == len(out.output_token_ids) == len(r.choices[0].logprobs.tokens)
    r = oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=5, temperature=0)
    out = engine_greedy(ref_engine, chat_prompt(MSGS), 5)
    assert r.usage.prompt_tokens == len(tok.encode(chat_prompt(MSGS)))
    assert r.usage.completion_tokens == len(out.output_token_ids)


def test_token_prompt(oai, tok):
    ids = tok.encode("Hello world")
    a = oai.completions.create(model=MODEL_NAME, prompt=[ids], max_tokens=6, temperature=0)
    b = oai.completions.create(model=MODEL_NAME, prompt="Hello world", max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text and a.usage == b.usage


@pytest.mark.parametrize("n", [1, 3])
def test_flat_token_prompt(http, tok, n):
    ids = tok.encode("Hello world there")[:n]
    assert len(ids) == n
    a = http.post(C, json=comp(prompt=ids, max_tokens=4, temperature=0))
    b = http.post(C, json=comp(prompt=[ids], max_tokens=4, temperature=0))
    assert b.status_code == 200
    assert a.status_code == 200, a.text
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]


# ------------------------------------------------------------------------------------------------
# 2. greedy through HTTP equals the engine

@pytest.mark.parametrize("prompt", ["Hello", "def add(a, b):", "The weather is", "for i in range(10):\n",
                                    "What is the capital of France?"])
def test_greedy_http_equals_engine(oai, ref_engine, prompt):
    out = engine_greedy(ref_engine, prompt, 10)
    r = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == out.text
    assert r.choices[0].finish_reason == out.finish_reason


def test_greedy_chat_equals_engine(oai, ref_engine):
    out = engine_greedy(ref_engine, chat_prompt(MSGS), 10)
    r = oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == out.text


# ------------------------------------------------------------------------------------------------
# logprobs details

def test_stream_logprobs_equal_non_stream(http):
    body = comp(prompt="def ", max_tokens=10, temperature=0, logprobs=2)
    full = http.post(C, json=body).json()["choices"][0]["logprobs"]
    with http.stream("POST", C, json={**body, "stream": True}) as r:
        events = [e for e in sse_events(r.iter_lines()) if isinstance(e, dict)]
    toks, lps = [], []
    for e in events:
        lp = e["choices"][0]["logprobs"]
        if lp:
            toks += lp["tokens"]
            lps += lp["token_logprobs"]
    assert toks == full["tokens"]
    assert lps == pytest.approx(full["token_logprobs"], abs=1e-6)


def test_stream_text_offset_is_cumulative(http):
    body = comp(prompt="def ", max_tokens=10, temperature=0, logprobs=1)
    full = http.post(C, json=body).json()["choices"][0]["logprobs"]
    with http.stream("POST", C, json={**body, "stream": True}) as r:
        events = [e for e in sse_events(r.iter_lines()) if isinstance(e, dict)]
    offsets = [o for e in events if e["choices"][0]["logprobs"] for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == full["text_offset"]


def test_completion_top_logprobs_keep_the_best_of_equal_strings(http):
    body = comp(prompt="def ", max_tokens=12, temperature=0, logprobs=3)
    lp = http.post(C, json=body).json()["choices"][0]["logprobs"]
    for token, chosen, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == pytest.approx(chosen, abs=1e-6), (token, chosen, top)  # greedy: chosen is the top


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character map, inverted (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def test_chat_logprob_bytes_are_the_token_bytes(http, tok, ref_engine):
    out = engine_greedy(ref_engine, chat_prompt(MSGS), 12)
    dec = _byte_decoder()
    expected = [list(bytes(dec[ch] for ch in tok.hf.id_to_token(t))) for t in out.output_token_ids
                if t != tok.eot_id]
    # precondition: the greedy output has a token that is not valid UTF-8 on its own
    assert any(bytes(b).decode("utf-8", "replace") != bytes(b).decode("utf-8", "ignore") for b in expected)
    r = http.post(CH, json={"model": MODEL_NAME, "messages": MSGS, "max_tokens": 12, "temperature": 0,
                            "logprobs": True}).json()
    got = [e["bytes"] for e in r["choices"][0]["logprobs"]["content"]][:len(expected)]
    assert got == expected


# ------------------------------------------------------------------------------------------------
# 8. /metrics

def test_metrics(http, oai):
    oai.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4)
    oai.chat.completions.create(model=MODEL_NAME, messages=MSGS, max_tokens=4)
    http.post(C, json=comp(temperature=-1))
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric_value(text, "moekit_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert metric_value(text, "moekit_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert metric_value(text, "moekit_requests_total", endpoint="/v1/completions", status="400") >= 1
    assert metric_value(text, "moekit_generation_tokens_total") > 0
    assert metric_value(text, "moekit_prompt_tokens_total") > 0
    assert metric_value(text, "moekit_time_to_first_token_seconds_count") >= 2
    assert metric_value(text, "moekit_time_to_first_token_seconds_bucket", le="+Inf") >= 2
    assert metric_value(text, "moekit_e2e_request_latency_seconds_count") >= 2
    assert metric_value(text, "moekit_kv_blocks_total") == 1023
    assert metric_value(text, "moekit_kv_blocks_used") == 0
    assert metric_value(text, "moekit_requests_running") == 0
    assert metric_value(text, "moekit_requests_waiting") == 0
    assert metric_value(text, "moekit_preemptions") is not None




def test_speculative_server_reports_its_proposers(ckpt_dir, ref_engine):
    """A server with a draft model (the checkpoint itself) and prompt lookup next to it: greedy
    output equal to the engine alone, and /metrics counts its speculative steps, the lookup steps
    among them, and the acceptance at each position."""
    from fastapi.testclient import TestClient

    from serve_helpers import ENGINE_KW, build_app_with_draft

    app = build_app_with_draft(ckpt_dir, dict(ENGINE_KW, num_speculative_tokens=3, prompt_lookup_max=3))
    prompt = "hello world hello world hello world hello"
    with TestClient(app) as c:
        r = c.post(C, json=comp(prompt=prompt, max_tokens=16, temperature=0))
        text = c.get("/metrics").text
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == engine_greedy(ref_engine, prompt, 16).text
    steps = metric_value(text, "moekit_spec_steps")
    assert steps > 0 and 0 <= metric_value(text, "moekit_spec_lookup_steps") <= steps
    assert 0 < metric_value(text, "moekit_spec_acceptance_rate") <= 1
    assert [metric_value(text, "moekit_spec_accepted_at_position", position=str(j)) is not None
            for j in range(3)] == [True] * 3


def test_prefix_caching_server_reuses_a_shared_system_prompt(ckpt_dir, ref_engine):
    """`--enable-prefix-caching`: two chat requests with one long system prompt; the second finds
    the system prompt's whole blocks in the cache (/metrics), and both answer as the engine alone."""
    from fastapi.testclient import TestClient

    from moekit.infer.engine import EngineConfig
    from serve_helpers import ENGINE_KW, build

    app, _ = build(ckpt_dir, EngineConfig(**dict(ENGINE_KW, prefix_caching=True)))
    system = {"role": "system", "content": "You are a careful assistant. " * 8}
    chats = [[system, {"role": "user", "content": q}] for q in ("hello there", "what is moekit?")]
    with TestClient(app) as c:
        answers = [c.post(CH, json=dict(model=MODEL_NAME, messages=m, max_tokens=6, temperature=0))
                   for m in chats]
        text = c.get("/metrics").text
    for r, m in zip(answers, chats):
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == engine_greedy(ref_engine, chat_prompt(m), 6).text
    assert metric_value(text, "moekit_prefix_cache_hit_tokens") >= 32
    assert metric_value(text, "moekit_prefix_cache_query_tokens") > metric_value(text, "moekit_prefix_cache_hit_tokens")
