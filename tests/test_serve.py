"""The server under torchrun (2 ranks, tensor parallel, gloo) driven by the official `openai` client over HTTP.

The model is the tiny gpt-oss fitted to a few conversations (tests/scripted_model.py), so its answers are
real harmony: reasoning per effort, a tool call, an answer after the tool's result. One server for the
module; every check runs against it. Load (concurrency, cancellation) on the random tiny model:
test_serve_load.py.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

openai = pytest.importorskip("openai")

from runtime import harmony  # noqa: E402
from tests import scripted_model as sm  # noqa: E402
from tests.serve_server import Server, torchrun_server  # noqa: E402

KEY = "test-key"
MODEL = "gpt-oss-tiny"
MAX_LEN = 256
RESP_TOOL = {"type": "function", **sm.TOOL["function"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Server]:
    ckpt = sm.ensure_scripted_model(tiny_checkpoint)
    with torchrun_server(tmp_path_factory.mktemp("serve"), 2, [
        "parallel.tp_size=2", "model.synthetic=false", f"model.path={ckpt}", f"serve.model_name={MODEL}",
        f"serve.max_len={MAX_LEN}", "serve.max_batch=4",
    ], env={"GPTOSS_API_KEY": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def tokens(text: str) -> int:
    return len(harmony.encoding().encode(text, allowed_special="all"))


def analysis_tokens(reasoning: str) -> int:
    """Tokens of the analysis message as generated: <|channel|>analysis<|message|>...<|end|>."""
    return tokens(f"<|channel|>analysis<|message|>{reasoning}<|end|>")


def raw(server: Server, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, dict]:
    host, port = server.root.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, data


# ---------------------------------------------------------------------------------------- routes and keys


def test_health_models_and_key(server: Server, client: openai.OpenAI) -> None:
    status, health = raw(server, "GET", "/health", headers={"Authorization": ""})
    assert status == 200 and health["status"] == "ok" and health["rows"] == 4
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    assert e.value.body["code"] == "invalid_api_key"
    status, body = raw(server, "GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and "Missing API key" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/responses", b"{}", headers={"Authorization": "Bearer nope"})
    assert status == 401 and "API key" in body["error"]["message"]
    for method, path in (("POST", "/load_model"), ("GET", "/v1/unknown")):  # every route but /health
        status, body = raw(server, method, path, b"{}", headers={"Authorization": ""})
        assert status == 401, (path, body)


def test_config_and_endpoint_written(server: Server) -> None:
    saved = OmegaConf.load(server.out_dir / "config.yaml")
    assert saved.parallel.tp_size == 2 and saved.serve.max_len == MAX_LEN
    assert KEY not in (server.out_dir / "config.yaml").read_text()  # from the environment, never written
    ep = json.loads((server.out_dir / "endpoint.json").read_text())
    assert ep["base_url"] == server.base_url and ep["model"] == MODEL and ep["api_key_required"]


# ---------------------------------------------------------------------------------------- chat completions


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_chat_reasoning_effort(client: openai.OpenAI, effort: str) -> None:
    r = client.chat.completions.create(model=MODEL, messages=sm.HI, reasoning_effort=effort, temperature=0)
    msg = r.choices[0].message
    assert (msg.content, msg.reasoning_content) == (sm.ANSWER[effort], sm.REASONING[effort])
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens == len(harmony.render_prompt(sm.HI, effort))
    assert u.completion_tokens == tokens(sm.SCRIPT[["low", "medium", "high"].index(effort)][3])
    assert u.completion_tokens_details.reasoning_tokens == analysis_tokens(sm.REASONING[effort])
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_chat_stream_matches(client: openai.OpenAI) -> None:
    ref = client.chat.completions.create(model=MODEL, messages=sm.HI, reasoning_effort="high", temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=sm.HI, reasoning_effort="high", temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == ref.choices[0].message.content
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == ref.choices[0].message.reasoning_content
    assert len([d for d in deltas if d.content]) > 1  # streamed piece by piece, not at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == ref.usage


@pytest.mark.parametrize("stream", [False, True])
def test_chat_tool_call_round_trip(client: openai.OpenAI, stream: bool) -> None:
    kwargs = {"model": MODEL, "tools": [sm.TOOL], "temperature": 0}
    if stream:
        chunks = list(client.chat.completions.create(messages=sm.WEATHER, stream=True, **kwargs))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        calls = [tc for d in deltas for tc in d.tool_calls or []]
        call_id, name = calls[0].id, calls[0].function.name
        arguments = "".join(tc.function.arguments or "" for tc in calls)
        reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        r = client.chat.completions.create(messages=sm.WEATHER, **kwargs)
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        (call,) = r.choices[0].message.tool_calls
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
        reasoning = r.choices[0].message.reasoning_content
    assert (name, json.loads(arguments), reasoning) == ("get_weather", {"city": "Paris"}, sm.CALL_REASONING)
    followup = [*sm.WEATHER,
                {"role": "assistant", "content": None, "reasoning_content": reasoning, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": call_id, "content": sm.TOOL_RESULT}]
    r2 = client.chat.completions.create(messages=followup, **kwargs)
    assert r2.choices[0].message.content == sm.WEATHER_ANSWER and r2.choices[0].finish_reason == "stop"
    assert r2.usage.prompt_tokens == len(harmony.render_prompt(sm.weather_followup(True), "medium", [sm.TOOL]))


# ---------------------------------------------------------------------------------------- responses


def test_responses_reasoning_and_stream(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="hi", reasoning={"effort": "low"}, temperature=0)
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.status == "completed"
    assert r.output[0].content[0].text == sm.REASONING["low"] and r.output_text == sm.ANSWER["low"]
    assert r.usage.input_tokens == len(harmony.render_prompt(sm.HI, "low"))
    assert r.usage.output_tokens_details.reasoning_tokens == analysis_tokens(sm.REASONING["low"])
    events = list(client.responses.create(model=MODEL, input="hi", reasoning={"effort": "low"}, temperature=0,
                                          stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in ("response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.done",
                 "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done"):
        assert kind in types, kind
    final = events[-1].response
    assert final.output_text == r.output_text
    # the same usage, but for the prefix cache: the second request finds the first one's prompt cached
    assert final.usage.model_dump(exclude={"input_tokens_details"}) == r.usage.model_dump(exclude={"input_tokens_details"})
    assert final.usage.input_tokens_details.cached_tokens == (r.usage.input_tokens - 1) // 16 * 16  # whole blocks
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == sm.REASONING["low"]


@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_call_round_trip(client: openai.OpenAI, stream: bool) -> None:
    kwargs = {"model": MODEL, "tools": [RESP_TOOL], "temperature": 0}
    if stream:
        events = list(client.responses.create(input=sm.WEATHER, stream=True, **kwargs))
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        output = events[-1].response.output
        assert json.loads(args) == {"city": "Paris"}
    else:
        output = client.responses.create(input=sm.WEATHER, **kwargs).output
    assert [o.type for o in output] == ["reasoning", "function_call"]
    call = output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    r2 = client.responses.create(input=[*sm.WEATHER, *[o.model_dump(exclude_none=True) for o in output],
                                        {"type": "function_call_output", "call_id": call.call_id,
                                         "output": sm.TOOL_RESULT}], **kwargs)
    assert r2.output_text == sm.WEATHER_ANSWER
    assert r2.output[0].content[0].text == sm.WEATHER_REASONING


def test_sampling_parameters_are_used(client: openai.OpenAI) -> None:
    """Bounds and top_p=0 here; that temperature and top_p reach the sampler at all: test_serve_load.py
    (on random weights, whose wide distributions show a draw)."""
    r = client.chat.completions.create(model=MODEL, messages=sm.HI, temperature=1.5, top_p=0.9, max_tokens=20)
    assert r.usage.completion_tokens <= 20 and r.choices[0].finish_reason in ("stop", "length")
    # top_p=0 (accepted as by OpenAI) leaves only the most likely token: greedy, whatever the temperature
    greedy = client.chat.completions.create(model=MODEL, messages=sm.HI, temperature=0, max_tokens=20)
    for _ in range(2):
        r = client.chat.completions.create(model=MODEL, messages=sm.HI, temperature=1.5, top_p=0, max_tokens=20)
        assert r.choices[0].message.content == greedy.choices[0].message.content


# ---------------------------------------------------------------------------------------- bad input


def expect(server: Server, status: int, body: dict | bytes, param: str | None = None,
           path: str = "/v1/chat/completions", code: str | None = None) -> str:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, answer = raw(server, "POST", path, data, headers={"Content-Type": "application/json"})
    err = answer["error"]
    assert got == status, answer
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server: Server, client: openai.OpenAI) -> None:
    hi = {"model": MODEL, "messages": sm.HI}
    assert "parse the JSON" in expect(server, 400, b'{"model": ', code="invalid_json")
    expect(server, 400, b"[1, 2]", code="invalid_json")
    expect(server, 400, {"messages": sm.HI}, "model", code="missing_required_parameter")
    expect(server, 400, {"model": MODEL}, "messages", code="missing_required_parameter")
    expect(server, 400, {"model": MODEL}, "input", path="/v1/responses", code="missing_required_parameter")
    expect(server, 400, {**hi, "temperature": "hot"}, "temperature", code="invalid_type")
    expect(server, 400, {**hi, "temperature": 3}, "temperature", code="invalid_value")
    expect(server, 400, {**hi, "max_tokens": "ten"}, "max_tokens", code="invalid_type")
    expect(server, 400, {**hi, "stream": "yes"}, "stream", code="invalid_type")
    expect(server, 400, {"model": MODEL, "messages": "hi"}, "messages", code="invalid_type")
    expect(server, 400, {"model": MODEL, "messages": [{"content": "hi"}]}, "messages[0].role")
    expect(server, 400, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0].type")
    expect(server, 400, {**hi, "reasoning_effort": "extreme"}, "reasoning_effort")
    # longer than the context; more tokens than the context leaves
    long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * MAX_LEN}]}
    assert "maximum context length" in expect(server, 400, long, "messages", code="context_length_exceeded")
    msg = expect(server, 400, {**hi, "max_tokens": MAX_LEN}, "max_tokens", code="context_length_exceeded")
    assert f"at most {MAX_LEN - len(harmony.render_prompt(sm.HI, 'medium'))}" in msg
    expect(server, 400, {"model": MODEL, "input": "hi", "max_output_tokens": 10**6}, "max_output_tokens",
           path="/v1/responses")
    assert "serves 'gpt-oss-tiny'" in expect(server, 404, {**hi, "model": "gpt-5"}, "model", code="model_not_found")
    # fields whose omission would change the result are refused by name
    expect(server, 400, {**hi, "n": 2}, "n", code="unsupported_parameter")
    expect(server, 400, {**hi, "stop": ["\n"]}, "stop")
    expect(server, 400, {**hi, "logprobs": True}, "logprobs")
    expect(server, 400, {**hi, "response_format": {"type": "json_schema", "json_schema": {}}}, "response_format")
    expect(server, 400, {**hi, "tool_choice": "required", "tools": [sm.TOOL]}, "tool_choice")
    expect(server, 400, {"model": MODEL, "input": "hi", "previous_response_id": "resp_x"}, "previous_response_id",
           path="/v1/responses")
    expect(server, 400, {"model": MODEL, "input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type",
           path="/v1/responses")
    expect(server, 400, {"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type",
           path="/v1/responses")
    # routes and methods
    assert raw(server, "GET", "/v1/chat/completions")[0] == 405
    status, answer = raw(server, "POST", "/v1/embeddings", b"{}")
    assert status == 404, answer
    expect(server, 400, {"model": MODEL}, "prompt", path="/v1/completions", code="missing_required_parameter")
    # the official client sees the same errors as exceptions
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=sm.HI)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="hi", text={"format": {"type": "json_object"}})
    assert e.value.body["param"] == "text.format"
    # and still serves
    r = client.chat.completions.create(model=MODEL, messages=sm.HI, reasoning_effort="low", temperature=0)
    assert r.choices[0].message.content == sm.ANSWER["low"]


def test_unimplemented_fields_are_accepted_and_logged_once(server: Server, client: openai.OpenAI) -> None:
    for _ in range(2):
        r = client.chat.completions.create(
            model=MODEL, messages=sm.HI, reasoning_effort="low", temperature=0, seed=7, user="u", store=False,
            metadata={"a": "b"}, parallel_tool_calls=True, service_tier="auto", prompt_cache_key="k",
            extra_body={"top_k": 5})
        assert r.choices[0].message.content == sm.ANSWER["low"]
    r = client.responses.create(model=MODEL, input="hi", reasoning={"effort": "low", "summary": "auto"}, temperature=0,
                                store=False, include=["reasoning.encrypted_content"], truncation="auto", user="u")
    assert r.output_text == sm.ANSWER["low"]
    log = server.log_text()
    assert log.count("field 'seed' is accepted and ignored") == 1
    assert log.count("field 'top_k' is accepted and ignored") == 1
    assert "field 'include' is accepted and ignored" in log
