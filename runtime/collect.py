"""Prompts in, records out: reading the prompts file, and rank 0's append-and-flush JSONL writer that
lets a re-run with the same output skip what is already done (nothing lost, nothing written twice)."""

from __future__ import annotations

from runtime.errors import UserError

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from runtime import harmony
from runtime.engine import Request

ROLES = ("system", "developer", "user", "assistant", "tool")


class PromptsError(UserError):
    """The prompts file is malformed; the message names the line and the fix."""


def read_prompts(path: str | Path) -> list[Request]:
    """One Request per non-empty JSONL line; ids default to the line's position among prompts."""
    path = Path(path)
    if not path.is_file():
        raise PromptsError(f"prompts.path={path} does not exist: point it at a JSONL file")
    requests: list[Request] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptsError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                                   "line): save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptsError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): one JSON object per line") from e
            except RecursionError:
                raise PromptsError(f"{where}: JSON nested too deeply: one flat object per line") from None
            bad = harmony.lone_surrogate(obj)
            if bad:
                field, at, code = bad
                raise PromptsError(f"{where}: {field or 'a string'} holds a lone UTF-16 surrogate (\\u{code:04x} at "
                                   f"character {at}), which is no text: write the character as UTF-8 or as a "
                                   "surrogate pair")
            req = _request(obj, str(len(requests)), where)
            if req.id in seen:
                raise PromptsError(f"{where}: id {req.id!r} already used on line {seen[req.id]}: ids must be unique")
            seen[req.id] = lineno
            requests.append(req)
    return requests


def check_resume(requests: list[Request], written: dict[str, str | None], path: Path, prompts: str) -> None:
    """Refuse to resume when a prompt already written under an id is not the prompt under that id now
    (ids default to line positions: a line inserted above shifts them all)."""
    differ = [r.id for r in requests if written.get(r.id) is not None and written[r.id] != r.digest()]
    if differ:
        shown = ", ".join(repr(i) for i in differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        raise PromptsError(
            f"{len(differ)} prompt(s) in {prompts} are not the ones already written under the same id to {path} "
            f"(id {shown}): the prompts file changed since that run (ids default to line positions, so a line "
            f"added or removed shifts them). Give the prompts explicit \"id\"s, restore the file, or write to a "
            f"new output.path")


def _request(obj: Any, default_id: str, where: str) -> Request:
    if not isinstance(obj, dict):
        raise PromptsError(f"{where}: expected a JSON object like {{\"prompt\": \"...\"}}, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "prompt", "messages", "reasoning_effort", "tools"}
    if unknown:
        raise PromptsError(f"{where}: unknown keys {sorted(unknown)}: allowed are id, prompt, messages, reasoning_effort, tools")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise PromptsError(f"{where}: give exactly one of \"prompt\" (a string) or \"messages\" (a list)")
    if has_prompt and not isinstance(obj["prompt"], str):
        raise PromptsError(f"{where}: \"prompt\" must be a string")
    if has_messages:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise PromptsError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise PromptsError(f"{where}: messages[{j}] needs a \"role\" among {list(ROLES)}")
            # null is what OpenAI (and our server) give an assistant message that only calls tools
            if m.get("content") is not None and not isinstance(m["content"], str):
                raise PromptsError(f"{where}: messages[{j}].content must be a string or null")
            _check_functions(m.get("tool_calls"), where, f"messages[{j}].tool_calls")
    _check_functions(obj.get("tools"), where, "tools")
    effort = obj.get("reasoning_effort")
    if effort is not None and effort not in ("low", "medium", "high"):
        raise PromptsError(f"{where}: reasoning_effort {effort!r}: use low, medium or high")
    rid = obj.get("id", default_id)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise PromptsError(f"{where}: \"id\" must be a string or an integer")
    return Request(
        id=str(rid), prompt=obj.get("prompt"), messages=obj.get("messages"), reasoning_effort=effort,
        tools=obj.get("tools"),
    )


def _check_functions(items: Any, where: str, key: str) -> None:
    """`tools` / `tool_calls`: a list of objects naming a function, nested ({"function": {"name"}}) or flat."""
    if items is None:
        return
    if not isinstance(items, list):
        raise PromptsError(f"{where}: \"{key}\" must be a list of {{\"function\": {{\"name\": ...}}}} objects")
    for k, item in enumerate(items):
        fn = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise PromptsError(f"{where}: {key}[{k}] needs a function \"name\": {{\"type\": \"function\", \"function\": "
                               f"{{\"name\": ...}}}} or {{\"name\": ...}}")


def inline_prompts(texts: Iterable[str]) -> list[Request]:
    return [Request(id=str(i), prompt=t) for i, t in enumerate(texts)]


def add_developer(requests: list[Request], developer: str | None) -> list[Request]:
    """Give every prompt the configured developer instructions (used where it has none of its own)."""
    if not developer:
        return requests
    return [dataclasses.replace(r, developer=developer) for r in requests]


class JsonlWriter:
    """Append-only JSONL output; each batch is one write + flush + fsync.

    A crash can at worst leave one partial last line; opening the file again cuts it off (that record
    is regenerated), so the file is always valid JSONL and no record is duplicated.
    """

    def __init__(self, path: str | Path) -> None:
        """Reads the records already in `path` (a UserError naming the fix if it cannot be an output file: a
        directory, a line that is not a record) and cuts off a torn last line; the file is created at the
        first append."""
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"output.path={self.path} is a directory: name a file, e.g. "
                            f"output.path={self.path / 'out.jsonl'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"output.path={self.path}: its directory cannot be created ({e.strerror or e}): choose "
                            "another output.path") from None
        target = self.path if self.path.exists() else self.path.parent
        if not os.access(target, os.W_OK):  # read-only, immutable, or a directory we may not write to
            raise UserError(f"output.path={self.path}: {'the file' if target == self.path else 'its directory'} "
                            "cannot be written (permissions or an immutable flag): fix that, or choose another "
                            "output.path")
        self.digests = self._recover(self.path)
        """{id: prompt_sha256} of the records already written (None for records written without one)."""
        self._f: Any = None

    @property
    def done_ids(self) -> set[str]:
        return set(self.digests)

    @staticmethod
    def _recover(path: Path) -> dict[str, str | None]:
        if not path.exists():
            return {}
        data = path.read_bytes()
        lines = data.splitlines(keepends=True)
        good_end, ids = 0, {}
        for n, line in enumerate(lines, start=1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("unterminated")
                rec = json.loads(line)
                ids[str(rec["id"])] = rec.get("prompt_sha256")
            except (ValueError, KeyError, TypeError) as e:
                # only an unterminated (or blank) last line can be a torn write: a whole line is never dropped
                if n < len(lines) or (line.endswith(b"\n") and line.strip()):
                    raise UserError(
                        f"{path}:{n} is not a record ({e}); fix or remove that line, or choose a new output.path"
                    ) from e
                break
            good_end += len(line)
        if good_end < len(data):  # a torn last line: cut it off
            with path.open("r+b") as f:
                f.truncate(good_end)
        return ids

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if self._f is None:
            self._f = self.path.open("a", encoding="utf-8")
        self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self._f.flush()
        os.fsync(self._f.fileno())
        self.digests.update((str(r["id"]), r.get("prompt_sha256")) for r in records)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
