"""The serving loop: rank 0 decides each step, every rank of the model runs it.

Rank 0's HTTP threads `submit` requests (already rendered to token ids). Before each step the scheduler asks
the engine's planner (runtime/planner.py: waiting queue, rows, KV-cache blocks, prefix cache, chunked
prefill, preemption) for the next `Plan`, drops what cancelled clients left behind, and broadcasts the plan
to every rank. All ranks then run the same prefill and decode forward (`execute` over
`runtime.continuous.ContinuousBatcher`), and rank 0 hands each request its new tokens through the request's
own queue (`Submission.emit`). Handing over never blocks: a slow or vanished client only fills its own
queue, and a request whose client left is dropped at the next step. The other ranks just loop on plans
until the shutdown plan.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime import distributed
from runtime.continuous import ContinuousBatcher
from runtime.distributed import WorldLayout
from runtime.kvcache import BlockPool
from runtime.planner import Plan, Planner, Seq, execute, execute_prefill

log = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 1.0
"""How long an idle leader waits for work before it sends an empty plan: the other ranks wait inside a
collective, which must not run into the process group's timeout."""


class QueueFull(Exception):
    """More requests are waiting than serve.max_waiting allows."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


@dataclass
class Finish:
    """The last item of a request's queue: why it ended (`stop`, `tool_call`, `length`, or `error`)."""

    reason: str
    message: str = ""


@dataclass
class Submission:
    """One request as the scheduler sees it; `events` yields lists of new token ids, then a Finish."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    ignore_eos: bool = False
    """Stop tokens do not end this request (it runs to max_tokens)."""
    events: queue.Queue = field(default_factory=queue.Queue)
    cached_tokens: int = 0
    """Prompt tokens whose keys the prefix cache held (not computed)."""
    tokens: list[int] = field(default_factory=list)
    """The tokens generated so far."""
    finished: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    """Set when the Finish is in `events` (a request that waits for its whole answer waits on this)."""
    listener: Callable[[Submission], None] | None = None
    """Called (on the scheduler's thread; it must not block) after each item put in `events`: the HTTP
    layer's stream writer, which then writes every stream with news in one pass."""
    seq: Any = None
    """Its sequence in the planner (runtime.planner.Seq), made at submit."""
    _cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def generated(self) -> int:
        return len(self.tokens)

    def emit(self, item: list[int] | Finish) -> None:
        """Hand the client a list of new tokens or the Finish."""
        self.events.put(item)
        if isinstance(item, Finish):
            self.done.set()
        listener = self.listener
        if listener is not None:
            listener(self)

    def cancel(self) -> None:
        """The client is gone: the row is freed at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def follow(batcher: ContinuousBatcher, layout: WorldLayout) -> None:
    """The loop of every rank but 0: run the leader's plans until it says stop."""
    while True:
        plan: Plan = distributed.broadcast_object(None, layout)
        if plan.shutdown:
            return
        execute(plan, batcher)


@dataclass
class Counters:
    """What /health reports."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens reused from the prefix cache instead of computed."""
    steps: int = 0
    """Decode steps run (each gives every busy row one token)."""


@dataclass
class LoopTimes:
    """Where the serving loop's wall time went since the last report (serve.stats_seconds), in seconds."""

    start: float
    steps: int = 0
    generated: int = 0
    prompt: int = 0
    """Prompt tokens prefilled (cached ones not; a preempted request's again)."""
    idle: float = 0.0
    """Waiting for requests, nothing to run."""
    prefill: float = 0.0
    """The plans' prefills (each ends in a sync: their first tokens)."""
    gpu_wait: float = 0.0
    """Waiting for a launched decode step's tokens: GPU time the host did not overlap."""
    writer: float = 0.0
    """The stream writer's busy time (its thread, beside the loop's)."""

    def line(self, now: float, running: int, waiting: int, kv_used: float) -> str:
        wall, n = now - self.start, max(self.steps, 1)
        host = wall - self.idle - self.prefill - self.gpu_wait
        return (f"last {wall:.1f} s: {self.steps} decode steps, {1e3 * (wall - self.idle - self.prefill) / n:.2f} ms "
                f"a step (GPU wait {1e3 * self.gpu_wait / n:.2f}, host {1e3 * host / n:.2f}), prefill "
                f"{self.prefill / wall:.0%} of the time, idle {self.idle / wall:.0%}; {self.generated / wall:.0f} "
                f"generated and {self.prompt / wall:.0f} prompt tok/s; {running} running, {waiting} waiting, KV "
                f"cache {kv_used:.0%} used; stream writer busy {self.writer / wall:.0%}")


class Scheduler:
    """Rank 0's side: the planner fed from the HTTP threads, and the loop that plans and runs every step."""

    def __init__(self, batcher: ContinuousBatcher, layout: WorldLayout, stop_ids: set[int], call_id: int,
                 max_waiting: int, should_stop: Callable[[], bool], prefix_cache: bool = True,
                 stats_seconds: float = 0.0, writer_busy: Callable[[], float] | None = None,
                 async_steps: bool = False) -> None:
        """stats_seconds: log a LoopTimes line that often while there is work (0: never); writer_busy: the
        stream writer's busy seconds so far (StreamWriter.busy_seconds), for that line; async_steps: launch each
        decode step before reading the last one's tokens (generation.async_scheduling)."""
        self.batcher, self.layout = batcher, layout
        self.stop_ids, self.call_id = stop_ids, call_id
        self.max_waiting = max_waiting
        self.should_stop = should_stop
        self.planner = Planner(batcher.rows, BlockPool(batcher.num_blocks, prefix_cache), batcher.max_blocks,
                               batcher.max_prefill_tokens, batcher.window)
        self.counters = Counters()
        self.stats_seconds = stats_seconds
        self.async_steps = async_steps
        self._writer_busy = writer_busy or (lambda: 0.0)
        self.times = LoopTimes(time.perf_counter())
        self._writer_at = self._writer_busy()
        self.stopping = False
        self._lock = threading.Condition()
        self._outbox: list[tuple[Submission, list[int] | Finish]] = []
        """What the last step gave the requests, handed to them (`_hand_out`) while the GPU runs the next step."""

    # ------------------------------------------------------------------------------ HTTP threads

    def submit(self, sub: Submission) -> None:
        with self._lock:
            if self.stopping:
                raise ShuttingDown()
            if self._queued() >= self.max_waiting:  # requests whose client left do not count
                self._drop_cancelled()
            if self._queued() >= self.max_waiting:
                raise QueueFull()
            sub.seq = Seq(sub.prompt, sub.max_tokens, sub.temperature, sub.top_p, payload=sub, tokens=sub.tokens)
            self.planner.add(sub.seq)
            self.counters.requests += 1
            self._lock.notify()

    def _queued(self) -> int:
        """Requests waiting for their first admission (preempted ones, which wait again, do not count)."""
        return sum(not s.preemptions for s in self.planner.waiting)

    def stats(self) -> dict[str, int]:
        with self._lock:
            pl = self.planner
            return {"rows_busy": len(pl.running), "rows": len(pl.rows), "waiting": len(pl.waiting),
                    "kv_blocks": pl.pool.num_blocks, "kv_blocks_free": pl.pool.available,  # (free or cached)
                    "preemptions": pl.preemptions, **self.counters.__dict__}

    # ------------------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Plan, broadcast, execute, hand out tokens; until a stop is requested (then every rank stops).

        A step's tokens are booked at once (stops, lengths, freed rows: the next plan needs them) but reach
        their requests' queues while the GPU runs the next step, so the per-token handing over (queues, the
        stream writer's wake-up) does not leave the GPU idle between steps. With async_steps the next step is
        even planned and launched before this one's tokens are read (see runtime/planner.py): the host's
        planning and booking then overlap the GPU's step too."""
        pending = None  # async_steps: the launched step whose tokens are read after the next one is launched
        try:
            while True:
                plan = self._plan()
                distributed.broadcast_object(plan, self.layout)
                if plan.shutdown:
                    if pending is not None:
                        self._land(*pending)
                    return
                if plan.admit:
                    self._hand_out()  # before a prefill, whose sync would hold them back
                t0 = time.perf_counter()
                first = execute_prefill(plan, self.batcher)
                t1 = time.perf_counter()
                failed = self.batcher.take_failed()  # a first token's draw that failed: its request ends with an error
                if first:  # a whole prompt's first token, booked before its row's first step is launched
                    with self._lock:
                        for a, token in zip([a for a in plan.admit if a.end is None], first):
                            seq = self.planner.rows[a.row]
                            if seq is not None and a.row in failed:
                                self._fail(seq, a.row, failed[a.row])
                            elif seq is not None:
                                self._deliver(seq, token)
                step = self.batcher.step() if plan.decode else None  # launched; read below
                launched = None
                if step is not None:
                    with self._lock:
                        launched = (step, self.planner.launch(), self.batcher.take_failed())
                if self.async_steps:  # the last step's tokens (done or nearly), handed out while this one runs
                    ready, pending = pending, launched
                    if ready is not None:
                        self._land(*ready)
                    self._hand_out()
                else:  # the last step's booked tokens go out while this one runs, then its own are read
                    self._hand_out()
                    if launched is not None:
                        self._land(*launched)
                self.times.prefill += t1 - t0 if plan.admit else 0.0
                self._report()
        finally:
            self._hand_out()
            self._fail_all("the server is shutting down")

    def _land(self, step: Any, launched: list[tuple[int, Seq, int]], failed: dict[int, str]) -> None:
        """Read a launched step's tokens and book them for the sequences it ran (Planner.land: not for one that
        has left its row since); a row whose draw failed ends its request with an error instead."""
        t0 = time.perf_counter()
        tokens = step.tolist()
        self.times.gpu_wait += time.perf_counter() - t0
        with self._lock:
            self.counters.steps += 1
            self.times.steps += 1
            generated = self.counters.generated_tokens
            for row, seq, epoch in launched:
                if row in failed and seq.epoch == epoch and not seq.payload.finished:
                    self._fail(seq, row, failed[row])  # (its row left: its token is then not its own)
            for seq, token in self.planner.land(launched, tokens):
                self._deliver(seq, token)
            self.times.generated += self.counters.generated_tokens - generated

    def _report(self) -> None:
        """Every stats_seconds with work done: log where the time went (LoopTimes) and start again."""
        now = time.perf_counter()
        if not self.stats_seconds or now - self.times.start < self.stats_seconds:
            return
        busy = self._writer_busy()
        self.times.writer, self._writer_at = busy - self._writer_at, busy
        if self.times.steps or self.times.prompt:
            with self._lock:
                pl = self.planner
                used = 1 - pl.pool.available / max(pl.pool.num_blocks, 1)
                running, waiting = len(pl.running), len(pl.waiting)
            log.info(self.times.line(now, running, waiting, used))
        self.times = LoopTimes(now)

    def _hand_out(self) -> None:
        """Give the requests what the last steps booked for them (in order)."""
        out, self._outbox = self._outbox, []
        for sub, item in out:
            sub.emit(item)

    def _plan(self) -> Plan:
        """The next step (the planner's, after dropping requests whose client left). Waits (sending empty plans
        now and then) while there is nothing to do."""
        deadline = time.monotonic() + IDLE_WAIT_SECONDS
        with self._lock:
            while True:
                if self.should_stop():
                    self.stopping = True
                    return Plan(shutdown=True)
                for seq in list(self.planner.running):
                    if seq.payload.cancelled:
                        self._end(seq, cancelled=True)
                self._drop_cancelled()
                before = self.planner.cached_tokens, self.planner.prompt_tokens
                plan = self.planner.plan()
                self.counters.cached_tokens += self.planner.cached_tokens - before[0]
                self.counters.prompt_tokens += self.planner.prompt_tokens - before[1]
                self.times.prompt += sum(a.computed for a in plan.admit)
                for a in plan.admit:
                    sub = self.planner.rows[a.row].payload
                    sub.cached_tokens = self.planner.rows[a.row].cached_tokens
                if plan.release or plan.admit or plan.decode or time.monotonic() >= deadline:
                    return plan
                self._hand_out()  # nothing runs next: the last step's tokens go now
                t0 = time.perf_counter()
                self._lock.wait(timeout=max(0.0, deadline - time.monotonic()))
                self.times.idle += time.perf_counter() - t0

    def _drop_cancelled(self) -> None:
        waiting = self.planner.waiting
        left = [s for s in waiting if s.payload.cancelled]
        if left:
            self.counters.cancelled += len(left)
            for seq in left:
                waiting.remove(seq)
                seq.payload.finished = True

    def _end(self, seq: Seq, cancelled: bool = False) -> None:
        """A running request ends (finished, failed, or `cancelled` by its client): its row and blocks are
        freed."""
        sub = seq.payload
        if cancelled:
            self.counters.cancelled += 1
        sub.finished = True
        self.planner.finish(seq)

    def _deliver(self, seq: Seq, token: int) -> None:
        """Book a running sequence's new token: its request's queue gets it, and the Finish if it ended."""
        sub = seq.payload
        sub.tokens.append(token)  # (the sequence's own list)
        self.counters.generated_tokens += 1
        reason = None
        if token in self.stop_ids and not sub.ignore_eos:
            reason = "tool_call" if token == self.call_id else "stop"
        elif sub.generated >= sub.max_tokens:
            reason = "length"
        self._outbox.append((sub, [token]))
        if reason is not None:
            self.counters.completed += 1
            self._end(seq)  # (before the Finish wakes the client's thread, which may cancel on its way out)
            self._outbox.append((sub, Finish(reason)))
        elif sub.cancelled:
            self._end(seq, cancelled=True)

    def _fail(self, seq: Seq, row: int, message: str) -> None:
        """End one request with an error (its row is freed at the next plan); the rest of the batch goes on."""
        log.warning("request in row %d failed: %s", row, message)
        self._end(seq)
        self._outbox.append((seq.payload, Finish("error", message)))  # after the tokens it was given

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self.stopping = True
            subs = [s.payload for s in [*self.planner.running, *self.planner.waiting]]
            self.planner.waiting.clear()
            for seq in list(self.planner.running):
                self.planner.finish(seq)
        for sub in subs:
            if not sub.finished:
                sub.finished = True
                sub.emit(Finish("error", message))
