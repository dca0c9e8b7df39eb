"""One thread writes every streamed answer: the HTTP layer's output path as an event loop.

A streaming request's handler thread (runtime/serve/http.py) reads and checks the request, sends the
response headers and hands its socket to the `StreamWriter`, then sleeps until the stream has ended. The
scheduler hands out each step's tokens (`Submission.emit`), which marks the request ready and wakes the
writer at most once per batch of news; the writer then turns every ready request's tokens into events
and writes them without blocking (what a socket cannot take yet waits in that stream's buffer, and the
writer comes back when the socket can take more). So a step's tokens for 512 streams cost one wake-up and
512 non-blocking writes on one thread, not 512 threads woken one token at a time taking turns at the GIL
(docs/benchmarks.md, "the HTTP layer at 512 streams").

The writer also watches each stream's socket: a client that closed its side cancels its request, and a
stream whose client stopped reading for `timeout` seconds is cancelled and its connection closed, as the
handler threads did before.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from runtime.serve.scheduler import Finish, Submission

log = logging.getLogger("runtime.serve")

POLL_SECONDS = 0.25
"""How often the writer looks for stalled streams when nothing else wakes it."""
MAX_BUFFERED = 1 << 20
"""Bytes a stream may hold that its client has not taken; beyond that its tokens wait in its queue."""


@dataclass(eq=False)
class Stream:
    """One response being streamed: its socket, its request, and how its events are written."""

    sock: socket.socket
    sub: Submission
    tokens: Callable[[list[int]], bytes]
    """New token ids -> the bytes to send (events, framed as the connection needs)."""
    finish: Callable[[Finish, int], bytes]
    """The Finish and the number of tokens generated -> the stream's last bytes (error or tail, terminator)."""
    timeout: float
    """Seconds the stream may wait for its client to take bytes before it is given up."""
    ended: threading.Event = field(default_factory=threading.Event)
    """Set when the writer is done with the socket (the handler thread takes it back)."""
    gone: bool = False
    """The client left, stalled, or the socket failed: the connection must be closed."""
    generated: int = 0
    out: bytearray = field(default_factory=bytearray)
    finishing: bool = False
    progress: float = 0.0
    """When the socket last took bytes (or the stream last had nothing waiting)."""
    watching: int = 0
    """The selector events registered for the socket."""


class StreamWriter:
    """The thread that writes all streams (see the module docstring)."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._ready: set[Stream] = set()
        self._new: list[Stream] = []
        self._woken = False
        self._closed = False
        self._streams: set[Stream] = set()
        self._last_check = time.monotonic()
        self.busy_seconds = 0.0
        """Time the writer has spent writing (not waiting for news or sockets); the serving loop's stats line."""
        self._thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ other threads

    def stream(self, st: Stream) -> None:
        """Write `st` until its request ends or its client goes; blocks the calling (handler) thread."""
        st.sock.setblocking(False)
        st.progress = time.monotonic()
        st.sub.listener = lambda _sub: self._news(st)  # before it is registered: no emit goes unnoticed
        try:
            with self._lock:
                if self._closed or not self._thread.is_alive():  # stopping: the connection just closes
                    st.gone = True
                    return
                self._new.append(st)
            self._wake()
            while not st.ended.wait(1.0):
                if not self._thread.is_alive():  # the writer is gone: the connection cannot be finished
                    st.gone = True
                    break
        finally:
            st.sub.listener = None
            st.sock.settimeout(st.timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake()
        self._thread.join(timeout=10)

    def _news(self, st: Stream) -> None:
        """The scheduler emitted something for `st`'s request (called on its thread)."""
        with self._lock:
            self._ready.add(st)
            if self._woken:
                return
            self._woken = True
        self._send_wake()

    def _wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        self._send_wake()

    def _send_wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass
        except OSError:
            pass

    # ------------------------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            try:
                if self._turn():
                    return
            except Exception:  # noqa: BLE001 - a bug must not leave every later stream without a writer
                log.exception("the stream writer failed; the streams it was writing are ended")
                for st in list(self._streams):
                    st.sub.cancel()
                    self._end(st, gone=True)
                time.sleep(0.1)  # no busy loop should the failure repeat

    def _turn(self) -> bool:
        """Wait for news or sockets, write what can be written; True once closed and done."""
        events = self._sel.select(timeout=POLL_SECONDS)
        t0 = time.perf_counter()
        try:
            return self._write(events)
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def _write(self, events: list) -> bool:
        """One turn's work on what select() returned (see _turn)."""
        for key, mask in events:
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                continue
            st: Stream = key.data
            if mask & selectors.EVENT_READ:
                self._check_client(st)
            if mask & selectors.EVENT_WRITE and not st.ended.is_set():
                self._flush(st)
                if not st.out and not st.ended.is_set():
                    self._pump(st)  # what waited in its queue while the client was slow
        with self._lock:
            ready, self._ready = self._ready, set()
            new, self._new = self._new, []
            self._woken = False
            closed = self._closed
        for st in new:
            self._streams.add(st)
            self._watch(st, selectors.EVENT_READ)
            ready.add(st)  # tokens emitted before it was registered
        for st in ready:
            if st in self._streams:  # registered and not ended (news can come before registration)
                self._pump(st)
        if closed:  # what could be written went out above (a shutdown's error events too): end the rest
            for st in list(self._streams):
                st.sub.cancel()
                self._end(st, gone=True)
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()
            return True
        now = time.monotonic()
        if now - self._last_check >= POLL_SECONDS:
            self._last_check = now
            for st in list(self._streams):
                if st.out and now - st.progress > st.timeout:
                    log.info("a stream's client took no bytes for %.0f s: request cancelled", st.timeout)
                    st.sub.cancel()
                    self._end(st, gone=True)
        return False

    def _pump(self, st: Stream) -> None:
        """Take what the scheduler handed `st`, turn it into bytes and write (unless its client is behind)."""
        if len(st.out) > MAX_BUFFERED:
            return
        tokens: list[int] = []
        finish = None
        try:
            while finish is None:
                item = st.sub.events.get_nowait()
                if isinstance(item, Finish):
                    finish = item
                else:
                    tokens += item
        except queue.Empty:
            pass
        try:
            if tokens:
                st.generated += len(tokens)
                st.out += st.tokens(tokens)
            if finish is not None:
                st.out += st.finish(finish, st.generated)
                st.finishing = True
        except Exception:  # noqa: BLE001 - a bug in one stream must not stop the others
            log.exception("error while streaming a response")
            st.sub.cancel()
            self._end(st, gone=True)
            return
        self._flush(st)

    def _flush(self, st: Stream) -> None:
        while st.out:
            try:
                n = st.sock.send(st.out)
            except BlockingIOError:
                self._watch(st, selectors.EVENT_READ | selectors.EVENT_WRITE)
                return
            except OSError:  # reset, broken pipe: the client is gone
                st.sub.cancel()
                self._end(st, gone=True)
                return
            del st.out[:n]
            st.progress = time.monotonic()
        st.progress = time.monotonic()
        if st.finishing:
            self._end(st, gone=False)
        elif st.watching & selectors.EVENT_WRITE:
            self._watch(st, st.watching & ~selectors.EVENT_WRITE)

    def _check_client(self, st: Stream) -> None:
        """The socket is readable: the client closed its side (cancel), or sent its next request early."""
        try:
            data = st.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data == b"":
            st.sub.cancel()
            self._end(st, gone=True)
        else:  # pipelined bytes for the handler: stop watching reads (they would wake us in a loop)
            self._watch(st, st.watching & ~selectors.EVENT_READ)

    def _watch(self, st: Stream, events: int) -> None:
        if events == st.watching:
            return
        try:
            if st.watching and events:
                self._sel.modify(st.sock, events, st)
            elif events:
                self._sel.register(st.sock, events, st)
            else:
                self._sel.unregister(st.sock)
        except (KeyError, ValueError, OSError):  # a socket already closed: nothing left to watch
            if events:
                raise
        st.watching = events

    def _end(self, st: Stream, gone: bool) -> None:
        self._watch(st, 0)
        self._streams.discard(st)
        st.gone = gone
        st.ended.set()
