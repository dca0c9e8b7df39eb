"""What both OpenAI APIs reduce to: a validated generation job, and what came out of it."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from runtime.serve.harmony_stream import CALL, REASONING, TEXT, Part


@dataclass(frozen=True)
class Defaults:
    """Server-side values for what a request leaves out."""

    model: str
    """The served model id (GET /v1/models)."""
    temperature: float
    top_p: float
    effort: str


@dataclass
class Job:
    """A request, checked: a harmony-renderable conversation plus the generation parameters."""

    model: str
    messages: list[dict[str, Any]]
    """OpenAI chat messages (system/developer/user/assistant with tool_calls and reasoning/tool)."""
    tools: list[dict[str, Any]]
    effort: str
    max_tokens: int | None
    temperature: float
    top_p: float
    stream: bool
    body: dict[str, Any] = field(default_factory=dict)
    """The request as sent (Responses echoes some of it)."""
    prompt_ids: list[int] | None = None
    """A raw prompt's token ids (POST /v1/completions); None: `messages` rendered in harmony."""
    ignore_eos: bool = False
    """Generate through stop tokens up to the token limit (vLLM's extension, for benchmarks)."""
    default_max_tokens: int | None = None
    """The limit when the request sets none; None: all the room the context leaves."""


@dataclass
class Outcome:
    """A finished generation: token counts, why it ended, and its parts in order."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    finish: str
    """`stop`, `tool_call` or `length`."""
    parts: list[Part]
    cached_tokens: int = 0
    """Prompt tokens whose keys were reused from the cache, not computed (the prefix cache)."""

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if p.kind == TEXT)

    @property
    def reasoning(self) -> str:
        return "".join(p.text for p in self.parts if p.kind == REASONING)

    @property
    def calls(self) -> list[Part]:
        return [p for p in self.parts if p.kind == CALL]


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()
