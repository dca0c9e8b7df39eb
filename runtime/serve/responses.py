"""POST /v1/responses: the request as a Job, the answer as a `response` object or its stream of events.

Output items in the order the model wrote them: `reasoning` (analysis channel, as `reasoning_text`
content), `message` (final channel, `output_text`), `function_call` (a tool call). Input items
`message`, `reasoning`, `function_call` and `function_call_output` continue a conversation; nothing is
stored, so `previous_response_id` is refused with the fix (send the whole conversation).
"""

from __future__ import annotations

import time
from typing import Any

from runtime.serve import fields as f
from runtime.serve.fields import ApiError
from runtime.serve.harmony_stream import CALL, REASONING, TEXT, Event, Part
from runtime.serve.job import Defaults, Job, Outcome, new_id, sse

PATH = "/v1/responses"

IMPLEMENTED = {"model", "input", "instructions", "stream", "max_output_tokens", "temperature", "top_p", "reasoning",
               "tools", "tool_choice", "text", "metadata", "parallel_tool_calls"}
REFUSED = {"previous_response_id", "conversation", "prompt", "background", "top_logprobs"}


def parse(body: dict[str, Any], defaults: Defaults) -> Job:
    model = f.required(body, "model", str)
    _refuse(body)
    messages = []
    instructions = f.optional(body, "instructions", str)
    if instructions:
        messages.append({"role": "developer", "content": instructions})
    messages += _input(f.required(body, "input", (str, list)))
    f.ignore(PATH, body, IMPLEMENTED | REFUSED)
    reasoning = f.optional(body, "reasoning", dict, default={})
    if reasoning.get("summary") is not None:
        f.ignore(PATH, {"reasoning.summary": 1}, set())  # the full reasoning text comes back, never a summary
    f.optional(body, "metadata", dict)
    f.optional(body, "parallel_tool_calls", bool)
    tools = f.tool_choice(body.get("tool_choice"), f.function_tools(body.get("tools")))
    temperature, top_p = f.sampling(body, defaults.temperature, defaults.top_p)
    return Job(model=model, messages=messages, tools=tools,
               effort=f.effort(reasoning.get("effort"), "reasoning.effort", defaults.effort),
               max_tokens=f.positive_int(body, "max_output_tokens"), temperature=temperature, top_p=top_p,
               stream=f.optional(body, "stream", bool, default=False), body=body)


def _refuse(body: dict[str, Any]) -> None:
    if body.get("previous_response_id") is not None:
        raise f.unsupported("previous_response_id", "responses are not stored; send the whole conversation as "
                            "input (earlier output items included).")
    if body.get("conversation") is not None:
        raise f.unsupported("conversation", "conversations are not stored; send the whole conversation as input.")
    if body.get("prompt") is not None:
        raise f.unsupported("prompt", "stored prompt templates do not exist here; send input (and instructions).")
    if f.optional(body, "background", bool):
        raise f.unsupported("background", "background responses are not implemented; use stream=true.")
    if f.optional(body, "top_logprobs", int):
        raise f.unsupported("top_logprobs", "log probabilities are not returned.")
    text = f.optional(body, "text", dict, default={})
    fmt = f.optional(text, "format", dict, "text.", default={})
    if fmt.get("type", "text") != "text":
        raise f.unsupported("text.format", f"type {fmt.get('type')!r}: structured output is not implemented.")


def _input(value: str | list[Any]) -> list[dict[str, Any]]:
    """Input items as chat messages: reasoning joins the next assistant message, a function call is an
    assistant message with tool_calls (the preceding assistant message's, if it follows one directly), a
    function_call_output is a tool message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not value:
        raise f.invalid_value("input", "the input is empty.")
    out: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for i, item in enumerate(value):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise f.invalid_type(p, "an object", item)
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = f.required(item, "role", str, f"{p}.")
            content = f.text_content(item.get("content"), f"{p}.content")
            if role == "assistant":
                out.append({"role": "assistant", "content": content, "reasoning": "".join(reasoning)})
                reasoning = []
            elif role in ("user", "system", "developer"):
                out.append({"role": role, "content": content})
            else:
                raise f.invalid_value(f"{p}.role", f"{role!r}; use user, system, developer or assistant.")
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning.append(f.text_content(parts, f"{p}.content"))
        elif kind == "function_call":
            args = f.required(item, "arguments", str, f"{p}.")
            call = {"id": f.required(item, "call_id", str, f"{p}."),
                    "function": {"name": f.required(item, "name", str, f"{p}."), "arguments": args}}
            if not reasoning and out and out[-1]["role"] == "assistant":
                # right after an assistant message (a preamble, as a final answer ends the turn) or another
                # call: the same assistant turn, rendered as Chat's message with content and tool_calls
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "reasoning": "".join(reasoning),
                            "tool_calls": [call]})
            reasoning = []
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": f.required(item, "call_id", str, f"{p}."),
                        "content": f.text_content(output, f"{p}.output")})
        elif kind is None:
            raise ApiError(400, f"Missing required parameter: '{p}.type'.", f"{p}.type", "missing_required_parameter")
        else:
            raise f.unsupported(f"{p}.type", f"{kind!r} items; use message, reasoning, function_call or "
                                "function_call_output.")
    return out


def usage(out: Outcome) -> dict[str, Any]:
    return {"input_tokens": out.prompt_tokens, "input_tokens_details": {"cached_tokens": out.cached_tokens},
            "output_tokens": out.completion_tokens, "output_tokens_details": {"reasoning_tokens": out.reasoning_tokens},
            "total_tokens": out.prompt_tokens + out.completion_tokens}


class Formatter:
    """One request's answer: `body` (non-streaming), or `head`, `events`..., `tail` as SSE events."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.id = new_id("resp_")
        self.created = int(time.time())
        self._seq = 0
        self._items: list[tuple[Part, str, str]] = []  # (part, item id, call id) in output order

    # ------------------------------------------------------------------------------ objects

    def _item_of(self, part: Part) -> tuple[int, str, str]:
        for i, (p, item_id, call_id) in enumerate(self._items):
            if p is part:
                return i, item_id, call_id
        prefix = {REASONING: "rs_", TEXT: "msg_", CALL: "fc_"}[part.kind]
        self._items.append((part, new_id(prefix), new_id("call_")))
        return len(self._items) - 1, self._items[-1][1], self._items[-1][2]

    def _item(self, part: Part, status: str) -> dict[str, Any]:
        _, item_id, call_id = self._item_of(part)
        done = status != "in_progress"
        if part.kind == REASONING:
            content = [{"type": "reasoning_text", "text": part.text}] if done else []
            return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}
        if part.kind == CALL:
            return {"id": item_id, "type": "function_call", "call_id": call_id, "name": part.name,
                    "arguments": part.text if done else "", "status": status}
        content = [_text_part(part.text)] if done else []
        return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def _response(self, status: str, out: Outcome | None) -> dict[str, Any]:
        body = self.job.body
        resp: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.job.model, "output": [], "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata") or {}, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": {"effort": self.job.effort, "summary": None},
            "store": False, "temperature": self.job.temperature, "top_p": self.job.top_p,
            "text": {"format": {"type": "text"}}, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "truncation": "disabled", "usage": None, "user": body.get("user"),
        }
        if out is not None:
            resp["output"] = [self._item(p, _done(p)) for p in out.parts]
            resp["usage"] = usage(out)
            if out.finish == "length":
                resp["incomplete_details"] = {"reason": "max_output_tokens"}
            resp["completed_at"] = int(time.time())
        return resp

    def body(self, out: Outcome) -> dict[str, Any]:
        return self._response(_status(out), out)

    # ------------------------------------------------------------------------------ events

    def _event(self, type: str, **data: Any) -> bytes:
        self._seq += 1
        return sse({"type": type, "sequence_number": self._seq - 1, **data}, event=type)

    def head(self) -> list[bytes]:
        return [self._event("response.created", response=self._response("in_progress", None)),
                self._event("response.in_progress", response=self._response("in_progress", None))]

    def events(self, events: list[Event]) -> list[bytes]:
        out = []
        for ev in events:
            part = ev.part
            index, item_id, _ = self._item_of(part)
            where = {"item_id": item_id, "output_index": index}
            if ev.type == "start":
                out.append(self._event("response.output_item.added", output_index=index,
                                       item=self._item(part, "in_progress")))
                if part.kind == TEXT:
                    out.append(self._event("response.content_part.added", **where, content_index=0,
                                           part=_text_part("")))
                elif part.kind == REASONING:
                    out.append(self._event("response.content_part.added", **where, content_index=0,
                                           part={"type": "reasoning_text", "text": ""}))
            elif ev.type == "delta":
                if part.kind == TEXT:
                    out.append(self._event("response.output_text.delta", **where, content_index=0, delta=ev.delta,
                                           logprobs=[]))
                elif part.kind == REASONING:
                    out.append(self._event("response.reasoning_text.delta", **where, content_index=0, delta=ev.delta))
                else:
                    out.append(self._event("response.function_call_arguments.delta", **where, delta=ev.delta))
            else:  # end
                if part.kind == TEXT:
                    out.append(self._event("response.output_text.done", **where, content_index=0, text=part.text,
                                           logprobs=[]))
                    out.append(self._event("response.content_part.done", **where, content_index=0,
                                           part=_text_part(part.text)))
                elif part.kind == REASONING:
                    out.append(self._event("response.reasoning_text.done", **where, content_index=0, text=part.text))
                    out.append(self._event("response.content_part.done", **where, content_index=0,
                                           part={"type": "reasoning_text", "text": part.text}))
                else:
                    out.append(self._event("response.function_call_arguments.done", **where, name=part.name,
                                           arguments=part.text))
                out.append(self._event("response.output_item.done", output_index=index,
                                       item=self._item(part, _done(part))))
        return out

    def tail(self, out: Outcome) -> list[bytes]:
        status = _status(out)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [self._event(kind, response=self._response(status, out))]

    def error(self, err: ApiError) -> list[bytes]:
        """An `error` event, then `response.failed` (what the SDK's stream helpers wait for)."""
        failed = self._response("failed", None)
        failed["error"] = {"code": err.code or err.type, "message": err.message}
        return [self._event("error", code=err.code or err.type, message=err.message, param=err.param),
                self._event("response.failed", response=failed)]


def _done(part: Part) -> str:
    """A finished item's status: `incomplete` where the token limit cut it short (its text as far as it got)."""
    return "incomplete" if part.cut else "completed"


def _status(out: Outcome) -> str:
    return "incomplete" if out.finish == "length" else "completed"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
