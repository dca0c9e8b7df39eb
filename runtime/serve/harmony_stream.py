"""Generated harmony tokens -> output parts (reasoning, answer text, tool calls), one token at a time.

Each harmony message of the assistant becomes one part: the `analysis` channel is reasoning, a message
addressed to a tool (`to=functions.NAME`) is a tool call whose text is its JSON arguments, everything else
(the `final` channel, recipient-less `commentary` preambles) is answer text, as `runtime.harmony.
parse_completion` reads a finished completion. Streaming and non-streaming responses both come from this
class, so they agree by construction.

Tokens that are not valid harmony (random weights, a header of garbage) cannot be dropped silently: from
the offending message on, the tokens are decoded as raw text (special tokens by name) into an answer part
and `error` says why. A well-formed header that the token limit cut short holds no text and is dropped
(`runtime.harmony.parse_completion` shows it raw). Stop tokens that end the turn are never shown.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field

from openai_harmony import Role, StreamableParser, StreamState

from runtime import harmony

REASONING, TEXT, CALL = "reasoning", "text", "call"

# An assistant message header as far as the token limit let it get (a token may end midway through a word,
# "comment"): it holds no text.
_HEADER_PREFIX = re.compile(r"(<\|start\|>(assistant)?)?( to(=[\w.\-]*)?)?(<\|channel\|>[a-z]*)?"
                            r"( to(=[\w.\-]*)?)?( ?(<\|constrain\|>)?[a-z]*)?")


@dataclass
class Part:
    """One output part: its kind, its text so far, and the tool name of a call."""

    kind: str
    text: str = ""
    name: str | None = None
    cut: bool = False
    """The generation stopped inside it (no end marker came): the token limit cut it short."""


@dataclass
class Event:
    """`start` (a part begins: `part` is it), `delta` (text added to the open part), `end` (it is complete)."""

    type: str
    part: Part
    delta: str = ""


@dataclass
class HarmonyStream:
    """Feed generated token ids; read the events each feed produces, and `parts` at any time."""

    end_ids: frozenset[int]
    """Tokens that end the turn (the stop ids): never decoded as text."""
    parts: list[Part] = field(default_factory=list)
    reasoning_tokens: int = 0
    """Generated tokens that belong to analysis messages (header to end marker)."""
    error: str | None = None
    """Why the tokens stopped being valid harmony, if they did."""

    def __post_init__(self) -> None:
        self._parser = StreamableParser(harmony.encoding(), Role.ASSISTANT, strict=True)
        self._open: Part | None = None
        self._message: list[int] = []  # tokens of the current message so far (its header, until content starts)
        self._raw: codecs.IncrementalDecoder | None = None  # set once the tokens stopped being harmony

    def feed(self, tokens: list[int]) -> list[Event]:
        events: list[Event] = []
        for t in tokens:
            if self._raw is not None:
                self._raw_text([t], events)
            else:
                self._harmony(t, events)
        return events

    def close(self) -> list[Event]:
        """The generation ended: close a truncated message; an unfinished header is shown as raw text."""
        events: list[Event] = []
        if self._raw is None and self._parser.state == StreamState.CONTENT:
            try:
                self._parser.process_eos()
            except Exception:  # noqa: BLE001 - nothing was lost: its content is already out
                pass
            if self._open is not None:
                self._open.cut = True
            self._end(events)
        elif self._raw is None and self._message:
            if _HEADER_PREFIX.fullmatch(harmony.decode(self._message)):
                self._message = []  # a header cut by the token limit: it holds no text, so nothing is lost
            else:
                self.error = "the output ended inside a message header"
                self._go_raw(self._message, events)
        if self._raw is not None:
            tail = self._raw.decode(b"", final=True)
            if tail:
                self._delta(tail, events)
            self._end(events)
        return events

    # ------------------------------------------------------------------------------ internals

    def _harmony(self, t: int, events: list[Event]) -> None:
        p = self._parser
        try:
            p.process(t)
        except Exception as e:  # noqa: BLE001 - HarmonyError, or anything odd from garbage ids
            self.error = str(e) or type(e).__name__
            # content already shown stays; an unshown header is shown raw with the offending token
            self._go_raw([t] if self._open is not None else [*self._message, t], events)
            return
        self._message.append(t)
        if p.state == StreamState.CONTENT and self._open is None:
            recipient, channel = p.current_recipient, p.current_channel
            if recipient and recipient not in ("user", "assistant", "all"):
                part = Part(CALL, name=recipient.removeprefix("functions."))
            else:
                part = Part(REASONING if channel == "analysis" else TEXT)
            self._start(part, events)
        delta = p.last_content_delta
        if delta and self._open is not None:
            self._delta(delta, events)
        if p.state == StreamState.EXPECT_START:  # the message ended (<|end|>, <|return|>, <|call|>)
            self._end(events)

    def _go_raw(self, tokens: list[int], events: list[Event]) -> None:
        self._end(events)
        self._raw = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._raw_text(tokens, events)

    def _raw_text(self, tokens: list[int], events: list[Event]) -> None:
        data = b"".join(token_bytes(t) for t in tokens if t not in self.end_ids)
        text = self._raw.decode(data) if data else ""  # type: ignore[union-attr]
        if text:
            if self._open is None or self._open.kind != TEXT:
                self._end(events)
                self._start(Part(TEXT), events)
            self._delta(text, events)

    def _start(self, part: Part, events: list[Event]) -> None:
        self._open = part
        self.parts.append(part)
        events.append(Event("start", part))

    def _delta(self, text: str, events: list[Event]) -> None:
        assert self._open is not None
        self._open.text += text
        events.append(Event("delta", self._open, text))

    def _end(self, events: list[Event]) -> None:
        if self._open is not None and self._raw is None and self._open.kind == REASONING:
            self.reasoning_tokens += len(self._message)
        if self._raw is None:
            self._message = []
        if self._open is not None:
            events.append(Event("end", self._open))
            self._open = None


def token_bytes(t: int) -> bytes:
    """One token's bytes (a special token's name); U+FFFD for an id outside the vocabulary."""
    try:
        return bytes(harmony.encoding()._inner.decode_bytes([t]))
    except Exception:  # noqa: BLE001 - an id outside the vocabulary
        return "\ufffd".encode()
