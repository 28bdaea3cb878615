"""Side reactions to run events (Slack, paging): run in the background, never stop a runbook."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from crashcart.secrets import mask

log = logging.getLogger("crashcart.hooks")


@dataclass(frozen=True)
class Event:
    """Something that happened in a run, for hooks to announce."""

    kind: str                       # run_started, run_finished, contained, containment_failed, restore_test, ...
    run_id: str
    runbook: str
    status: str = ""
    summary: str = ""
    hosts: tuple[str, ...] = ()
    incident: str | None = None
    data: dict = field(default_factory=dict)


Handler = Callable[[Event], None]


class _Lane:
    """Daemon worker threads taking calls from one FIFO queue; idle workers exit after a while.

    Not concurrent.futures' pool: its workers are joined at interpreter exit, so a hook stuck on a
    hung Slack would hold the process (and the responder's terminal) until it gave up.
    """

    IDLE_SECONDS = 30.0

    def __init__(self, size: int, prefix: str) -> None:
        self._size = size
        self._prefix = prefix
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._threads = 0
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable, *args) -> cf.Future:
        future: cf.Future = cf.Future()
        with self._cv:
            self._queue.append((future, fn, args))
            if self._idle == 0 and self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"{self._prefix}-{self._threads}", daemon=True).start()
            self._cv.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._cv:
                self._idle += 1
                while not self._queue:
                    if self._closed or not self._cv.wait(timeout=self.IDLE_SECONDS):
                        if not self._queue:
                            self._idle -= 1
                            self._threads -= 1
                            return
                self._idle -= 1
                future, fn, args = self._queue.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(e)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()


# Hooks with deliveries in flight, so that a process can wait for all of them once (drain_all).
_busy: set["Hooks"] = set()
_busy_lock = threading.Lock()


class Hooks:
    """Calls every handler for every event on background (daemon) threads.

    A handler that raises or hangs is recorded (through `on_failure`) and never delays the caller;
    `drain()` (this run) or `drain_all()` (the process) waits a bounded time for deliveries in flight.
    An `ordered` handler sees one event at a time, in the order they were emitted (a Slack thread
    needs its first message before the replies).
    """

    def __init__(self, on_failure: Callable[[str, Event, str], None] | None = None) -> None:
        self._handlers: list[tuple[str, Handler, bool, frozenset[str] | None, Handler | None]] = []
        self._shared = _Lane(4, "crashcart-hook")
        self._lanes: dict[str, _Lane] = {}
        self._pending: set[cf.Future] = set()
        self._lock = threading.Lock()
        self._on_failure = on_failure

    def register(self, name: str, handler: Handler, *, ordered: bool = False,
                 kinds: frozenset[str] | set[str] | None = None, on_queued: Handler | None = None) -> None:
        """Add a handler; an ordered one gets its own worker and sees events in emission order.

        `kinds` limits it to those event kinds (the others never queue behind a slow delivery).
        `on_queued(event)` runs in the emitting thread as the event is queued: in-memory bookkeeping
        only (e.g. knowing, at exit, which events never reached the handler); its errors are ignored.
        """
        self._handlers.append((name, handler, ordered, frozenset(kinds) if kinds is not None else None, on_queued))
        if ordered:
            self._lanes[name] = _Lane(1, f"crashcart-hook-{name}")

    def emit(self, event: Event) -> None:
        """Hand the event to every handler and return at once."""
        for name, handler, ordered, kinds, on_queued in self._handlers:
            if kinds is not None and event.kind not in kinds:
                continue
            if on_queued is not None:
                try:
                    on_queued(event)
                except Exception:  # bookkeeping must never cost the run anything
                    log.exception("hook %s: on_queued failed for %s", name, event.kind)
            lane = self._lanes[name] if ordered else self._shared
            with self._lock:
                future = lane.submit(self._call, name, handler, event)
                self._pending.add(future)
            with _busy_lock:
                _busy.add(self)
            future.add_done_callback(self._done)

    def _done(self, future: cf.Future) -> None:
        with self._lock:
            self._pending.discard(future)
            idle = not self._pending
        if idle:
            with _busy_lock:
                with self._lock:
                    if not self._pending:
                        _busy.discard(self)

    def _call(self, name: str, handler: Handler, event: Event) -> None:
        try:
            handler(event)
        except Exception as e:  # a hook must never break the run: record and go on
            reason = mask(f"{type(e).__name__}: {e}")
            log.warning("hook %s failed for %s: %s", name, event.kind, reason)
            if self._on_failure:
                try:
                    self._on_failure(name, event, reason)
                except Exception:
                    log.exception("recording the failure of hook %s failed", name)

    def pending(self) -> list[cf.Future]:
        """Deliveries not finished yet."""
        with self._lock:
            return list(self._pending)

    def drain(self, timeout: float = 5.0) -> int:
        """Wait up to `timeout` seconds for deliveries in flight; return how many are still pending."""
        pending = self.pending()
        if pending:
            cf.wait(pending, timeout=timeout)
        return len(self.pending())

    def close(self) -> None:
        """Let the workers exit once their queues are empty (deliveries in flight still finish)."""
        self._shared.close()
        for lane in self._lanes.values():
            lane.close()


def drain_all(timeout: float = 10.0) -> int:
    """Wait up to `timeout` seconds in all for every run's hook deliveries in this process.

    The CLI calls this after printing a result, so the result never waits for Slack. Returns how
    many deliveries are still in flight (the hooks record what happens to those at exit).
    """
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        with _busy_lock:
            busy = list(_busy)
        pending = [f for hooks in busy for f in hooks.pending()]
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            return len(pending)
        # Loop: a handler may finish one delivery and have another queued behind it.
        cf.wait(pending, timeout=left, return_when=cf.FIRST_COMPLETED)
