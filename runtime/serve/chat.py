"""POST /v1/chat/completions: the request as a Job, the answer as a chat.completion or its chunks.

The analysis channel comes back as `reasoning_content`, the final channel as `content`, tool calls as
`tool_calls` (finish_reason `tool_calls`). An assistant message's `reasoning_content` (or `reasoning`)
and `tool_calls`, and `tool` messages, continue a conversation.
"""

from __future__ import annotations

import time
from typing import Any

from runtime.serve import fields as f
from runtime.serve.fields import ApiError
from runtime.serve.harmony_stream import CALL, REASONING, TEXT, Event, Part
from runtime.serve.job import Defaults, Job, Outcome, new_id, sse

PATH = "/v1/chat/completions"

IMPLEMENTED = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
               "top_p", "reasoning_effort", "tools", "tool_choice"}
REFUSED = {"n", "logprobs", "top_logprobs", "stop", "response_format", "presence_penalty", "frequency_penalty",
           "logit_bias", "functions", "function_call", "audio", "modalities", "web_search_options"}


def parse(body: dict[str, Any], defaults: Defaults) -> Job:
    model = f.required(body, "model", str)
    messages = _messages(f.required(body, "messages", list))
    _refuse(body)
    f.ignore(PATH, body, IMPLEMENTED | REFUSED)
    stream = f.optional(body, "stream", bool, default=False)
    options = f.optional(body, "stream_options", dict, default={})
    f.optional(options, "include_usage", bool, "stream_options.")
    max_tokens = f.positive_int(body, "max_completion_tokens") or f.positive_int(body, "max_tokens")
    temperature, top_p = f.sampling(body, defaults.temperature, defaults.top_p)
    tools = f.tool_choice(body.get("tool_choice"), f.function_tools(body.get("tools")))
    return Job(model=model, messages=messages, tools=tools,
               effort=f.effort(body.get("reasoning_effort"), "reasoning_effort", defaults.effort),
               max_tokens=max_tokens, temperature=temperature, top_p=top_p, stream=stream, body=body)


def _refuse(body: dict[str, Any]) -> None:
    """Fields whose silent omission would change the result."""
    n = f.optional(body, "n", int)
    if n is not None and n != 1:
        raise f.unsupported("n", f"n={n}: one choice per request; send {n} requests instead.")
    if f.optional(body, "logprobs", bool):
        raise f.unsupported("logprobs", "log probabilities are not returned.")
    if f.optional(body, "top_logprobs", int):
        raise f.unsupported("top_logprobs", "log probabilities are not returned.")
    if body.get("stop"):
        raise f.unsupported("stop", "stop sequences are not implemented; the model stops at the end of its turn.")
    fmt = f.optional(body, "response_format", dict)
    if fmt and fmt.get("type", "text") != "text":
        raise f.unsupported("response_format", f"type {fmt.get('type')!r}: structured output is not implemented.")
    for key in ("presence_penalty", "frequency_penalty"):
        if f.optional(body, key, float):
            raise f.unsupported(key, "penalties are not implemented; leave it 0.")
    if body.get("logit_bias"):
        raise f.unsupported("logit_bias", "logit biases are not implemented.")
    for key in ("functions", "function_call"):
        if body.get(key) is not None:
            raise f.unsupported(key, "the legacy functions API is not served; use tools.")
    if body.get("audio") is not None or "audio" in (f.optional(body, "modalities", list) or []):
        raise f.unsupported("audio", "gpt-oss answers in text only.")
    if body.get("web_search_options") is not None:
        raise f.unsupported("web_search_options", "there is no web search here.")


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI chat messages checked and reduced to what harmony renders."""
    if not messages:
        raise f.invalid_value("messages", "the conversation is empty.")
    out = []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise f.invalid_type(p, "an object", m)
        role = f.required(m, "role", str, f"{p}.")
        if role in ("system", "developer", "user"):
            out.append({"role": role, "content": f.text_content(m.get("content"), f"{p}.content")})
        elif role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": f.text_content(m.get("content"), f"{p}.content")}
            for key in ("reasoning_content", "reasoning"):
                if m.get(key) is not None:
                    msg["reasoning"] = f.text_content(m[key], f"{p}.{key}")
            calls = f.optional(m, "tool_calls", list, f"{p}.", default=[])
            msg["tool_calls"] = [_call(c, f"{p}.tool_calls[{j}]") for j, c in enumerate(calls)]
            out.append(msg)
        elif role == "tool":
            out.append({"role": "tool", "content": f.text_content(m.get("content"), f"{p}.content"),
                        "tool_call_id": f.optional(m, "tool_call_id", str, f"{p}.", default=""),
                        "name": f.optional(m, "name", str, f"{p}.")})
        elif role == "function":
            raise f.unsupported(f"{p}.role", "the legacy function role; use tool messages.")
        else:
            raise f.invalid_value(f"{p}.role", f"{role!r}; use system, developer, user, assistant or tool.")
    return out


def _call(call: Any, p: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise f.invalid_type(p, "an object", call)
    fn = f.required(call, "function", dict, f"{p}.")
    args = fn.get("arguments", "{}")
    if not isinstance(args, (str, dict)):
        raise f.invalid_type(f"{p}.function.arguments", "a string", args)
    return {"id": f.optional(call, "id", str, f"{p}.", default=""),
            "function": {"name": f.required(fn, "name", str, f"{p}.function."), "arguments": args}}


def finish_reason(out: Outcome) -> str:
    if out.finish == "length":
        return "length"
    return "tool_calls" if out.calls else "stop"


def usage(out: Outcome) -> dict[str, Any]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": out.reasoning_tokens}}


class Formatter:
    """One request's answer: `body` (non-streaming), or `head`, `events`..., `tail` as SSE chunks."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.id = new_id("chatcmpl-")
        self.created = int(time.time())
        self.include_usage = bool((job.body.get("stream_options") or {}).get("include_usage"))
        self._calls: dict[int, tuple[int, str]] = {}  # id(part) -> (index, call id)

    def _call_id(self, part: Part) -> tuple[int, str]:
        if id(part) not in self._calls:
            self._calls[id(part)] = (len(self._calls), new_id("call_"))
        return self._calls[id(part)]

    def body(self, out: Outcome) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": out.text or (None if out.calls else "")}
        if out.reasoning:
            message["reasoning_content"] = out.reasoning
        if out.calls:
            message["tool_calls"] = [{"id": self._call_id(p)[1], "type": "function",
                                      "function": {"name": p.name, "arguments": p.text}} for p in out.calls]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.job.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(out), "logprobs": None}],
                "usage": usage(out), "system_fingerprint": None}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.job.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if self.include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def head(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def events(self, events: list[Event]) -> list[bytes]:
        out = []
        for ev in events:
            part = ev.part
            if part.kind == CALL and ev.type == "start":
                index, call_id = self._call_id(part)
                out.append(self._chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                                        "function": {"name": part.name, "arguments": ""}}]}))
            elif ev.type == "delta" and part.kind == CALL:
                out.append(self._chunk({"tool_calls": [{"index": self._call_id(part)[0],
                                                        "function": {"arguments": ev.delta}}]}))
            elif ev.type == "delta" and part.kind == REASONING:
                out.append(self._chunk({"reasoning_content": ev.delta}))
            elif ev.type == "delta" and part.kind == TEXT:
                out.append(self._chunk({"content": ev.delta}))
        return out

    def tail(self, out: Outcome) -> list[bytes]:
        chunks = [self._chunk({}, finish_reason(out))]
        if self.include_usage:
            chunks.append(sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.job.model, "choices": [], "usage": usage(out)}))
        return [*chunks, sse("[DONE]")]

    def error(self, err: ApiError) -> list[bytes]:
        return [sse(err.body())]
