"""The serving loop: rank 0 decides each step, every rank of the model runs it.

Rank 0's HTTP threads `submit` requests (already rendered to token ids). Between steps the scheduler
frees the rows of finished or abandoned requests, gives free rows to waiting requests, and broadcasts
that as a `Plan` to every rank. A freed row keeps its keys: the scheduler remembers which tokens they
are, and gives a new request the lowest free row (the decode step runs up to the highest busy row; every
row shares the harmony system message with it) or, when one holds a much longer prefix of its prompt (a
whole conversation when a chat comes back with its next turn), that row, whose prefill then computes only
the rest (the prefix cache; `cached_tokens` in the usage). At most
batcher.max_prefill_tokens prompt tokens go in per step: a longer prompt is prefilled in pieces over
several steps while the other rows keep decoding (chunked prefill). All ranks then run the same prefill
and decode forward (`runtime.continuous.ContinuousBatcher`), and rank 0 hands each request its new
tokens through the request's own queue (`Submission.emit`). Handing over never blocks: a slow or vanished client only fills its own queue, and
a request whose client left is dropped at the next step. The other ranks just loop on plans until the
shutdown plan.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runtime import distributed
from runtime.continuous import ContinuousBatcher, common_prefix, pick_row
from runtime.distributed import WorldLayout

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
    """Prompt tokens whose keys its row already held (not computed)."""
    tokens: list[int] = field(default_factory=list)
    """The tokens generated so far."""
    finished: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    """Set when the Finish is in `events` (a request that waits for its whole answer waits on this)."""
    listener: Callable[[Submission], None] | None = None
    """Called (on the scheduler's thread; it must not block) after each item put in `events`: the HTTP
    layer's stream writer, which then writes every stream with news in one pass."""
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


@dataclass
class Admit:
    """A request joining the batch: its row, prompt ids and sampling parameters."""

    row: int
    prompt: list[int]
    temperature: float
    top_p: float
    cached: int = 0
    """The prompt's first tokens whose keys the row still holds (from its previous sequence, or the earlier
    chunks of this prompt)."""
    end: int | None = None
    """Chunked prefill: compute the prompt up to here only (None: to its end, then decode)."""

    @property
    def computed(self) -> int:
        """Prompt tokens this step computes."""
        return (len(self.prompt) if self.end is None else self.end) - self.cached


@dataclass
class Plan:
    """One step for every rank: free rows, prefill new requests, decode the batch (or stop)."""

    release: list[int] = field(default_factory=list)
    admit: list[Admit] = field(default_factory=list)
    decode: bool = False
    shutdown: bool = False


def execute(plan: Plan, batcher: ContinuousBatcher) -> tuple[list[int] | None, list[int] | None]:
    """Run a plan on this rank; (first tokens of the admitted requests, one token per row), as host lists
    on the leader (None elsewhere, where nothing waits for them)."""
    batcher.release(plan.release)
    first = step = None
    part = [a for a in plan.admit if a.end is not None]
    if part:  # chunks of longer prompts: keys stored, nothing sampled, the rows wait for their next chunk
        batcher.prefill([a.row for a in part], [a.prompt[: a.end] for a in part], [a.temperature for a in part],
                        [a.top_p for a in part], [a.cached for a in part], partial=True)
    whole = [a for a in plan.admit if a.end is None]
    if whole:
        out = batcher.prefill([a.row for a in whole], [a.prompt for a in whole], [a.temperature for a in whole],
                              [a.top_p for a in whole], [a.cached for a in whole])
        first = out.tolist() if batcher.leader else None
    if plan.decode:
        out = batcher.step()
        step = out.tolist() if batcher.leader else None
    return first, step


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


class Scheduler:
    """Rank 0's side: the waiting queue, the rows, and the loop that plans and runs every step."""

    def __init__(self, batcher: ContinuousBatcher, layout: WorldLayout, stop_ids: set[int], call_id: int,
                 max_waiting: int, should_stop: Callable[[], bool], prefix_cache: bool = True) -> None:
        self.batcher, self.layout = batcher, layout
        self.stop_ids, self.call_id = stop_ids, call_id
        self.max_waiting = max_waiting
        self.should_stop = should_stop
        self.rows: list[Submission | None] = [None] * batcher.rows
        self.prefix_cache = prefix_cache
        self.held: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * batcher.rows
        """Per row: the tokens whose keys its cache slots [0, n) hold (the leader's record)."""
        self.waiting: deque[Submission] = deque()
        self.filling: dict[int, int] = {}
        """Rows part-way through their prompt (chunked prefill): the prompt tokens in so far. At most
        batcher.max_prefill_tokens prompt tokens are computed per step, continuing rows first."""
        self.counters = Counters()
        self.stopping = False
        self._lock = threading.Condition()

    # ------------------------------------------------------------------------------ HTTP threads

    def submit(self, sub: Submission) -> None:
        with self._lock:
            if self.stopping:
                raise ShuttingDown()
            if len(self.waiting) >= self.max_waiting:  # requests whose client left do not count
                left = sum(w.cancelled for w in self.waiting)
                self.waiting = deque(w for w in self.waiting if not w.cancelled)
                self.counters.cancelled += left
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull()
            self.waiting.append(sub)
            self.counters.requests += 1
            self._lock.notify()

    def stats(self) -> dict[str, int]:
        with self._lock:
            busy = sum(r is not None for r in self.rows)
            return {"rows_busy": busy, "rows": len(self.rows), "waiting": len(self.waiting),
                    **self.counters.__dict__}

    # ------------------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Plan, broadcast, execute, hand out tokens; until a stop is requested (then every rank stops)."""
        try:
            while True:
                plan = self._plan()
                distributed.broadcast_object(plan, self.layout)
                if plan.shutdown:
                    return
                first, step = execute(plan, self.batcher)
                for r, why in self.batcher.take_failed().items():
                    self._fail(r, why)  # that request ends with an error; everyone else goes on
                if first is not None:
                    for a, token in zip([a for a in plan.admit if a.end is None], first):
                        self._deliver(a.row, token)
                if step is not None:
                    self.counters.steps += 1
                    for r, token in enumerate(step):
                        self._deliver(r, token)
        finally:
            self._fail_all("the server is shutting down")

    def _plan(self) -> Plan:
        """The next step: free rows of finished/abandoned requests, admit waiting ones into free rows.
        Waits (sending empty plans now and then) while there is nothing to do."""
        deadline = time.monotonic() + IDLE_WAIT_SECONDS
        with self._lock:
            while True:
                plan = Plan()
                if self.should_stop():
                    self.stopping = True
                    plan.shutdown = True
                    return plan
                for r, sub in enumerate(self.rows):
                    if sub is not None and (sub.finished or sub.cancelled):
                        if sub.cancelled and not sub.finished:
                            self.counters.cancelled += 1
                            sub.finished = True
                        self.rows[r] = None
                        part = self.filling.pop(r, None)
                        plan.release.append(r)
                        # fed so far: the prompt and every token but the last one drawn (or, for a prompt
                        # that ended part-way through its prefill, the chunks that went in)
                        fed = (sub.prompt[:part] if part is not None else sub.prompt + sub.tokens[:-1]) \
                            if self.prefix_cache else []
                        self.held[r] = np.asarray(fed, dtype=np.int64)
                budget = self.batcher.max_prefill_tokens
                for r, done in list(self.filling.items()):  # prompts part-way in go on first
                    if budget <= 0:
                        break
                    sub = self.rows[r]
                    assert sub is not None
                    plan.admit.append(self._chunk(r, sub, done, budget))
                    budget -= plan.admit[-1].computed
                free = [r for r, sub in enumerate(self.rows) if sub is None]
                while free and self.waiting and budget > 0:
                    sub = self.waiting.popleft()
                    if sub.cancelled:
                        self.counters.cancelled += 1
                        continue
                    r, cached = self._best_row(free, sub.prompt)
                    free.remove(r)
                    self.rows[r] = sub
                    self.held[r] = np.asarray(sub.prompt, dtype=np.int64)
                    sub.cached_tokens = cached
                    self.counters.prompt_tokens += len(sub.prompt)
                    self.counters.cached_tokens += cached
                    plan.admit.append(self._chunk(r, sub, cached, budget))
                    budget -= plan.admit[-1].computed
                plan.decode = any(sub is not None and r not in self.filling for r, sub in enumerate(self.rows))
                if plan.release or plan.admit or plan.decode or time.monotonic() >= deadline:
                    return plan
                self._lock.wait(timeout=max(0.0, deadline - time.monotonic()))

    def _chunk(self, row: int, sub: Submission, done: int, budget: int) -> Admit:
        """The next piece of `sub`'s prompt for `row` (its first `done` tokens are in): up to `budget` tokens,
        the rest of the prompt if it fits (then the request decodes from this step on)."""
        end = min(len(sub.prompt), done + budget)
        if end < len(sub.prompt):
            self.filling[row] = end
            return Admit(row, sub.prompt, sub.temperature, sub.top_p, done, end)
        self.filling.pop(row, None)
        return Admit(row, sub.prompt, sub.temperature, sub.top_p, done)

    def _best_row(self, free: list[int], prompt: list[int]) -> tuple[int, int]:
        """The free row for `prompt` and how many of its first tokens that row's cache holds (capped to leave
        the last token to compute: its logits give the first new token): the lowest free row, unless another
        holds enough more of the prompt for the larger decode step it may cause (a conversation's own row when
        it comes back): see `pick_row`."""
        if not self.prefix_cache:
            return min(free), 0
        want = np.asarray(prompt, dtype=np.int64)
        common = [common_prefix(self.held[r], want, min(len(self.held[r]), len(want) - 1)) for r in free]
        busy = [r for r, sub in enumerate(self.rows) if sub is not None]
        return pick_row(free, common, max(busy) + 1 if busy else 0, self.batcher.buckets)

    def _deliver(self, row: int, token: int) -> None:
        sub = self.rows[row]
        if sub is None or sub.finished or row in self.filling:
            return  # a free row, a request that ended earlier in this step, or one still prefilling
        sub.tokens.append(token)
        self.counters.generated_tokens += 1
        reason = None
        if token in self.stop_ids and not sub.ignore_eos:
            reason = "tool_call" if token == self.call_id else "stop"
        elif sub.generated >= sub.max_tokens:
            reason = "length"
        sub.emit([token])
        if reason is not None or sub.cancelled:
            sub.finished = True
            if reason is not None:
                self.counters.completed += 1
                sub.emit(Finish(reason))
            else:
                self.counters.cancelled += 1

    def _fail(self, row: int, message: str) -> None:
        """End one request with an error (its row is freed at the next step)."""
        sub = self.rows[row]
        if sub is not None and not sub.finished:
            sub.finished = True
            log.warning("request in row %d failed: %s", row, message)
            sub.emit(Finish("error", message))

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self.stopping = True
            subs = [s for s in self.rows if s is not None] + list(self.waiting)
            self.waiting.clear()
            self.rows = [None] * len(self.rows)
        for sub in subs:
            if not sub.finished:
                sub.finished = True
                sub.emit(Finish("error", message))
