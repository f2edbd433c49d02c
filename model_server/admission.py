"""Admission of the predictor's requests: slots, tickets, deadlines and cancellation.

A request runs within one :class:`Ticket` (its deadline, and whether its client has gone) and
decodes, segments and encodes within one of the predictor's ``max_concurrency`` slots
(:class:`Slots`). The REST route and the gRPC servicer set the ticket (:data:`current_ticket`);
:meth:`Slots.scope` gives back, when the request ends, the slot that :meth:`Slots.acquire` took
for it, whichever stage ends it. Work runs in worker threads (:func:`in_thread`) that stop at
their next :meth:`Ticket.check` once the ticket is abandoned; a request waiting for a slot stops
waiting when its ticket is abandoned or its deadline passes (:class:`RequestAbandoned`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = [
    "RequestAbandoned",
    "Slots",
    "Ticket",
    "current_ticket",
    "in_thread",
    "request_ticket",
    "ticket_scope",
]

_T = TypeVar("_T")


class RequestAbandoned(Exception):
    """The request's client has gone or its deadline has passed; its work was stopped."""

    def __init__(self, reason: str, deadline: bool):
        super().__init__(reason)
        self.reason = reason
        self.deadline = deadline


class Ticket:
    """One request's right to go on: cancelled when its client goes or its deadline passes.

    Safe to check from worker threads (:meth:`check` raises :class:`RequestAbandoned`).
    """

    def __init__(self, timeout_s: float):
        self.deadline = time.monotonic() + timeout_s
        self.reason: str | None = None
        self._flag = threading.Event()
        self._event: asyncio.Event | None = None

    def abandon(self, reason: str) -> None:
        """Mark the request abandoned (call on the event loop)."""
        if self.reason is None:
            self.reason = reason
        self._flag.set()
        if self._event is not None:
            self._event.set()

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise :class:`RequestAbandoned` if the request should stop."""
        if self._flag.is_set():
            raise RequestAbandoned(self.reason or "abandoned", deadline=False)
        if self.remaining() <= 0:
            raise RequestAbandoned("the request's deadline passed", deadline=True)

    async def wait(self) -> None:
        """Return once the request is abandoned."""
        if self._event is None:
            self._event = asyncio.Event()
            if self._flag.is_set():
                self._event.set()
        await self._event.wait()


#: The ticket of the request being served (set by the REST route and the gRPC servicer).
current_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "medseg_ticket", default=None
)


def request_ticket() -> Ticket:
    """The ticket of the request being served (within :func:`ticket_scope`)."""
    ticket = current_ticket.get()
    assert ticket is not None, "set by ticket_scope (MedsegPredictor.__call__)"
    return ticket


@contextlib.contextmanager
def ticket_scope(timeout_s: float) -> Iterator[Ticket]:
    """The request's ticket: the one its route set, else a new one of ``timeout_s``."""
    ticket = current_ticket.get()
    if ticket is not None:
        yield ticket
        return
    ticket = Ticket(timeout_s)
    token = current_ticket.set(ticket)
    try:
        yield ticket
    finally:
        current_ticket.reset(token)


class _Slot:
    """Whether the request being served holds one of the slots."""

    held = False


_current_slot: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar(
    "medseg_slot", default=None
)


class Slots:
    """The ``size`` slots within which cases are decoded, segmented and encoded.

    Args:
        size: How many requests may hold a slot at once (``max_concurrency``).
    """

    def __init__(self, size: int):
        self.size = size
        self._semaphore: asyncio.Semaphore | None = None  # made on the serving loop

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """One request: a slot that :meth:`acquire` takes within it is given back at its end."""
        slot = _Slot()
        token = _current_slot.set(slot)
        try:
            yield
        finally:
            _current_slot.reset(token)
            if slot.held and self._semaphore is not None:
                self._semaphore.release()

    async def acquire(self, ticket: Ticket) -> None:
        """This request's slot (given back by :meth:`scope`), unless it is abandoned first.

        Raises:
            RequestAbandoned: When the ticket is abandoned or its deadline passes first.
            RuntimeError: Outside :meth:`scope`.
        """
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.size)
        slot = _current_slot.get()
        if slot is None:
            raise RuntimeError("MedsegPredictor stages run only through the model's __call__")
        ticket.check()
        waiting = asyncio.ensure_future(self._semaphore.acquire())
        gone = asyncio.ensure_future(ticket.wait())
        try:
            await asyncio.wait(
                {waiting, gone},
                timeout=max(0.0, ticket.remaining()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
            if not waiting.done():
                waiting.cancel()
        if waiting.done() and not waiting.cancelled():
            slot.held = True  # from here on, scope() gives it back
            ticket.check()
            return
        ticket.check()
        raise RequestAbandoned("the request's deadline passed", deadline=True)


async def in_thread(ticket: Ticket, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a worker thread; a cancelled caller still waits for it to stop.

    The slot must stay held until the thread has finished: the ticket tells the thread to stop
    at its next check.
    """
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        ticket.abandon("the call was cancelled")
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                continue
            except Exception:  # the thread stopped at a check: the cancellation wins
                break
        raise
