"""Checking the fields of an OpenAI request, and the errors a client gets back.

Every refusal is an `ApiError`: an HTTP status and an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` whose message names the field and the fix. Fields of
the OpenAI APIs that this server does not implement are accepted and ignored (logged once per field), as
real clients send many of them; the few whose omission would change the result are refused by name.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

log = logging.getLogger("runtime.serve")


class ApiError(Exception):
    """A request the server refuses; `body()` is what the client reads."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array",
               dict: "an object"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for t, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                    (list, "an array"), (dict, "an object")):
        if isinstance(value, t):
            return name
    return type(value).__name__


def invalid_type(param: str, expected: str, value: Any) -> ApiError:
    return ApiError(400, f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
                    param, "invalid_type")


def invalid_value(param: str, message: str) -> ApiError:
    return ApiError(400, f"Invalid value for '{param}': {message}", param, "invalid_value")


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}' is not supported by this server: {message}", param, "unsupported_parameter")


def required(body: dict[str, Any], key: str, kind: type | tuple[type, ...], prefix: str = "") -> Any:
    if key not in body or body[key] is None:
        raise ApiError(400, f"Missing required parameter: '{prefix}{key}'.", f"{prefix}{key}",
                       "missing_required_parameter")
    return optional(body, key, kind, prefix)


def optional(body: dict[str, Any], key: str, kind: type | tuple[type, ...], prefix: str = "",
             default: Any = None) -> Any:
    """body[key] checked against `kind` (JSON types: int is not bool; float accepts int), or `default`."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = any(
        (isinstance(value, k) and not (isinstance(value, bool) and k in (int, float)))
        or (k is float and isinstance(value, int) and not isinstance(value, bool))
        for k in kinds
    )
    if not ok:
        raise invalid_type(f"{prefix}{key}", " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds), value)
    return float(value) if kinds == (float,) else value


def sampling(body: dict[str, Any], default_temperature: float, default_top_p: float) -> tuple[float, float]:
    """(temperature, top_p) of a request; temperature 0 is greedy decoding."""
    temperature = optional(body, "temperature", float, default=default_temperature)
    if not (math.isfinite(temperature) and 0 <= temperature <= 2):  # NaN and Infinity parse as JSON here
        raise invalid_value("temperature", f"{temperature} is not between 0 and 2.")
    top_p = optional(body, "top_p", float, default=default_top_p)
    if not (math.isfinite(top_p) and 0 <= top_p <= 1):
        raise invalid_value("top_p", f"{top_p} is not between 0 and 1.")
    if top_p == 0:  # OpenAI accepts it: only the most likely token is left, i.e. greedy decoding
        return 0.0, 1.0
    return temperature, top_p


def positive_int(body: dict[str, Any], key: str) -> int | None:
    value = optional(body, key, int)
    if value is not None and value < 1:
        raise invalid_value(key, f"{value} must be at least 1.")
    return value


EFFORTS = ("low", "medium", "high")


def effort(value: Any, param: str, default: str) -> str:
    """A reasoning effort: harmony knows low, medium and high ("minimal" is read as low)."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if value == "minimal":
        return "low"
    if value not in EFFORTS:
        raise invalid_value(param, f"{value!r}; gpt-oss reasons at one of {', '.join(EFFORTS)}.")
    return value


_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def ignore(endpoint: str, body: dict[str, Any], known: set[str]) -> None:
    """Log once per endpoint and field that a field outside `known` is accepted but has no effect."""
    for key in body:
        if key in known:
            continue
        with _logged_lock:
            if (endpoint, key) in _logged:
                continue
            _logged.add((endpoint, key))
        log.info("%s: field %r is accepted and ignored (not implemented by this server)", endpoint, key)


def text_content(value: Any, param: str) -> str:
    """Message content: a string, or a list of text parts; other part types are refused by name."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid_type(param, "a string or an array of content parts", value)
    out = []
    for j, part in enumerate(value):
        if isinstance(part, str):
            out.append(part)
            continue
        if not isinstance(part, dict):
            raise invalid_type(f"{param}[{j}]", "an object", part)
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text", "reasoning_text", "summary_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid_type(f"{param}[{j}].text", "a string", text)
            out.append(text)
        elif kind == "refusal":
            out.append(str(part.get("refusal", "")))
        else:
            raise unsupported(f"{param}[{j}].type", f"{kind!r} content; gpt-oss reads text only.")
    return "".join(out)


def function_tools(tools: Any, param: str = "tools") -> list[dict[str, Any]]:
    """Function tools (Chat's nested or Responses' flat form) as {name, description, parameters}."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid_type(param, "an array", tools)
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid_type(f"{param}[{i}]", "an object", tool)
        if tool.get("type", "function") != "function":
            raise unsupported(f"{param}[{i}].type", f"{tool.get('type')!r} tools; only function tools are served.")
        fn = tool.get("function", tool)
        if not isinstance(fn, dict):
            raise invalid_type(f"{param}[{i}].function", "an object", fn)
        name = required(fn, "name", str, f"{param}[{i}].")
        description = optional(fn, "description", str, f"{param}[{i}].", default="")
        parameters = optional(fn, "parameters", dict, f"{param}[{i}].")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": parameters}})
    return out


def tool_choice(value: Any, tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`auto` (default) keeps the tools, `none` hides them from the model; forcing a call is refused."""
    if value is None or value == "auto":
        return tools
    if value == "none":
        return []
    if value == "required" or isinstance(value, dict):
        raise unsupported("tool_choice", "forcing a tool call is not implemented; use \"auto\" or \"none\".")
    raise invalid_value("tool_choice", f"{value!r}; use \"auto\" or \"none\".")
