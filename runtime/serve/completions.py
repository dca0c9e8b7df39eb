"""POST /v1/completions: raw text in, raw text out (the OpenAI completions API), streamed token by token.

The prompt is not a conversation: it is tokenized as it is (harmony's special tokens written in it, such
as `<|start|>`, become those tokens, so a client can send harmony it rendered itself), or sent as token ids.
The answer is the generated tokens decoded as text, special tokens by name, with no harmony parsing; the
stop token that ended the turn is not shown. `ignore_eos` (vLLM's extension) lets generation run through
stop tokens to `max_tokens`: serving benchmarks use it to fix output lengths, so per-token arrival can be
measured on any weights (`runtime.bench bench.mode=serve` does).
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Any

from runtime import harmony
from runtime.serve import fields as f
from runtime.serve.fields import ApiError
from runtime.serve.harmony_stream import TEXT, Event, Part, token_bytes
from runtime.serve.job import Defaults, Job, Outcome, new_id, sse

PATH = "/v1/completions"
DEFAULT_MAX_TOKENS = 16
"""OpenAI's (and vLLM's) default `max_tokens` for this API."""

IMPLEMENTED = {"model", "prompt", "stream", "stream_options", "max_tokens", "temperature", "top_p", "ignore_eos"}
REFUSED = {"n", "best_of", "echo", "logprobs", "stop", "suffix", "presence_penalty", "frequency_penalty",
           "logit_bias"}


def parse(body: dict[str, Any], defaults: Defaults) -> Job:
    model = f.required(body, "model", str)
    prompt_ids = _prompt(body.get("prompt"))
    _refuse(body)
    f.ignore(PATH, body, IMPLEMENTED | REFUSED)
    stream = f.optional(body, "stream", bool, default=False)
    options = f.optional(body, "stream_options", dict, default={})
    f.optional(options, "include_usage", bool, "stream_options.")
    temperature, top_p = f.sampling(body, defaults.temperature, defaults.top_p)
    return Job(model=model, messages=[], tools=[], effort=defaults.effort, max_tokens=f.positive_int(body, "max_tokens"),
               temperature=temperature, top_p=top_p, stream=stream, body=body, prompt_ids=prompt_ids,
               ignore_eos=f.optional(body, "ignore_eos", bool, default=False), default_max_tokens=DEFAULT_MAX_TOKENS)


def _prompt(prompt: Any) -> list[int]:
    """A string, token ids, or a list holding one of those -> token ids."""
    if prompt is None:
        raise ApiError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise f.invalid_value("prompt", "the prompt is empty.")
        return harmony.encoding().encode(prompt, allowed_special="all")
    if isinstance(prompt, list) and not prompt:
        raise f.invalid_value("prompt", "the prompt is empty.")
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        try:
            harmony.encoding().decode(prompt)  # every id is one of the vocabulary's
        except Exception:  # noqa: BLE001 - harmony raises its own error type, or OverflowError for huge ids
            raise f.invalid_value("prompt", "a token id is not in the vocabulary (o200k_harmony).") from None
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise f.unsupported("prompt", f"{len(prompt)} prompts in one request: send one prompt per request.")
    raise f.invalid_type("prompt", "a string or an array of token ids", prompt)


def _refuse(body: dict[str, Any]) -> None:
    """Fields whose silent omission would change the result."""
    for key in ("n", "best_of"):
        n = f.optional(body, key, int)
        if n is not None and n != 1:
            raise f.unsupported(key, f"{key}={n}: one completion per request; send {n} requests instead.")
    if f.optional(body, "echo", bool):
        raise f.unsupported("echo", "the prompt is not echoed back.")
    if body.get("logprobs") is not None:
        raise f.unsupported("logprobs", "log probabilities are not returned.")
    if body.get("stop"):
        raise f.unsupported("stop", "stop sequences are not implemented; generation stops at a stop token "
                                    "(or at max_tokens with ignore_eos).")
    if body.get("suffix"):
        raise f.unsupported("suffix", "insertion (suffix) is not implemented.")
    for key in ("presence_penalty", "frequency_penalty"):
        if f.optional(body, key, float):
            raise f.unsupported(key, "penalties are not implemented; leave it 0.")
    if body.get("logit_bias"):
        raise f.unsupported("logit_bias", "logit biases are not implemented.")


@dataclass
class RawStream:
    """Generated ids -> text, decoded as they come (a UTF-8 sequence split over tokens waits for its end).
    The same interface as HarmonyStream: `feed`, `close`, `parts` (one text part), `reasoning_tokens`."""

    end_ids: frozenset[int]
    """Stop tokens: not shown when they end the generation (with ignore_eos they are text like any token)."""
    ignore_eos: bool = False
    parts: list[Part] = field(default_factory=list)
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tokens: list[int]) -> list[Event]:
        shown = tokens if self.ignore_eos else [t for t in tokens if t not in self.end_ids]
        return self._text(self._decoder.decode(b"".join(token_bytes(t) for t in shown)))

    def close(self) -> list[Event]:
        return self._text(self._decoder.decode(b"", final=True))

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        if not self.parts:
            self.parts.append(Part(TEXT))
        self.parts[0].text += text
        return [Event("delta", self.parts[0], text)]


def finish_reason(out: Outcome) -> str:
    return "length" if out.finish == "length" else "stop"


def usage(out: Outcome) -> dict[str, Any]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens, "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


class Formatter:
    """One request's answer: `body` (non-streaming), or `head`, `events`..., `tail` as SSE chunks."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.id = new_id("cmpl-")
        self.created = int(time.time())
        self.include_usage = bool((job.body.get("stream_options") or {}).get("include_usage"))

    def _choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.job.model,
                "choices": choices, "system_fingerprint": None}

    def body(self, out: Outcome) -> dict[str, Any]:
        return {**self._envelope([self._choice(out.text, finish_reason(out))]), "usage": usage(out)}

    def _chunk(self, text: str, finish: str | None = None) -> bytes:
        chunk = self._envelope([self._choice(text, finish)])
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def head(self) -> list[bytes]:
        return []  # this API's stream opens with the first text

    def events(self, events: list[Event]) -> list[bytes]:
        return [self._chunk(ev.delta) for ev in events if ev.type == "delta" and ev.delta]

    def tail(self, out: Outcome) -> list[bytes]:
        chunks = [self._chunk("", finish_reason(out))]
        if self.include_usage:
            chunks.append(sse({**self._envelope([]), "usage": usage(out)}))
        return [*chunks, sse("[DONE]")]

    def error(self, err: ApiError) -> list[bytes]:
        return [sse(err.body())]
