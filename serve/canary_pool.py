"""The canary prompts: a built-in pool, mixed with the operator's private ones (`serve.canary_prompts_file`).

The built-in pool is public (it is in this source), so a worker that reads it could recognise its prompts; it is
large and varied so that it does not stand out in traffic, and a private file (never published) closes that gap:
its prompts are drawn as often as the built-in ones put together. The file is JSONL: each line is a list of chat
messages (`[{"role": "system", "content": ...}, {"role": "user", "content": ...}]`) or `{"messages": [...]}`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from fedllm.core.errors import ConfigError

Messages = list[dict[str, str]]

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly and accurately.",
    "You are a friendly support agent for a small software company.",
    "You are an expert tutor. Explain things clearly to a beginner.",
    "You are a careful assistant; if you are unsure, say so.",
    "Answer in plain English without markdown.",
    "You are a helpful assistant for a team of data analysts.",
    "You are a writing assistant. Keep a neutral, professional tone.",
)

USER_PROMPTS = (
    "What is the difference between a list and a tuple in Python?",
    "Can you suggest a short title for a blog post about remote work?",
    "How do I politely decline a meeting invitation?",
    "Explain what an API is to someone who is not technical.",
    "What are the main causes of inflation?",
    "Write a two-sentence summary of the plot of Romeo and Juliet.",
    "How does a refrigerator keep food cold?",
    "Give me a simple recipe idea using rice, eggs and spinach.",
    "What is the Pythagorean theorem?",
    "How should I prepare for a job interview at a bank?",
    "Why is the sky blue?",
    "What does a project manager do day to day?",
    "Rewrite this more formally: hey, can u send me the report by friday?",
    "List three ways to reduce energy use at home.",
    "Explain recursion with a short example.",
    "What is the difference between weather and climate?",
    "How do vaccines train the immune system?",
    "Draft a one-line reminder about tomorrow's team standup.",
    "What is a good way to learn a new language as an adult?",
    "Explain the difference between TCP and UDP.",
    "What should I check before buying a used car?",
    "Summarise the benefits of version control for a small team.",
    "What is compound interest? Give a quick example.",
    "How do I convert Celsius to Fahrenheit?",
    "Suggest three names for a cat.",
    "What is photosynthesis?",
    "How can I make my SQL query faster if it scans a large table?",
    "Write a short thank-you note to a colleague who helped me move.",
    "What is the difference between RAM and storage?",
    "Explain what a mortgage is in simple terms.",
    "What are some tips for writing a good commit message?",
    "Why do leaves change colour in autumn?",
    "What is the role of a central bank?",
    "How do I start running if I have never exercised?",
    "Explain the idea of supply and demand.",
    "What is machine learning, in two sentences?",
    "Give an example of a metaphor and explain it.",
    "How do noise-cancelling headphones work?",
    "What is a good structure for a five-minute presentation?",
    "Describe the water cycle for a ten-year-old.",
    "What is the difference between a virus and a bacterium?",
    "How do I write a polite follow-up email after no reply?",
    "What are the pros and cons of working from home?",
    "Explain what a hash table is.",
    "How long should I boil an egg for a soft yolk?",
    "What is the capital of Australia, and why is it not Sydney?",
    "Translate 'where is the train station?' into French and German.",
    "Write a limerick about a forgetful robot.",
)


def builtin_pool() -> list[Messages]:
    """Every built-in canary: each user prompt alone and under each system prompt."""
    pool: list[Messages] = [[{"role": "user", "content": u}] for u in USER_PROMPTS]
    pool += [
        [{"role": "system", "content": s}, {"role": "user", "content": u}] for s in SYSTEM_PROMPTS for u in USER_PROMPTS
    ]
    return pool


def load_prompts_file(path: Path) -> list[Messages]:
    """The operator's canaries from a JSONL file.

    Raises:
        ConfigError: the file cannot be read, or a line is not a list of chat messages (the message names the line).
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"serve.canary_prompts_file {path} cannot be read: {exc.strerror or exc}") from exc
    prompts: list[Messages] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"serve.canary_prompts_file {path}, line {number}"
        try:
            item: Any = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{where} is not JSON ({exc})") from exc
        messages = item.get("messages") if isinstance(item, dict) else item
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f'{where}: expected a list of chat messages or {{"messages": [...]}}')
        for m in messages:
            if not (
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
            ):
                raise ConfigError(
                    f'{where}: each message needs "role" (system, user or assistant) and a string "content"'
                )
        if messages[-1]["role"] != "user":
            raise ConfigError(f"{where}: the last message must be the user's")
        prompts.append([{"role": m["role"], "content": m["content"]} for m in messages])
    if not prompts:
        raise ConfigError(f"serve.canary_prompts_file {path} holds no prompt")
    return prompts


class CanaryPool:
    """Draws canary conversations: half the time from the operator's file (when set), else from the built-in pool."""

    def __init__(self, prompts_file: Path | None = None, rng: random.Random | None = None):
        self.builtin = builtin_pool()
        self.private = load_prompts_file(prompts_file) if prompts_file is not None else []
        self._rng = rng or random.SystemRandom()

    def __len__(self) -> int:
        return len(self.builtin) + len(self.private)

    def draw(self) -> Messages:
        """One conversation, copied (the caller may send it as it is)."""
        source = self.private if self.private and self._rng.random() < 0.5 else self.builtin
        return [dict(m) for m in self._rng.choice(source)]
