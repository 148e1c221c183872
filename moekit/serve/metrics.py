"""Prometheus metrics of the server and the engine, in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moekit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("moekit_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("moekit_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("moekit_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY, registry=r)
        self.tpot = Histogram("moekit_time_per_output_token_seconds", "mean time between output tokens",
                              buckets=_LATENCY, registry=r)
        self.e2e = Histogram("moekit_e2e_request_latency_seconds", "arrival to last token", buckets=_LATENCY, registry=r)
        self.http = Histogram("moekit_http_request_seconds", "HTTP handler time", buckets=_LATENCY, registry=r)
        Gauge("moekit_requests_running", "requests in the running batch", registry=r).set_function(
            lambda: len(engine.scheduler.running))
        Gauge("moekit_requests_waiting", "requests waiting to be scheduled", registry=r).set_function(
            lambda: len(engine.scheduler.waiting))
        Gauge("moekit_kv_blocks_used", "KV cache blocks in use", registry=r).set_function(
            lambda: engine.kv.allocator.num_used)
        Gauge("moekit_kv_blocks_total", "KV cache blocks", registry=r).set_function(
            lambda: engine.kv.allocator.num_blocks - 1)
        Gauge("moekit_preemptions", "requests preempted (recomputed) so far", registry=r).set_function(
            lambda: engine.scheduler.num_preemptions)
        if engine.kv.allocator.caching:
            Gauge("moekit_prefix_cache_query_tokens", "tokens of admitted requests, looked up in the prefix cache",
                  registry=r).set_function(lambda: engine.scheduler.prefix_query_tokens)
            Gauge("moekit_prefix_cache_hit_tokens", "tokens found in the prefix cache, not computed again",
                  registry=r).set_function(lambda: engine.scheduler.prefix_hit_tokens)

        if engine.spec is not None:
            stats = engine.spec.stats
            Gauge("moekit_spec_acceptance_rate", "accepted / proposed draft tokens", registry=r).set_function(
                lambda: stats.acceptance_rate)
            Gauge("moekit_spec_mean_accepted_length", "tokens emitted per speculative request-step",
                  registry=r).set_function(lambda: stats.mean_accepted_length)
            Gauge("moekit_spec_steps", "speculative steps so far", registry=r).set_function(lambda: stats.steps)
            Gauge("moekit_spec_lookup_steps", "speculative steps proposed by prompt lookup next to a draft model",
                  registry=r).set_function(lambda: stats.lookup_steps)
            accepted_at = Gauge("moekit_spec_accepted_at_position", "proposals accepted at each draft position",
                                ["position"], registry=r)
            for j in range(len(stats.accepted_at)):
                accepted_at.labels(str(j)).set_function(lambda j=j: stats.accepted_at[j])

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.http.observe(seconds)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, prompt_tokens: int, output_tokens: int, e2e: float, ttft: float | None) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(output_tokens)
        self.e2e.observe(e2e)
        if ttft is not None and output_tokens > 1:
            self.tpot.observe((e2e - ttft) / (output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
