"""The HTTP layer: routes, API key, JSON in, JSON or server-sent events out (standard library only).

    GET  /health                 no key needed; 200 {"status": "ok", ...counters} once the model is loaded
    POST /load_model             `transformers chat` asks it (as of `transformers serve`)
    GET  /v1/models[/{id}]       the served model
    POST /v1/chat/completions    runtime/serve/chat.py
    POST /v1/responses           runtime/serve/responses.py
    POST /v1/completions         runtime/serve/completions.py (raw text, no harmony)

One thread per connection (ThreadingHTTPServer) reads, checks and answers requests. A generation request
is rendered to harmony token ids on its thread and submitted to the scheduler. A streamed answer is then
written by the server's one stream writer (runtime/serve/streams.py: every stream's new tokens turned into
events (runtime/serve/harmony_stream.py) and written without blocking, one pass per step) while the
connection's thread sleeps until the stream ends; a whole answer is awaited on the connection's thread. A
slow client only fills its own buffer. A client that goes away (a failed write, or its socket closed)
cancels its request, which frees its row.
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType
from typing import Any, Protocol

from runtime import harmony
from runtime.serve import chat, completions, responses
from runtime.serve.fields import ApiError
from runtime.serve.harmony_stream import HarmonyStream
from runtime.serve.job import Defaults, Job, Outcome, sse
from runtime.serve.scheduler import Finish, QueueFull, ShuttingDown, Submission
from runtime.serve.streams import Stream, StreamWriter

log = logging.getLogger("runtime.serve")

MAX_BODY_BYTES = 32 << 20
POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still there
ENDPOINTS: dict[str, ModuleType] = {chat.PATH: chat, responses.PATH: responses, completions.PATH: completions}
MAX_TOKENS_FIELDS = {chat.PATH: ("max_completion_tokens", "max_tokens"), responses.PATH: ("max_output_tokens",),
                     completions.PATH: ("max_tokens",)}
INPUT_FIELD = {chat.PATH: "messages", responses.PATH: "input", completions.PATH: "prompt"}


class Backend(Protocol):
    """What the HTTP layer needs from the scheduler (a fake one in unit tests)."""

    def submit(self, sub: Submission) -> None: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass
class App:
    """Everything a request handler needs."""

    defaults: Defaults
    max_len: int
    """Prompt + generated tokens per request (the KV cache row length)."""
    render: Callable[[Job], list[int]]
    """A job's conversation as harmony prompt ids; ValueError for a conversation it cannot render."""
    backend: Backend | None = None
    """The scheduler; None while the model loads."""
    end_ids: frozenset[int] = frozenset()
    """Tokens that end a turn (never shown as text)."""
    api_key: str | None = None
    ready: threading.Event | None = None
    """Set once the model is loaded (and backend/end_ids are in place); until then generation gets 503."""


def _refuse_constant(name: str) -> float:
    """json.loads accepts NaN and Infinity, which are not JSON (and would be echoed back as invalid JSON)."""
    raise ValueError(f"{name} is not a JSON value")


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` at once: a connection beyond that is answered
    503 at once and closed (no thread is started for it)."""

    request_queue_size = 1024  # the listen backlog: socketserver's default of 5 resets bursts of clients
    daemon_threads = True
    max_connections = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open = 0
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            full = self._open >= self.max_connections
            if not full:
                self._open += 1
        if full:
            body = json.dumps(ApiError(503, f"The server has {self.max_connections} connections open "
                                            "(serve.max_connections): retry shortly.", code="overloaded").body()).encode()
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nRetry-After: 1\r\nContent-Length: " + str(len(body)).encode()
                                + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open -= 1

    def server_close(self) -> None:
        super().server_close()
        writer = getattr(self, "writer", None)  # none yet when binding the address failed
        if writer is not None:
            writer.close()


def make_server(app: App, host: str, port: int, timeout: float = 60.0, max_connections: int = 1024) -> ThreadingHTTPServer:
    """Bind (port 0: any free port); `serve_forever()` starts answering. `timeout`: seconds a socket read or
    write may block (a client stalled mid-request, an idle keep-alive connection, a stream nobody reads) before
    its connection is closed; `max_connections`: connections served at once."""
    base = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
    cls = type("Server", (base,), {"max_connections": max_connections})
    server = cls((host, port), type("Handler", (Handler,), {"timeout": timeout}))
    server.app = app  # type: ignore[attr-defined]
    server.writer = StreamWriter()  # type: ignore[attr-defined]
    return server


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gptoss-runtime"
    timeout = 60.0  # seconds a socket read or write may block (serve.timeout_seconds; make_server sets it): idle
    # keep-alive connections, clients stalled mid-request and clients that stopped reading a stream are let go
    # (the latter's request is cancelled)

    @property
    def app(self) -> App:
        return self.server.app  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------ routing

    def do_GET(self) -> None:  # noqa: N802
        self._route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_OPTIONS(self) -> None:  # noqa: N802 - no CORS: a JSON 405 like any other method a route lacks
        self._route("OPTIONS")

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self._started = time.monotonic()
        self._body_read = False
        self._streaming = False
        try:
            if path == "/health":
                self._only(method, "GET")
                return self._health()
            self._authorize()  # every route but /health, unknown ones too (they would list the routes)
            if path == "/load_model":  # `transformers chat` asks this of `transformers serve` before chatting
                self._only(method, "POST")
                return self._load_model()
            if path == "/v1/models":
                self._only(method, "GET")
                return self._json(200, {"object": "list", "data": [self._model()]})
            if path.startswith("/v1/models/"):
                self._only(method, "GET")
                name = urllib.parse.unquote(path.removeprefix("/v1/models/"))  # clients encode "/" in an id
                if name != self.app.defaults.model:
                    raise self._unknown_model(name)
                return self._json(200, self._model())
            if path in ENDPOINTS:
                self._only(method, "POST")
                return self._generate(path)
            raise ApiError(404, f"Unknown route {method} {path}: this server has GET /health, GET /v1/models, "
                           f"POST {chat.PATH}, POST {responses.PATH} and POST {completions.PATH}.", code="unknown_url")
        except ApiError as e:
            self._drain_body()
            self._json(e.status, e.body(), {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug must not take the server down
            log.exception("error while answering %s %s", method, path)
            self.close_connection = True
            if self._streaming:  # a status line cannot follow the stream's headers: just end the connection
                return
            try:
                self._json(500, ApiError(500, "Internal server error (see the server log).").body())
            except OSError:
                pass

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(405, f"Method {method} not allowed on {self.path}: use {allowed}.",
                           code="method_not_allowed")

    def _authorize(self) -> None:
        key = self.app.api_key
        if not key:
            return
        header = self.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            what = "Incorrect API key provided." if given else "Missing API key: send 'Authorization: Bearer KEY'."
            raise ApiError(401, f"{what} The key is the server's serve.api_key (or $GPTOSS_API_KEY).",
                           code="invalid_api_key")

    def _model(self) -> dict[str, Any]:
        return {"id": self.app.defaults.model, "object": "model", "created": 0, "owned_by": "gptoss-runtime"}

    def _unknown_model(self, name: str) -> ApiError:
        return ApiError(404, f"The model '{name}' does not exist: this server serves '{self.app.defaults.model}' "
                        "(GET /v1/models).", "model", "model_not_found")

    def _load_model(self) -> None:
        """The model is always loaded: answer `transformers serve`'s progress stream with `ready` at once (the
        key is checked, as on every route but /health)."""
        asked = self._read_json().get("model")
        if asked != self.app.defaults.model:
            raise self._unknown_model(str(asked))
        if self.app.ready is not None and not self.app.ready.is_set():
            raise ApiError(503, "The model is still loading: retry when GET /health answers ok.", code="loading")
        data = sse({"status": "ready", "model": asked, "cached": True})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _health(self) -> None:
        ready = self.app.ready is None or self.app.ready.is_set()
        if not ready:
            return self._json(503, {"status": "loading"})
        stats = self.app.backend.stats() if self.app.backend is not None else {}
        self._json(200, {"status": "ok", "model": self.app.defaults.model, **stats})

    # ------------------------------------------------------------------------------ generation

    def _read_json(self) -> dict[str, Any]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True  # the unread body must not be taken for the next request
            raise ApiError(411, "Chunked request bodies are not accepted: send Content-Length.")
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:  # which one a proxy in front honoured is unknown: the rest could be a smuggled request
            self.close_connection = True
            raise ApiError(400, f"{len(lengths)} Content-Length headers ({', '.join(lengths)}): send exactly one.")
        try:
            length = int(lengths[0]) if lengths else int("")
        except ValueError:
            self.close_connection = True
            if lengths:
                raise ApiError(400, f"Invalid Content-Length {lengths[0]!r}: send the body's length in bytes.") from None
            raise ApiError(411, "Missing Content-Length: send the JSON body with its length.") from None
        if length < 0:  # rfile.read(-1) would wait for the client to close the connection
            self.close_connection = True
            raise ApiError(400, f"Invalid Content-Length {length}: send the JSON body's length in bytes.")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, f"The request body has {length} bytes; the limit is {MAX_BODY_BYTES}.")
        raw = self.rfile.read(length)
        self._body_read = True
        try:
            body = json.loads(raw, parse_constant=_refuse_constant)
            if harmony.lone_surrogate(body):
                raise ValueError("a string holds a lone UTF-16 surrogate (e.g. \\ud800): send text as UTF-8 or "
                                 "surrogate pairs")
        except RecursionError:
            raise ApiError(400, "The JSON body is nested too deeply to parse: send a flatter JSON object.",
                           code="invalid_json") from None
        except (UnicodeDecodeError, ValueError) as e:  # ValueError: also an integer of more than 4300 digits
            raise ApiError(400, f"We could not parse the JSON body of your request ({e}). Send a JSON object, "
                           "with the header 'Content-Type: application/json'.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    def _drain_body(self) -> None:
        """An error answered before the body was read: read it, or the connection cannot be reused."""
        if getattr(self, "_body_read", False) or self.close_connection:
            return
        lengths = self.headers.get_all("Content-Length") or ["0"]
        try:
            length = int(lengths[0]) if len(lengths) == 1 else -1
        except ValueError:
            length = -1
        if length < 0:  # no way to know where this body ends: the connection cannot carry another request
            self.close_connection = True
        elif 0 < length <= MAX_BODY_BYTES:
            self.rfile.read(length)
        elif length:
            self.close_connection = True

    def _generate(self, path: str) -> None:
        app = self.app
        if app.backend is None or (app.ready is not None and not app.ready.is_set()):
            raise ApiError(503, "The model is still loading: retry when GET /health answers ok.", code="loading")
        endpoint = ENDPOINTS[path]
        job = endpoint.parse(self._read_json(), app.defaults)
        if job.model != app.defaults.model:
            raise self._unknown_model(job.model)
        try:
            prompt = job.prompt_ids if job.prompt_ids is not None else app.render(job)
        except (ValueError, TypeError, KeyError) as e:
            raise ApiError(400, f"The conversation cannot be rendered in harmony: {e}", INPUT_FIELD[path],
                           "invalid_value") from None
        max_tokens = self._max_tokens(path, job, len(prompt))
        sub = Submission(prompt, max_tokens, job.temperature, job.top_p, job.ignore_eos)
        try:
            app.backend.submit(sub)
        except QueueFull:
            raise ApiError(503, "Too many requests are waiting (serve.max_waiting): retry later.",
                           code="overloaded") from None
        except ShuttingDown:
            raise ApiError(503, "The server is shutting down.", code="shutting_down") from None
        fmt = endpoint.Formatter(job)
        if job.prompt_ids is not None:  # raw text out, no harmony
            stream: Any = completions.RawStream(app.end_ids, job.ignore_eos)
        else:
            stream = HarmonyStream(app.end_ids)
        if job.stream:
            self._stream(sub, stream, fmt, len(prompt))
            return
        try:
            finish, generated = self._consume(sub, stream)
            if finish is None:  # the client left
                return
            if finish.reason == "error":
                raise ApiError(503, f"The request could not finish: {finish.message}.", code="server_error")
            stream.close()
            out = Outcome(len(prompt), generated, stream.reasoning_tokens, finish.reason, stream.parts, sub.cached_tokens)
            self._json(200, fmt.body(out))
            self._log_done(path, job, out)
        finally:
            sub.cancel()  # no-op for a finished request; frees the row if anything above failed

    def _max_tokens(self, path: str, job: Job, prompt_len: int) -> int:
        limit = self.app.max_len
        if prompt_len >= limit:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens (serve.max_len), and your "
                           f"{INPUT_FIELD[path]} take {prompt_len} tokens, leaving no room for an answer. Shorten "
                           "the conversation, or start the server with a larger serve.max_len.",
                           INPUT_FIELD[path], "context_length_exceeded")
        if job.max_tokens is not None and prompt_len + job.max_tokens > limit:
            param = next(k for k in MAX_TOKENS_FIELDS[path] if job.body.get(k) is not None)
            raise ApiError(400, f"This model's maximum context length is {limit} tokens (serve.max_len). However, "
                           f"you requested {prompt_len + job.max_tokens} tokens ({prompt_len} in the "
                           f"{INPUT_FIELD[path]}, {job.max_tokens} in the completion): set {param} to at most "
                           f"{limit - prompt_len}.", param, "context_length_exceeded")
        if job.max_tokens is not None:
            return job.max_tokens
        return min(job.default_max_tokens or limit, limit - prompt_len)

    def _stream(self, sub: Submission, stream: HarmonyStream, fmt: Any, prompt_len: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        # HTTP/1.0 has no chunked encoding: the stream's end is the connection's end
        self._chunked = self.request_version != "HTTP/1.0"
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self._streaming = True

        def tokens(new: list[int]) -> bytes:  # on the stream writer's thread, as is `finish`
            events = stream.feed(new)
            return self._frame(b"".join(fmt.events(events))) if events else b""

        def finish(end: Finish, generated: int) -> bytes:
            if end.reason == "error":
                data = self._frame(b"".join(fmt.error(ApiError(503, f"The request could not finish: {end.message}."))))
            else:
                out = Outcome(prompt_len, generated, stream.reasoning_tokens, end.reason, stream.parts, sub.cached_tokens)
                data = self._frame(b"".join(fmt.events(stream.close()) + fmt.tail(out)))
                self._log_done(self.path, fmt.job, out)
            return data + (b"0\r\n\r\n" if self._chunked else b"")

        try:
            self._chunk(b"".join(fmt.head()))
            st = Stream(self.connection, sub, tokens, finish, self.timeout)
            self.server.writer.stream(st)  # type: ignore[attr-defined] - returns when the stream has ended
            if st.gone:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        finally:
            sub.cancel()  # no-op for a finished request; frees the row of one whose client left or failed

    def _consume(self, sub: Submission, stream: HarmonyStream) -> tuple[Finish | None, int]:
        """Wait for the whole answer: (its Finish, tokens generated), or (None, 0) when the client left (the
        request is cancelled)."""
        while not sub.done.wait(POLL_SECONDS):
            if self._client_gone():
                sub.cancel()
                self.close_connection = True
                return None, 0
        tokens: list[int] = []
        finish = None
        while finish is None:
            item = sub.events.get_nowait()  # the Finish is the last item, and it is in
            if isinstance(item, Finish):
                finish = item
            else:
                tokens += item
        stream.feed(tokens)
        return finish, len(tokens)

    def _client_gone(self) -> bool:
        """The peer closed its side (a readable socket with nothing to read) or the socket failed."""
        try:
            poll = select.poll()  # not select.select: it refuses descriptors >= 1024, which a busy server has
            poll.register(self.connection, select.POLLIN)
            if not poll.poll(0):
                return False
            self.connection.setblocking(False)
            try:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            finally:
                self.connection.settimeout(self.timeout)
        except BlockingIOError:
            return False
        except (OSError, ValueError):
            return True

    # ------------------------------------------------------------------------------ output

    def _frame(self, data: bytes) -> bytes:
        """Bytes of the response body as sent: a chunk (HTTP/1.1) or as they are (HTTP/1.0)."""
        if not data:
            return b""
        return b"%X\r\n%s\r\n" % (len(data), data) if self._chunked else data

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(self._frame(data))

    def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has the headers of the body it leaves out
            self.wfile.write(data)
        if status >= 400:
            log.info("%s %s -> %d %s", self.command, self.path, status, body.get("error", {}).get("message", ""))

    def _log_done(self, path: str, job: Job, out: Outcome) -> None:
        log.info("POST %s 200%s: %d prompt + %d generated tokens (%d reasoning), %s, %.2f s", path,
                 " stream" if job.stream else "", out.prompt_tokens, out.completion_tokens, out.reasoning_tokens,
                 out.finish, time.monotonic() - self._started)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per generation (_log_done) and per error (_json) instead

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        level = logging.DEBUG if format.startswith("Request timed out") else logging.INFO
        log.log(level, "%s: " + format, self.address_string(), *args)
