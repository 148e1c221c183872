"""Sampling parameters and the batched sampler: greedy, temperature, top-k, top-p, penalties,
per-request seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit.errors import ConfigError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever the batch
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; n >= 0 = the chosen token's logprob and the top n
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> "SamplingParams":
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ConfigError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        return self


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: [B, V]; top_k: [B] (0 = off); top_p: [B]. Returns logits with the excluded tokens
    at -inf. Top-p keeps the smallest set of most likely tokens whose mass reaches top_p."""
    V = logits.shape[-1]
    sorted_logits, idx = logits.sort(-1, descending=True)  # [B, V]
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # drop a token when the tokens ranked above it already hold top_p of the mass
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    return logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One set of parameters for the whole batch: logits [B, V] -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    B = logits.shape[0]
    logits = top_k_top_p_mask(logits.float() / temperature, torch.full((B,), top_k, device=logits.device),
                              torch.full((B,), top_p, device=logits.device))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class SampleResult:
    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]  # (chosen logprob, top n) per row


class Sampler:
    """Samples one token per row, each row with its own parameters. Seeded rows draw from their own
    generator (exponential race: argmax p / q with q ~ Exp(1)), so their tokens do not depend on
    what else is in the batch."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.shared = torch.Generator(device=device)
        self.shared.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], generators: list,
                 histories: list[list[int]]) -> SampleResult:
        """logits: [B, V]; generators: per row a torch.Generator or None; histories: output tokens so far."""
        logits = logits.float()
        raw = logits
        B, V = logits.shape
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            logits = logits.clone()
            for i, (p, hist) in enumerate(zip(params, histories)):
                if hist and (p.presence_penalty or p.frequency_penalty):
                    counts = torch.bincount(torch.tensor(hist, device=self.device), minlength=V).float()
                    logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        tokens = logits.argmax(-1)
        if not all(p.temperature == 0 for p in params):  # decided on the host: an all-greedy step syncs once
            greedy = torch.tensor([p.temperature == 0 for p in params], device=self.device)
            temps = torch.tensor([p.temperature or 1.0 for p in params], device=self.device)
            top_k = torch.tensor([p.top_k for p in params], device=self.device)
            top_p = torch.tensor([p.top_p for p in params], device=self.device)
            probs = top_k_top_p_mask(logits / temps[:, None], top_k, top_p).softmax(-1)  # [B, V]
            q = torch.empty_like(probs).exponential_(generator=self.shared)
            for i, g in enumerate(generators):
                if g is not None:
                    q[i].exponential_(generator=g)
            tokens = torch.where(greedy, tokens, (probs / q).argmax(-1))
        out_tokens = tokens.tolist()
        lps: list = [None] * B
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            logp = raw[want].log_softmax(-1)
            n = max(params[i].logprobs for i in want)
            top_v, top_i = logp.topk(max(n, 1), -1)
            chosen = logp.gather(1, tokens[want][:, None]).squeeze(1)
            for j, i in enumerate(want):
                k = params[i].logprobs
                lps[i] = (chosen[j].item(), list(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist())))
        return SampleResult(out_tokens, lps)
