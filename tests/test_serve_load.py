"""Continuous batching under load, on the random tiny model under torchrun (2 ranks, tensor parallel):
concurrent streams give the tokens of sequential runs, and clients that stall or leave stall nobody. This
server runs with async scheduling (generation.async_scheduling: each step launched before the last one's
tokens are read); tests/test_serve.py's runs without."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from tests.serve_server import Server, torchrun_server  # noqa: E402

MAX_BATCH = 8
MAX_LEN = 4096  # the two long requests below (4000 tokens) cannot end before the test ends them
LONG = 4000
PROMPTS = [f"Tell me something about the number {i}." for i in range(32)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with torchrun_server(tmp_path_factory.mktemp("serve-load"), 2, [
        "parallel.tp_size=2", f"serve.max_len={MAX_LEN}", f"serve.max_batch={MAX_BATCH}",
        "generation.async_scheduling=true",
    ]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def health(server: Server) -> dict:
    with urllib.request.urlopen(server.root + "/health", timeout=60) as r:
        return json.loads(r.read())


def wait_for(server: Server, check, what: str) -> dict:  # noqa: ANN001
    """Poll /health until `check` holds (a failure guard, not a timing assertion)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        h = health(server)
        if check(h):
            return h
        time.sleep(0.1)
    pytest.fail(f"{what}: /health says {health(server)}")


def stream_chat(client: openai.OpenAI, i: int) -> tuple[str, int]:
    """Request i (max_tokens 4..19, so rows finish and free up at different steps), streamed, greedy."""
    chunks = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=4 + i % 16, temperature=0,
        stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for c in chunks:
        if c.choices:
            text += c.choices[0].delta.content or ""
        if c.usage:
            usage = c.usage
    return text, usage.completion_tokens


def test_32_concurrent_streams_match_sequential_runs(server: Server, client: openai.OpenAI) -> None:
    sequential = [stream_chat(client, i) for i in range(len(PROMPTS))]
    before = health(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(lambda i: stream_chat(client, i), range(len(PROMPTS))))
    assert concurrent == sequential
    assert [n for _, n in sequential] == [4 + i % 16 for i in range(len(PROMPTS))]  # random weights: no stop
    after = wait_for(server, lambda h: h["rows_busy"] == 0, "rows not freed")
    assert after["completed"] - before["completed"] == len(PROMPTS) and after["waiting"] == 0
    # 32 requests through 8 rows: they joined the batch as rows freed up, far fewer steps than one at a time
    assert after["steps"] - before["steps"] < sum(n for _, n in sequential)


def test_cancelled_and_stalled_clients_stall_nobody(server: Server, client: openai.OpenAI) -> None:
    before = health(server)
    # a client that sends a streaming request and never reads. (Its bytes go to socket buffers that
    # localhost autotunes to megabytes, so the handler's writes may never block within this test: what
    # keeps others from waiting on a blocked writer is that only the client's own handler thread writes
    # to its socket; the scheduler hands tokens to per-request queues.)
    stalled = socket.create_connection(server.root.removeprefix("http://").split(":"), timeout=60)
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "stall"}], "stream": True,
                       "max_tokens": LONG, "temperature": 0}).encode()
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    # a client that reads the start of a long stream, then goes away
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "leave"}],
                                            max_tokens=LONG, temperature=0, stream=True)
    next(iter(stream))
    wait_for(server, lambda h: h["rows_busy"] == 2, "both long requests in the batch")
    stream.close()
    wait_for(server, lambda h: h["cancelled"] - before["cancelled"] == 1 and h["rows_busy"] == 1,
             "the closed stream's row was not freed")
    # the others are served meanwhile
    results: list[tuple[str, int]] = []
    threads = [threading.Thread(target=lambda i=i: results.append(stream_chat(client, i))) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(n for _, n in results) == sorted(4 + i % 16 for i in range(4))
    assert health(server)["rows_busy"] == 1  # ... while the stalled one is still in the batch
    stalled.close()
    after = wait_for(server, lambda h: h["rows_busy"] == 0, "the stalled client's row was not freed")
    assert after["cancelled"] - before["cancelled"] == 2
    assert after["generated_tokens"] - before["generated_tokens"] < 2 * LONG + sum(n for _, n in results)


def test_extreme_sampling_values_stop_nobody(server: Server, client: openai.OpenAI) -> None:
    """temperature 1e-40 and top_p 1e-320 pass the API's ranges; they made the sampler raise, which ended the
    scheduler loop and with it every request in flight and the server. Now each is answered (the argmax, as
    greedy), a request beside them is served, non-finite values get a 400, and the server stays up."""
    msgs = [{"role": "user", "content": PROMPTS[3]}]
    greedy = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    with ThreadPoolExecutor(3) as pool:
        tiny_t = pool.submit(client.chat.completions.create, model="tiny", messages=msgs, max_tokens=6,
                             temperature=1e-40)
        tiny_p = pool.submit(client.chat.completions.create, model="tiny", messages=msgs, max_tokens=6,
                             temperature=1.0, top_p=1e-320)
        beside = pool.submit(stream_chat, client, 5)
        for r in (tiny_t.result(), tiny_p.result()):
            assert r.choices[0].message == greedy.choices[0].message
        assert beside.result()[1] >= 1
    for raw in (b'"temperature": NaN', b'"temperature": Infinity', b'"top_p": -Infinity'):
        body = b'{"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], ' + raw + b"}"
        req = urllib.request.Request(server.root + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 400 and b"is not a JSON value" in e.value.read()
    assert health(server)["status"] == "ok"


def test_sampling_parameters_reach_the_sampler(server: Server, client: openai.OpenAI) -> None:
    """On random weights the next-token distribution is wide: a draw at temperature 1 leaves the greedy path
    within a few tokens, while top_p=1e-6 (only the top token kept) or temperature 1e-6 (raised to 1e-5: a
    one-hot softmax) stays on it. A server that ignored temperature or top_p fails one of these."""
    msgs = [{"role": "user", "content": PROMPTS[7]}]

    def text(**kw: float) -> str:
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, **kw)
        return r.choices[0].message.content or ""

    greedy = text(temperature=0)
    assert text(temperature=1.0, top_p=1e-6) == greedy
    assert text(temperature=1e-6) == greedy
    assert any(text(temperature=1.0) != greedy for _ in range(3))


def test_completions_with_ignore_eos_stream_fixed_lengths(server: Server, client: openai.OpenAI) -> None:
    """POST /v1/completions on the model: a raw prompt, `ignore_eos` (vLLM's extension) for an exact output
    length, streamed token by token; the stream adds up to the non-streamed answer (greedy), concurrently too."""
    def once(i: int, stream: bool) -> tuple[str, int, str]:
        kw = {"model": "tiny", "prompt": f"Count to {i}:", "max_tokens": 24, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
        if not stream:
            r = client.completions.create(**kw)
            return r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason
        text, usage, finish = "", None, None
        for c in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            if c.choices:
                text += c.choices[0].text
                finish = c.choices[0].finish_reason or finish
            usage = c.usage or usage
        return text, usage.completion_tokens, finish

    plain = [once(i, False) for i in range(8)]
    assert all(n == 24 and finish == "length" for _, n, finish in plain)
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda i: once(i, True), range(8))) == plain


def test_a_conversation_coming_back_reuses_its_cached_prefix(server: Server, client: openai.OpenAI) -> None:
    """The prefix cache over HTTP (2 ranks, TP): a chat's next turn reports the first turn's prompt as cached
    (`usage.prompt_tokens_details.cached_tokens`, Responses' `input_tokens_details`), in whole 16-token blocks;
    sent again, all of its prompt's whole blocks but the one with its last token are cached and the greedy answer is the same (the tokens against a server
    without the cache: tests/test_continuous.py)."""
    messages = [{"role": "user", "content": "Name three rivers of Europe, please."}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    turn = [*messages, {"role": "assistant", "content": first.choices[0].message.content or "x"},
            {"role": "user", "content": "And of Asia?"}]
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=6, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 16 * 16  # whole blocks
    again = client.chat.completions.create(model="tiny", messages=turn, max_tokens=6, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == (again.usage.prompt_tokens - 1) // 16 * 16
    assert again.choices[0].message.content == second.choices[0].message.content
    r = client.responses.create(model="tiny", input=turn, max_output_tokens=6, temperature=0)
    assert r.usage.input_tokens_details.cached_tokens == (r.usage.input_tokens - 1) // 16 * 16
    assert health(server)["cached_tokens"] > 0
