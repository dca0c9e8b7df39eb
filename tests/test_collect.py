"""Prompts files (errors name the line) and the append-and-flush writer (nothing lost, nothing twice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime import collect
from runtime.errors import UserError
from runtime.harmony import render_prompt


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_prompts(tmp_path: Path) -> None:
    p = write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "hi"}),
        "",
        json.dumps({"id": "q7", "messages": [{"role": "developer", "content": "Be brief."},
                                             {"role": "user", "content": "2+2?"}], "reasoning_effort": "low"}),
        json.dumps({"id": 9, "prompt": "x"}),
    ])
    reqs = collect.read_prompts(p)
    assert [r.id for r in reqs] == ["0", "q7", "9"]
    assert reqs[0].prompt == "hi" and reqs[0].messages is None
    assert reqs[1].messages[1]["content"] == "2+2?" and reqs[1].reasoning_effort == "low"


def test_read_prompts_tool_call_with_null_content(tmp_path: Path) -> None:
    # An assistant message that only calls tools has "content": null in OpenAI's format (and our server's).
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "reasoning_content": "Use the tool.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    (req,) = collect.read_prompts(write(tmp_path / "p.jsonl", [json.dumps({"messages": messages})]))
    assert req.messages == messages
    without = [messages[0], {k: v for k, v in messages[1].items() if k != "content"}, messages[2]]
    assert render_prompt(req.conversation()) == render_prompt(without)


@pytest.mark.parametrize(("line", "match"), [
    ("{oops", r"p.jsonl:2: not valid JSON"),
    ("[1, 2]", r"p.jsonl:2: expected a JSON object"),
    (json.dumps({"text": "hi"}), r"p.jsonl:2: unknown keys \['text'\]"),
    (json.dumps({"prompt": "a", "messages": []}), r"p.jsonl:2: give exactly one of"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), r"p.jsonl:2: messages\[0\] needs a \"role\""),
    (json.dumps({"prompt": 3}), r"p.jsonl:2: \"prompt\" must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}), r"p.jsonl:2: messages\[0\].content must be a string"),
    (json.dumps({"prompt": "a", "reasoning_effort": "max"}), r"p.jsonl:2: reasoning_effort 'max'"),
    (json.dumps({"id": "a", "prompt": "dup"}), r"p.jsonl:2: id 'a' already used on line 1"),
    (json.dumps({"prompt": "a", "tools": "lookup"}), r"p.jsonl:2: \"tools\" must be a list"),
    (json.dumps({"prompt": "a", "tools": [{"type": "function", "function": {"description": "no name"}}]}),
     r"p.jsonl:2: tools\[0\] needs a function \"name\""),
    (json.dumps({"messages": [{"role": "assistant", "tool_calls": [{"arguments": "{}"}]}]}),
     r"p.jsonl:2: messages\[0\].tool_calls\[0\] needs a function \"name\""),
])
def test_malformed_prompts_name_the_line(tmp_path: Path, line: str, match: str) -> None:
    p = write(tmp_path / "p.jsonl", [json.dumps({"id": "a", "prompt": "fine"}), line])
    with pytest.raises(UserError, match=match):
        collect.read_prompts(p)


def test_missing_prompts_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        collect.read_prompts(tmp_path / "none.jsonl")


def test_developer_added_only_where_missing() -> None:
    reqs = [collect.Request(id="0", prompt="a"),
            collect.Request(id="1", messages=[{"role": "system", "content": "own"}, {"role": "user", "content": "b"}])]
    out = collect.add_developer(reqs, "Be brief.")
    assert out[0].prompt == "a" and out[0].messages is None  # records keep the prompt as given
    assert out[0].conversation() == [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "a"}]
    assert out[1].conversation() == reqs[1].messages


def test_writer_appends_and_recovers_a_torn_line(tmp_path: Path) -> None:
    out = tmp_path / "o" / "out.jsonl"
    w = collect.JsonlWriter(out)
    w.append([{"id": "0", "text": "a"}, {"id": "1", "text": "b"}])
    w.close()
    with out.open("a") as f:
        f.write('{"id": "2", "te')  # a crash in the middle of a write
    w = collect.JsonlWriter(out)
    assert w.done_ids == {"0", "1"}
    w.append([{"id": "2", "text": "c"}])
    w.close()
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["0", "1", "2"]


def test_writer_never_drops_records_after_a_bad_line(tmp_path: Path) -> None:
    out = write(tmp_path / "out.jsonl", [json.dumps({"id": "0"}), "garbage", json.dumps({"id": "1"})])
    before = out.read_bytes()
    with pytest.raises(UserError, match=r"out.jsonl:2 is not a record"):
        collect.JsonlWriter(out)
    assert out.read_bytes() == before


def test_writer_never_cuts_a_whole_last_line_that_is_not_a_record(tmp_path: Path) -> None:
    """Only an unterminated last line can be a torn write; a whole line that is not a record (another
    file given as output.path, a hand edit) is reported, not silently deleted."""
    out = write(tmp_path / "out.jsonl", [json.dumps({"prompt": "my only prompt"})])
    before = out.read_bytes()
    with pytest.raises(UserError, match=r"out.jsonl:1 is not a record"):
        collect.JsonlWriter(out)
    assert out.read_bytes() == before


def test_writer_names_the_fix_when_output_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"is a directory: name a file, e.g. output.path=.*out.jsonl"):
        collect.JsonlWriter(tmp_path)
