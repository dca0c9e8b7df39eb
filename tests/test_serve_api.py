"""The serving layers without a model: incremental harmony parsing, and the HTTP server answering the
official `openai` client over real HTTP, with the scheduler replaced by a backend that replays scripted
harmony completions (runtime/serve/http.py's Backend). The real model under torchrun: test_serve.py."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator

import pytest

openai = pytest.importorskip("openai")

from runtime import harmony  # noqa: E402
from runtime.serve.harmony_stream import CALL, REASONING, TEXT, HarmonyStream  # noqa: E402
from runtime.serve.http import App, make_server  # noqa: E402
from runtime.serve.job import Defaults, Job  # noqa: E402
from runtime.serve.scheduler import Finish, Submission  # noqa: E402

END_IDS = frozenset({200002, 200012, 199999})
ANALYSIS = "<|channel|>analysis<|message|>The user asks about Paris: call the tool. é😀<|end|>"
CALL_TEXT = ("<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
             "<|message|>{\"city\": \"Paris\"}<|call|>")
FINAL = "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>"
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def ids(text: str) -> list[int]:
    return harmony.encoding().encode(text, allowed_special="all")


def run_stream(tokens: list[int], chunk: int = 1) -> tuple[HarmonyStream, list]:
    stream = HarmonyStream(END_IDS)
    events = []
    for i in range(0, len(tokens), chunk):
        events += stream.feed(tokens[i : i + chunk])
    events += stream.close()
    return stream, events


# ---------------------------------------------------------------------------------------- harmony stream


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_stream_parts_reasoning_and_tool_call(chunk: int) -> None:
    tokens = ids(ANALYSIS + CALL_TEXT)
    stream, events = run_stream(tokens, chunk)
    assert [(p.kind, p.name) for p in stream.parts] == [(REASONING, None), (CALL, "get_weather")]
    assert stream.parts[0].text == "The user asks about Paris: call the tool. é😀"
    assert stream.parts[1].text == '{"city": "Paris"}'
    assert stream.reasoning_tokens == len(ids(ANALYSIS)) and stream.error is None
    for part in stream.parts:  # the deltas add up to the part, between one start and one end
        mine = [e for e in events if e.part is part]
        assert mine[0].type == "start" and mine[-1].type == "end"
        assert "".join(e.delta for e in mine if e.type == "delta") == part.text


def test_stream_final_answer_and_preamble() -> None:
    preamble = "<|start|>assistant<|channel|>commentary<|message|>Checking. <|end|>"
    stream, _ = run_stream(ids(ANALYSIS + preamble + FINAL))
    assert [p.kind for p in stream.parts] == [REASONING, TEXT, TEXT]
    assert "".join(p.text for p in stream.parts if p.kind == TEXT) == "Checking. It is sunny in Paris."


def test_stream_truncated_inside_content() -> None:
    tokens = ids(ANALYSIS + FINAL)[:-3]
    stream, events = run_stream(tokens)
    assert stream.parts[-1].text == "It is sunny in"
    assert events[-1].type == "end" and stream.error is None


@pytest.mark.parametrize("header", [
    "<|channel|>", "<|channel|>analysis", "<|start|>assistant", "<|start|>assistant<|channel|>final",
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"])
def test_stream_cut_inside_a_header_shows_no_special_tokens(header: str) -> None:
    """The token limit can fall inside a message header: that header holds no text, so nothing is shown (an
    answer of `<|start|>assistant` would be), while a header of garbage still comes out raw."""
    tokens = ids(ANALYSIS) + ids(header) if header.startswith("<|start|>") else ids(header)
    stream, events = run_stream(tokens)
    assert all("<|" not in p.text for p in stream.parts) and all("<|" not in e.delta for e in events)
    assert [p.kind for p in stream.parts] == ([REASONING] if header.startswith("<|start|>") else [])
    stream, _ = run_stream(ids("<|channel|>=(- zebra"))
    assert [(p.kind, p.text) for p in stream.parts] == [(TEXT, "<|channel|>=(- zebra")] and stream.error


def test_stream_garbage_is_raw_text_like_parse_completion() -> None:
    rng = random.Random(0)
    for _ in range(5):
        tokens = [rng.randrange(200_000) for _ in range(30)] + [200002]
        stream, _ = run_stream(tokens)
        parsed = harmony.parse_completion(tokens)
        assert [p.kind for p in stream.parts] == [TEXT]
        assert stream.parts[0].text == parsed.text and stream.error
    # valid harmony first, then garbage: the valid message stays, the rest is raw text
    tokens = ids(ANALYSIS) + ids("hello world<|return|>")
    stream, _ = run_stream(tokens)
    assert [p.kind for p in stream.parts] == [REASONING, TEXT] and stream.error
    parsed = harmony.parse_completion(tokens)
    assert (stream.parts[0].text, stream.parts[1].text) == (parsed.reasoning, parsed.text) == (
        "The user asks about Paris: call the tool. é😀", "hello world")


# ---------------------------------------------------------------------------------------- HTTP, fake backend


class ScriptedBackend:
    """Answers every request with the next scripted completion, a token at a time, like the scheduler."""

    def __init__(self) -> None:
        self.script: list[list[int]] = []
        self.subs: list[Submission] = []

    def submit(self, sub: Submission) -> None:
        self.subs.append(sub)
        tokens = self.script.pop(0) if self.script else None
        threading.Thread(target=self._play, args=(sub, tokens), daemon=True).start()

    def _play(self, sub: Submission, tokens: list[int] | None) -> None:
        if tokens is None:  # no script: generate forever until cancelled
            while not sub.cancelled:
                sub.emit([220])
                time.sleep(0.01)
            return
        tokens = tokens[: sub.max_tokens]
        for t in tokens:
            sub.emit([t])
        reason = "length" if len(tokens) == sub.max_tokens and tokens[-1] not in END_IDS else \
            "tool_call" if tokens[-1] == 200012 else "stop"
        sub.emit(Finish(reason))

    def stats(self) -> dict[str, int]:
        return {"requests": len(self.subs)}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[openai.OpenAI, ScriptedBackend, str]]:
    backend = ScriptedBackend()

    def render(job: Job) -> list[int]:
        return harmony.render_prompt(job.messages, job.effort, job.tools or None)

    app = App(Defaults("gpt-oss-test", 1.0, 1.0, "medium"), max_len=400, render=render, backend=backend,
              end_ids=END_IDS, api_key="secret")
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0), backend, url
    server.shutdown()
    server.server_close()


def test_chat_reasoning_and_tool_call(served) -> None:  # noqa: ANN001
    client, backend, _ = served
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    backend.script = [ids(ANALYSIS + CALL_TEXT)]
    r = client.chat.completions.create(model="gpt-oss-test", messages=messages, tools=[TOOL], reasoning_effort="low")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.reasoning_content == "The user asks about Paris: call the tool. é😀"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.usage.prompt_tokens == len(harmony.render_prompt(messages, "low", [TOOL]))
    assert r.usage.completion_tokens == len(ids(ANALYSIS + CALL_TEXT))
    assert r.usage.completion_tokens_details.reasoning_tokens == len(ids(ANALYSIS))
    # the same, streamed
    backend.script = [ids(ANALYSIS + CALL_TEXT)]
    chunks = list(client.chat.completions.create(model="gpt-oss-test", messages=messages, tools=[TOOL], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == choice.message.reasoning_content
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert "".join(tc.function.arguments or "" for tc in calls) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the result goes back and the conversation continues
    backend.script = [ids(FINAL.removeprefix("<|start|>assistant"))]
    follow = [*messages, {"role": "assistant", "content": None, "reasoning_content": choice.message.reasoning_content,
                          "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    r2 = client.chat.completions.create(model="gpt-oss-test", messages=follow, tools=[TOOL])
    assert r2.choices[0].message.content == "It is sunny in Paris." and r2.choices[0].finish_reason == "stop"
    rendered = harmony.encoding().decode(backend.subs[-1].prompt)
    assert "functions.get_weather to=assistant" in rendered and '{"sky": "sunny"}' in rendered


def test_responses_items_and_events(served) -> None:  # noqa: ANN001
    client, backend, _ = served
    backend.script = [ids(ANALYSIS + CALL_TEXT)]
    r = client.responses.create(model="gpt-oss-test", input="Weather in Paris?", tools=[
        {"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}],
        reasoning={"effort": "high"})
    assert [o.type for o in r.output] == ["reasoning", "function_call"]
    assert r.output[0].content[0].text.startswith("The user asks")
    assert r.output[1].name == "get_weather" and r.output[1].call_id and r.status == "completed"
    assert r.usage.output_tokens_details.reasoning_tokens == len(ids(ANALYSIS))
    backend.script = [ids(ANALYSIS + FINAL)]
    events = list(client.responses.create(model="gpt-oss-test", input="Weather in Paris?", stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.reasoning_text.delta" in types and "response.output_text.delta" in types
    final = events[-1].response
    assert final.output_text == "It is sunny in Paris."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    # function_call + function_call_output items continue the conversation
    backend.script = [ids(FINAL.removeprefix("<|start|>assistant"))]
    r3 = client.responses.create(model="gpt-oss-test", input=[
        {"role": "user", "content": "Weather in Paris?"}, *[o.model_dump() for o in r.output],
        {"type": "function_call_output", "call_id": r.output[1].call_id, "output": "sunny"}])
    assert r3.output_text == "It is sunny in Paris."
    rendered = harmony.encoding().decode(backend.subs[-1].prompt)
    assert "<|channel|>analysis<|message|>The user asks" in rendered  # reasoning of the unfinished turn kept
    assert "to=functions.get_weather" in rendered and "<|message|>sunny<|end|>" in rendered


def test_responses_preamble_round_trip_renders_like_chat(served) -> None:  # noqa: ANN001
    """A preamble (commentary without recipient) before a tool call comes back as a message item and a
    function_call item; sent back, they render as the same turn as Chat's assistant message with content and
    tool_calls: the preamble on the commentary channel, the reasoning of the unfinished turn kept."""
    client, backend, _ = served
    preamble = "<|start|>assistant<|channel|>commentary<|message|>Checking. <|end|>"
    backend.script = [ids(ANALYSIS + preamble + CALL_TEXT)]
    tools = [{"type": "function", **TOOL["function"]}]
    r = client.responses.create(model="gpt-oss-test", input="Weather in Paris?", tools=tools)
    assert [o.type for o in r.output] == ["reasoning", "message", "function_call"]
    backend.script = [ids(FINAL.removeprefix("<|start|>assistant"))]
    client.responses.create(model="gpt-oss-test", tools=tools, input=[
        {"role": "user", "content": "Weather in Paris?"}, *[o.model_dump() for o in r.output],
        {"type": "function_call_output", "call_id": r.output[2].call_id, "output": "sunny"}])
    rendered = harmony.encoding().decode(backend.subs[-1].prompt)
    assert "<|channel|>commentary<|message|>Checking. <|end|>" in rendered and "<|channel|>final" not in rendered
    call = {"id": r.output[2].call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": r.output[2].arguments}}
    backend.script = [ids(FINAL.removeprefix("<|start|>assistant"))]
    client.chat.completions.create(model="gpt-oss-test", tools=[TOOL], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking. ", "reasoning_content": r.output[0].content[0].text,
         "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}])
    assert backend.subs[-1].prompt == backend.subs[-2].prompt


def test_length_limit_and_incomplete(served) -> None:  # noqa: ANN001
    client, backend, _ = served
    backend.script = [ids(ANALYSIS + FINAL)] * 3
    r = client.responses.create(model="gpt-oss-test", input="hi", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    # the item the limit cut short is `incomplete` and keeps its text; so in the stream
    assert r.output[-1].status == "incomplete" and r.output[-1].content[0].text
    with client.responses.stream(model="gpt-oss-test", input="hi", max_output_tokens=5) as s:
        events = list(s)
    assert [e.item.status for e in events if e.type == "response.output_item.done"] == ["incomplete"]
    assert events[-1].type == "response.incomplete" and events[-1].response.output[-1].status == "incomplete"
    # a whole answer: every item completed
    r = client.responses.create(model="gpt-oss-test", input="hi")
    assert r.status == "completed" and [o.status for o in r.output] == ["completed", "completed"]


def test_length_limit_inside_a_header(served) -> None:  # noqa: ANN001
    client, backend, _ = served
    backend.script = [ids(ANALYSIS + FINAL)]
    limit = len(ids(ANALYSIS)) + 3  # <|start|>assistant<|channel|>
    r = client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=limit)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == limit
    assert r.choices[0].message.content == "" and r.choices[0].message.reasoning_content.startswith("The user")


def test_errors_and_auth(served) -> None:  # noqa: ANN001
    client, _, url = served
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "hi"}], n=3)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="gpt-oss-test", input="hi", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id"


def test_chunked_request_body_is_refused_and_the_connection_stays_usable(served) -> None:  # noqa: ANN001
    """A chunked body is refused (411) and its connection closed, so the unread body is never parsed as the next
    request; the same keep-alive client's next request (on a new connection) is answered as sent. The request
    goes out in one write: sent piece by piece, its last piece can meet the closed socket (a broken pipe)."""
    import http.client
    import socket

    _, _, url = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "gpt-oss-test", "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        reply = sock.makefile("rb")
        assert reply.readline().split()[1] == b"411"
        headers = {}
        while (line := reply.readline().strip()):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        assert headers["connection"].lower() == "close"
        assert json.loads(reply.read(int(headers["content-length"])))["error"]["message"]
        assert reply.read() == b""  # closed: nothing of the body is taken for a next request
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    conn.close()


def test_negative_content_length_is_answered(served) -> None:  # noqa: ANN001
    import socket

    _, _, url = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"
                     b"Content-Length: -1\r\n\r\n{}")
        assert sock.makefile("rb").readline().split()[1] == b"400"


def test_http_1_0_stream_is_not_chunked(served) -> None:  # noqa: ANN001
    """HTTP/1.0 has no chunked encoding: the SSE events come as they are and the connection's end ends them."""
    import socket

    _, backend, url = served
    backend.script = [ids(ANALYSIS + FINAL)]
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "gpt-oss-test", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer secret\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
        raw = sock.makefile("rb").read()  # to the server's close
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
    events = [line.removeprefix(b"data: ") for line in payload.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
                   if json.loads(e)["choices"])
    assert text == "It is sunny in Paris."


def test_head_and_options_get_json_errors(served) -> None:  # noqa: ANN001
    import http.client

    _, _, url = served
    conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=60)
    conn.request("OPTIONS", "/v1/chat/completions", headers={"Authorization": "Bearer secret"})
    resp = conn.getresponse()
    assert resp.status == 405 and json.loads(resp.read())["error"]["code"] == "method_not_allowed"
    conn.request("HEAD", "/health")  # headers only; the connection stays usable
    resp = conn.getresponse()
    assert resp.status == 405 and resp.getheader("Content-Type") == "application/json" and resp.read() == b""
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_model_id_with_a_slash() -> None:
    """An id such as `openai/gpt-oss-120b`: the client percent-encodes it in GET /v1/models/{id}."""
    app = App(Defaults("openai/gpt-oss-test", 1.0, 1.0, "medium"), max_len=400, render=lambda job: [],
              backend=ScriptedBackend())
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)
        assert client.models.retrieve("openai/gpt-oss-test").id == "openai/gpt-oss-test"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("openai/other")
    finally:
        server.shutdown()
        server.server_close()


def test_cancelled_stream_cancels_the_request(served) -> None:  # noqa: ANN001
    client, backend, _ = served
    backend.script = []
    stream = client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "go"}],
                                            stream=True)
    next(iter(stream))
    sub = backend.subs[-1]
    stream.close()
    assert sub._cancelled.wait(timeout=60)


def test_load_model_for_transformers_chat(served) -> None:  # noqa: ANN001
    """`transformers chat` asks POST /load_model (of `transformers serve`) first; like every route but
    /health it needs the key when the server has one."""
    import urllib.error
    import urllib.request

    _, _, url = served

    def post(model: str, key: str = "secret") -> tuple[int, bytes]:
        req = urllib.request.Request(url + "/load_model", data=json.dumps({"model": model}).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    status, body = post("gpt-oss-test")
    assert status == 200 and json.loads(body.decode().removeprefix("data: "))["status"] == "ready"
    assert post("other")[0] == 404
    assert post("gpt-oss-test", key="")[0] == 401


# ---------------------------------------------------------------------------------------- hostile HTTP


def _raw(url: str, data: bytes, timeout: float = 60) -> tuple[bytes, bytes]:
    """Send raw bytes; (the status line, everything the server sent until it closed or went quiet)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        sock.settimeout(3)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            pass
    return got.split(b"\r\n", 1)[0], got


POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"


def test_deeply_nested_json_is_a_400(served) -> None:  # noqa: ANN001
    """It was a 500 (RecursionError inside json.loads)."""
    _, _, url = served
    body = b'{"messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    status, got = _raw(url, POST + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert status.split()[1] == b"400" and b"nested too deeply" in got


def test_conflicting_content_lengths_are_refused_and_the_connection_closed(served) -> None:  # noqa: ANN001
    """Two Content-Length headers were accepted (the first used) and the rest of the body stayed on the
    connection, parsed as the next request: request smuggling behind a proxy that read the other length."""
    _, backend, url = served
    body = json.dumps({"model": "gpt-oss-test", "messages": [{"role": "user", "content": "hi"}]}).encode()
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n\r\n"
    before = len(backend.subs)
    status, got = _raw(url, POST + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (
        len(body), len(body) + len(smuggled)) + body + smuggled)
    assert status.split()[1] == b"400" and b"Content-Length headers" in got
    assert got.count(b"HTTP/1.1 ") == 1  # nothing answered the smuggled request: the connection was closed
    assert len(backend.subs) == before
    status, got = _raw(url, POST + b"Content-Length: 5, 7\r\n\r\n{}")
    assert status.split()[1] == b"400" and got.count(b"HTTP/1.1 ") == 1


def test_a_stalled_client_is_let_go_and_connections_are_capped() -> None:
    """A client that sends half a request no longer holds its thread for 600 s (serve.timeout_seconds), and
    connections beyond serve.max_connections are answered 503 at once, not queued behind the others."""
    import socket

    app = App(Defaults("gpt-oss-test", 1.0, 1.0, "medium"), max_len=400, render=lambda job: [1],
              backend=ScriptedBackend(), end_ids=END_IDS)
    server = make_server(app, "127.0.0.1", 0, timeout=1.0, max_connections=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        stalled = [socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) for _ in range(2)]
        for s in stalled:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mod")
        time.sleep(0.3)
        status, got = _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status.split()[1] == b"503" and b"serve.max_connections" in got
        for s in stalled:  # each is closed by the server after its read timeout (a failure guard of 30 s)
            s.settimeout(30)
            while s.recv(65536):
                pass
            s.close()
        deadline = time.monotonic() + 30
        while (status := _raw(url, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")[0]) != \
                b"HTTP/1.1 200 OK" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == b"HTTP/1.1 200 OK"
    finally:
        server.shutdown()
        server.server_close()


class EchoBackend:
    """Answers a token-id prompt with the same ids, handed out in random batches from one thread for all
    requests, as the scheduler does; or, for a prompt [0], floods tokens until the request is cancelled."""

    def __init__(self) -> None:
        self.subs: list[Submission] = []
        self.lock = threading.Lock()
        self.running: list[tuple[Submission, list[int]]] = []
        threading.Thread(target=self._loop, daemon=True).start()

    def submit(self, sub: Submission) -> None:
        with self.lock:
            self.subs.append(sub)
            self.running.append((sub, list(sub.prompt)))

    def _loop(self) -> None:
        rng = random.Random(0)
        while True:
            time.sleep(0.002)
            with self.lock:
                running, self.running = self.running, []
            keep = []
            for sub, rest in running:
                if sub.cancelled:
                    continue
                if sub.prompt == [0]:  # the flood
                    sub.emit([220] * 2000)
                    keep.append((sub, rest))
                    continue
                n = rng.randint(1, 3)
                sub.emit(rest[:n])
                if rest[n:]:
                    keep.append((sub, rest[n:]))
                else:
                    sub.emit(Finish("length"))
            with self.lock:
                self.running = keep + self.running

    def stats(self) -> dict[str, int]:
        return {"requests": len(self.subs)}


def test_the_stream_writer_sends_a_last_finish_before_it_closes() -> None:
    """A request ended as the server stops (the scheduler's error Finish, then the writer closed at once) still
    gets its last bytes: they were lost when the writer ended its streams before writing what was handed over."""
    import socket

    from runtime.serve.streams import Stream, StreamWriter

    for _ in range(20):
        writer = StreamWriter()
        ours, theirs = socket.socketpair()
        sub = Submission([1], 8, 0.0, 1.0)
        st = Stream(ours, sub, lambda toks: b"t%d;" % len(toks), lambda end, n: b"end %s %d" % (end.reason.encode(), n),
                    timeout=5.0)
        handler = threading.Thread(target=writer.stream, args=(st,))
        handler.start()
        sub.emit([5, 6])
        theirs.settimeout(10)
        assert theirs.recv(3) == b"t2;"
        sub.emit(Finish("error", "the server is stopping"))
        writer.close()
        handler.join(timeout=10)
        got = b""
        while not got.endswith(b"end error 2") and (chunk := theirs.recv(64)):
            got += chunk
        assert got == b"end error 2" and not st.gone
        ours.close()
        theirs.close()


def test_many_streams_each_get_their_own_tokens_and_a_reader_that_stops_is_let_go() -> None:
    """The stream writer (one thread for every stream): 96 concurrent streams get exactly their tokens, in
    order, while a client that stops reading (its socket full) neither stalls them nor stays: its request is
    cancelled after serve.timeout_seconds, and the server keeps answering."""
    import socket

    import openai

    backend = EchoBackend()
    app = App(Defaults("gpt-oss-test", 1.0, 1.0, "medium"), max_len=100_000, render=lambda job: [1],
              backend=backend, end_ids=END_IDS)
    server = make_server(app, "127.0.0.1", 0, timeout=1.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        body = json.dumps({"model": "gpt-oss-test", "prompt": [0], "max_tokens": 90_000, "stream": True}).encode()
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        words = [[1000 + 7 * i + j for j in range(40)] for i in range(96)]
        got: dict[int, str] = {}

        def one(i: int) -> None:
            stream = client.completions.create(model="gpt-oss-test", prompt=words[i], max_tokens=40, stream=True)
            got[i] = "".join(c.choices[0].text for c in stream)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(96)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == {i: harmony.encoding().decode(words[i]) for i in range(96)}
        flood = next(s for s in backend.subs if s.prompt == [0])
        assert flood._cancelled.wait(timeout=60)  # a failure guard: the timeout is 1 s
        stalled.close()
        status, _ = _raw(f"http://127.0.0.1:{port}", b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == b"HTTP/1.1 200 OK"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("field", "value", "code"), [
    ("temperature", 2.5, "invalid_value"), ("temperature", -0.1, "invalid_value"), ("temperature", "hot", "invalid_type"),
    ("top_p", 1.5, "invalid_value"), ("top_p", True, "invalid_type"), ("max_tokens", 0, "invalid_value"),
    ("max_tokens", 1.5, "invalid_type"), ("messages", "hi", "invalid_type"), ("stream", "yes", "invalid_type"),
    ("n", 2, "unsupported_parameter"),
])
def test_request_fields_are_checked(served, field: str, value: object, code: str) -> None:  # noqa: ANN001
    """The field checks, in seconds (the slow server module drives the same through the real model)."""
    client, _, _ = served
    body = {"model": "gpt-oss-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, field: value}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.with_raw_response.create(**body)  # type: ignore[arg-type]
    err = e.value.body
    assert err["code"] == code and err["param"] == field and err["message"], err


def test_context_length_is_checked(served) -> None:  # noqa: ANN001
    """serve.max_len is 400 here: a prompt that fills it, and max_tokens beyond what it leaves, are 400s
    naming the fix."""
    client, _, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "word " * 500}])
    assert e.value.body["code"] == "context_length_exceeded" and "serve.max_len" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=390)
    assert e.value.body["param"] == "max_tokens" and "set max_tokens to at most" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="gpt-oss-test", input="hi", max_output_tokens=390)
    assert e.value.body["param"] == "max_output_tokens"


@pytest.mark.parametrize(("raw", "says"), [
    (b'"temperature": NaN', b"NaN is not a JSON value"),
    (b'"metadata": {"k": Infinity}', b"Infinity is not a JSON value"),
    (b'"user": "\\ud800"', b"lone UTF-16 surrogate"),
    (b'"model": "\\udfff"', b"lone UTF-16 surrogate"),
    (b'"modalities": 5', b"modalities"),
])
def test_bodies_that_could_not_be_answered_are_400s(served, raw: bytes, says: bytes) -> None:  # noqa: ANN001
    """A lone surrogate anywhere in the body made the answer unencodable (a 500 after generating, an empty
    stream, or a dropped connection); NaN/Infinity were echoed back as invalid JSON; a non-list
    `modalities` was a 500. Each is a 400 up front, and the connection is answered."""
    _, _, url = served
    body = b'{"model": "gpt-oss-test", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], ' + raw + b"}"
    status, got = _raw(url, POST + b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                       % len(body) + body)
    assert status.split()[1] == b"400" and says in got, got


# ---------------------------------------------------------------------------------------- /v1/completions


def test_completions_raw_text_in_and_out(served) -> None:  # noqa: ANN001
    """A raw prompt (harmony special tokens written in it are those tokens) and the tokens back as text, no
    harmony parsing; the stop token that ends the turn is not shown; the stream adds up to the body."""
    client, backend, _ = served
    prompt = "<|start|>user<|message|>Weather in Paris?<|end|><|start|>assistant"
    answer = ids(ANALYSIS + "<|start|>assistant<|channel|>final<|message|>Sunny, 30 °C 😀.<|return|>")
    backend.script = [answer]
    r = client.completions.create(model="gpt-oss-test", prompt=prompt, max_tokens=200)
    assert backend.subs[-1].prompt == ids(prompt) and backend.subs[-1].max_tokens == 200
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == harmony.decode(answer[:-1]) and r.choices[0].text.endswith("Sunny, 30 °C 😀.")
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids(prompt)), len(answer))
    backend.script = [answer]
    chunks = list(client.completions.create(model="gpt-oss-test", prompt=prompt, max_tokens=200, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(answer) and not chunks[-1].choices
    # a UTF-8 character split over tokens arrives whole: no chunk holds a replacement character
    assert all("\ufffd" not in c.choices[0].text for c in chunks if c.choices)


def test_completions_token_ids_default_limit_and_ignore_eos(served) -> None:  # noqa: ANN001
    client, backend, _ = served
    backend.script = [ids("one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                          "fifteen sixteen seventeen eighteen<|return|>")]
    r = client.completions.create(model="gpt-oss-test", prompt=[200006, 1428, 200008, 13225])
    assert backend.subs[-1].prompt == [200006, 1428, 200008, 13225]
    assert backend.subs[-1].max_tokens == 16 and r.usage.completion_tokens == 16  # OpenAI's default max_tokens
    assert r.choices[0].finish_reason == "length" and not backend.subs[-1].ignore_eos
    backend.script = [ids("hi<|return|>")]
    client.completions.create(model="gpt-oss-test", prompt="x", max_tokens=5, extra_body={"ignore_eos": True})
    assert backend.subs[-1].ignore_eos


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"prompt": ["a", "b"]}, 400, "prompt"),  # several prompts
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [1, 300_000_000]}, 400, "prompt"),  # not a token
    ({"prompt": {"text": "a"}}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "a", "n": 2}, 400, "n"),
    ({"prompt": "a", "echo": True}, 400, "echo"),
    ({"prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ({"prompt": "a", "stop": ["\n"]}, 400, "stop"),
    ({"prompt": "a", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 1000}, 400, "max_tokens"),  # beyond serve.max_len (400)
])
def test_completions_bad_requests(served, body: dict, status: int, param: str) -> None:  # noqa: ANN001
    client, _, _ = served
    with pytest.raises(openai.APIStatusError) as e:
        client.post("/completions", body={"model": "gpt-oss-test", **body}, cast_to=object)
    assert e.value.status_code == status and e.value.body["param"] == param, e.value.body
