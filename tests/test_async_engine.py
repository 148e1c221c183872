"""The asyncio front of the engine: concurrent consumers see what the synchronous engine
produces, consumers that leave early free their blocks, bad requests fail only their own stream."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from moekit.errors import ConfigError
from moekit.infer.async_engine import AsyncEngine
from moekit.infer.engine import Engine, EngineConfig
from moekit.infer.sampling import SamplingParams
from tests.engine_helpers import (
    BS,
    assert_engine_idle,
    budget_for_blocks,
    get_model,
    greedy_reference,
    random_prompts,
)

# ------------------------------------------------------------------------------------------------
# AsyncEngine

def _async_requests(n: int = 20, seed: int = 14):
    rng = random.Random(seed)
    prompts = random_prompts(rng, [rng.randint(1, 40) for _ in range(n)])
    params = [SamplingParams(max_tokens=rng.randint(1, 12), temperature=0) for _ in range(n)]
    return prompts, params


def test_async_engine_concurrent_consumers_match_sync_engine():
    model = get_model()
    cfg = EngineConfig(kv_budget=budget_for_blocks(model, 60), block_size=BS, max_num_batched_tokens=32)
    prompts, params = _async_requests()
    sync = Engine(model, None, cfg).generate(prompts, params)

    async def main():
        aeng = AsyncEngine(Engine(model, None, cfg))

        async def consume(i):
            outs = []
            async for out in aeng.generate(prompts[i], params[i], f"c{i}"):
                outs.append(out)
            return outs

        res = await asyncio.gather(*(consume(i) for i in range(len(prompts))))
        await aeng.stop()
        return res, aeng

    res, aeng = asyncio.run(main())
    for i, outs in enumerate(res):
        toks = [t for o in outs for t in o.new_token_ids]
        assert toks == outs[-1].output_token_ids == sync[i].output_token_ids
        assert toks == greedy_reference(model, prompts[i], params[i].max_tokens)
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert all(not o.finished for o in outs[:-1])
    assert aeng.errors == 0 and aeng.num_in_flight == 0
    assert_engine_idle(aeng.engine)


def test_async_consumers_that_leave_early_free_their_blocks():
    model = get_model()
    engine = Engine(model, None, EngineConfig(kv_budget=budget_for_blocks(model, 120), block_size=BS))
    rng = random.Random(15)
    n = 20
    prompts = random_prompts(rng, [rng.randint(1, 10) for _ in range(n)])
    long = SamplingParams(max_tokens=100, temperature=0)
    short = SamplingParams(max_tokens=4, temperature=0)
    roles = ["break", "aclosing", "cancel", "complete"] * (n // 4)

    async def main():
        aeng = AsyncEngine(engine)
        grabbed = {}

        async def consume(i):
            rid = f"a{i}"
            got = []
            if roles[i] == "break":  # plain break: the generator is closed when collected
                async for out in aeng.generate(prompts[i], long, rid):
                    grabbed.setdefault(rid, engine.requests.get(rid))
                    got.append(out)
                    if len(got) == 2:
                        break
            elif roles[i] == "aclosing":
                async with contextlib.aclosing(aeng.generate(prompts[i], long, rid)) as gen:
                    async for out in gen:
                        grabbed.setdefault(rid, engine.requests.get(rid))
                        got.append(out)
                        if len(got) == 3:
                            break
            elif roles[i] == "cancel":
                async for out in aeng.generate(prompts[i], long, rid):
                    grabbed.setdefault(rid, engine.requests.get(rid))
                    got.append(out)
                    await asyncio.sleep(3600)  # cancelled while holding the stream
            else:
                async for out in aeng.generate(prompts[i], short, rid):
                    got.append(out)
            return got

        tasks = [asyncio.create_task(consume(i)) for i in range(n)]
        for _ in range(2000):  # until every "cancel" consumer has its first token
            if all(f"a{i}" in grabbed for i in range(n) if roles[i] == "cancel"):
                break
            await asyncio.sleep(0.005)
        for i, t in enumerate(tasks):
            if roles[i] == "cancel":
                t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(2000):  # the loop applies the queued aborts between steps
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.005)
        in_flight = aeng.num_in_flight
        await aeng.stop()
        return results, grabbed, in_flight

    results, grabbed, in_flight = asyncio.run(main())
    assert in_flight == 0
    assert_engine_idle(engine)
    for i, r in enumerate(results):
        if roles[i] == "cancel":
            assert isinstance(r, asyncio.CancelledError)
        elif roles[i] == "complete":
            assert r[-1].finished and r[-1].output_token_ids == greedy_reference(model, prompts[i], 4)
        else:
            assert len(r) == (2 if roles[i] == "break" else 3)
    for rid, req in grabbed.items():  # the early leavers were aborted, not run to max_tokens
        assert req is not None and req.finish_reason == "abort" and len(req.output_ids) < 100


def test_async_bad_request_raises_in_its_consumer_only():
    model = get_model()
    prompts, params = _async_requests(4, seed=16)

    async def main():
        aeng = AsyncEngine(Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS)))

        async def consume(i):
            return [o async for o in aeng.generate(prompts[i], params[i], f"g{i}")]

        async def bad():
            with pytest.raises(ConfigError, match="temperature"):
                async for _ in aeng.generate([1, 2], SamplingParams(temperature=-1.0), "bad"):
                    pass
            return "raised"

        res = await asyncio.gather(bad(), *(consume(i) for i in range(4)))
        await aeng.stop()
        return res, aeng

    res, aeng = asyncio.run(main())
    assert res[0] == "raised"
    for i, outs in enumerate(res[1:]):
        assert outs[-1].output_token_ids == greedy_reference(model, prompts[i], params[i].max_tokens)
    assert_engine_idle(aeng.engine)


async def _wait_until(cond, tries: int = 400):
    for _ in range(tries):
        if cond():
            return True
        await asyncio.sleep(0.005)
    return cond()


def test_async_duplicate_request_id_does_not_break_the_first_stream():
    model = get_model()
    prompt = [1, 2, 3]

    async def main():
        aeng = AsyncEngine(Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS)))
        first_out = asyncio.Event()

        async def first():
            outs = []
            async for o in aeng.generate(prompt, SamplingParams(max_tokens=40, temperature=0), "dup"):
                outs.append(o)
                first_out.set()
            return outs

        t1 = asyncio.create_task(first())
        await first_out.wait()
        with pytest.raises(ConfigError):
            async for _ in aeng.generate(prompt, SamplingParams(max_tokens=5, temperature=0), "dup"):
                pass
        try:
            await _wait_until(lambda: not aeng.engine.has_unfinished())
            await _wait_until(t1.done, tries=20)
            assert t1.done()
            outs = t1.result()
            assert outs[-1].output_token_ids == greedy_reference(model, prompt, 40)
        finally:
            t1.cancel()
            await aeng.stop()

    asyncio.run(main())


def test_async_stop_ends_in_flight_streams():
    model = get_model()

    async def main():
        aeng = AsyncEngine(Engine(model, None, EngineConfig(kv_budget="1MiB", block_size=BS)))
        got = asyncio.Event()

        async def consume():
            async for _ in aeng.generate([4, 5, 6], SamplingParams(max_tokens=100, temperature=0), "s"):
                got.set()

        t = asyncio.create_task(consume())
        await got.wait()
        await aeng.stop()
        try:
            assert_engine_idle(aeng.engine)
            await _wait_until(t.done, tries=40)
            assert t.done()  # ended: a final 'abort' output or an exception, either way not hanging
        finally:
            t.cancel()

    asyncio.run(main())
