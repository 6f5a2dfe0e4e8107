"""Per-key rate limits: token buckets for requests per minute and tokens per minute, and what a request costs.

A request is charged its token budget up front (`token_budget`: an estimate of its prompt, plus its completion cap
times the completions it asks for) and settled against the usage the worker reports once it is done
(`RateLimiter.settle`): refunded when it used less, charged the rest when it used more. A metered request that names no
completion cap is given one (`serve.default_max_tokens`, injected by the router), so no worker generates more than
was charged for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TOKEN_BUDGET = 256  # tokens per choice when a request names no max_tokens (serve.default_max_tokens)
BYTES_PER_PROMPT_TOKEN = 4  # a request body's bytes per prompt token, for the up-front estimate (settled later)


def prompt_estimate(body_bytes: int) -> int:
    """Prompt tokens charged up front for a request body of `body_bytes` bytes (about 4 bytes of JSON per token for
    English text; the settlement replaces it with the worker's own count)."""
    return body_bytes // BYTES_PER_PROMPT_TOKEN + 1


def token_budget(
    max_tokens: int | None, choices: int, default: int = DEFAULT_TOKEN_BUDGET, prompt_tokens: int = 0
) -> int:
    """The tokens a request may cost: its prompt plus its per-choice completion cap times its choices.

    Args:
        max_tokens: the largest of the completion cap's spellings, None when none was given (then `default` stands
            in: the router injects it into a metered request, so the worker never generates more).
        choices: completions generated: the larger of `n` and `best_of`, times the prompts of a prompt list.
        prompt_tokens: the prompt's tokens (an estimate up front: `prompt_estimate`).
    """
    return prompt_tokens + (default if max_tokens is None else max_tokens) * choices


@dataclass
class TokenBucket:
    """A bucket of `per_minute` tokens refilling continuously. Times are seconds from any monotonic clock."""

    per_minute: float
    level: float = 0.0  # may go below zero: a debt (usage beyond the charge) that refills pay back first
    stamp: float | None = None  # None: never used yet (the bucket starts full)

    def _refill(self, now: float) -> None:
        if self.stamp is None:
            self.level, self.stamp = self.per_minute, now
            return
        self.level = min(self.per_minute, self.level + (now - self.stamp) * self.per_minute / 60.0)
        self.stamp = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` tokens are available (0 = available now). Takes nothing."""
        self._refill(now)
        amount = min(amount, self.per_minute)  # a request larger than the bucket waits for a full bucket
        return 0.0 if self.level >= amount else (amount - self.level) * 60.0 / self.per_minute

    def take(self, amount: float, now: float) -> None:
        """Take `amount` tokens (may go below zero: a debt paid back by refills)."""
        self._refill(now)
        self.level -= amount


@dataclass
class RateLimiter:
    """Request and token buckets per key name."""

    requests: dict[str, TokenBucket] = field(default_factory=dict)
    tokens: dict[str, TokenBucket] = field(default_factory=dict)

    def admit(self, key: str, rpm: int | None, tpm: int | None, tokens: int, now: float) -> float:
        """Admit one request costing `tokens`: returns 0 and charges the buckets, or the seconds to wait (no charge)."""
        rb = self.requests.setdefault(key, TokenBucket(rpm)) if rpm else None
        tb = self.tokens.setdefault(key, TokenBucket(tpm)) if tpm else None
        wait = max(rb.wait_s(1, now) if rb else 0.0, tb.wait_s(tokens, now) if tb else 0.0)
        if wait > 0:
            return wait
        if rb:
            rb.take(1, now)
        if tb:
            tb.take(tokens, now)
        return 0.0

    def settle(self, key: str, tpm: int | None, charged: int, used: int, now: float) -> None:
        """Correct the token bucket once the real usage is known (refund or extra charge)."""
        if tpm and key in self.tokens:
            self.tokens[key].take(used - charged, now)
