"""Who a visitor is, and how much of the server's queue one visitor may hold.

Every event the app queues (a merge, a chat turn, an evaluation) waits in Gradio's queue for
its slot, and Gradio's queue takes any number of them, from anyone: a script posting to
``/gradio_api/queue/join`` (or ``/call/...``) a thousand times, each with its own session id,
would hold a thousand merges in line ahead of every other visitor, and the server would keep
each one's request (up to ``$DIM3_MAX_REQUEST``) until its turn. Here:

- ``FairQueue.install(blocks)``: before Gradio queues an event, it counts the events of the
  same visitor that are waiting or running; at ``$DIM3_MAX_QUEUED`` (16; 0: no limit) the
  request is refused (429) with a message that says so and what to do. Once queued, visitors
  take turns: a visitor's second waiting merge waits behind every other visitor's first. The
  session id is not the visitor (a client chooses it): the visitor is the signed-in user where
  Gradio's login is on, else the address the request came from (:func:`visitor_address`).
- ``max_queue()``: all visitors' waiting events together, at most ``$DIM3_MAX_QUEUE`` (128; 0:
  no limit), Gradio's own ``max_size`` (503, "busy").
- ``SessionShare``: the sessions Gradio keeps (one per session id a request names, ~0.25 MB
  each here), at most ``$DIM3_MAX_SESSIONS`` for all (2,000) and ``$DIM3_VISITOR_SESSIONS`` for
  one visitor (100), whose own least recently used goes when they make one more.
- ``visitor_address``: behind ``$DIM3_PROXY_HOPS`` reverse proxies (1 on a Hugging Face Space,
  where ``$SPACE_ID`` is set; 0 elsewhere), the address the outermost of them saw, taken from
  the right of ``X-Forwarded-For``, where each proxy appends the address it saw, so that
  addresses a client writes into the header itself (on the left) change nothing.

This module knows Gradio's queue (``Blocks._queue``: its ``push``, the waiting events per
concurrency id and the running ones, each with its request) and its session store
(``StateHolder``: its ordered ``session_data``, its lock, ``delete_state``). Visitors behind one address (an office, a classroom) share its limit: raise
``$DIM3_MAX_QUEUED`` for a showcase to such a room.
"""

from __future__ import annotations

import contextvars
import ipaddress
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dim3.ui")

ENV_MAX_QUEUED = "DIM3_MAX_QUEUED"
ENV_MAX_QUEUE = "DIM3_MAX_QUEUE"
ENV_PROXY_HOPS = "DIM3_PROXY_HOPS"
ENV_MAX_SESSIONS = "DIM3_MAX_SESSIONS"
ENV_VISITOR_SESSIONS = "DIM3_VISITOR_SESSIONS"
DEFAULT_MAX_SESSIONS = 2000  # Gradio keeps ~0.25 MB a session for this app's ~200 components
DEFAULT_VISITOR_SESSIONS = 100  # a page (re)load is one: a room of visitors behind one address
DEFAULT_MAX_QUEUED = 16  # a visitor's tab has at most a few events at once (a chat turn, a job)
DEFAULT_MAX_QUEUE = 128  # all visitors' waiting events: ~128 MiB of requests at $DIM3_MAX_REQUEST


# The visitor of the request being served (``RequestGuard`` sets it for every request; a task
# or thread started while serving it inherits it): whose a session made now is.
CURRENT_VISITOR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dim3_visitor", default=None
)


def _count_from_env(name: str, default: int, example: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${name}={raw!r} is not a whole number; use e.g. {example} (0: no limit)")
    return value or None


def max_queued() -> int | None:
    """``$DIM3_MAX_QUEUED``: the events one visitor may have waiting or running (16; None: no
    limit)."""
    return _count_from_env(ENV_MAX_QUEUED, DEFAULT_MAX_QUEUED, "16")


def max_queue() -> int | None:
    """``$DIM3_MAX_QUEUE``: the events all visitors may have waiting together (128; None: no
    limit, or unset on ZeroGPU hardware, where Gradio sets its own), for
    ``Blocks.queue(max_size=...)``."""
    if (
        not os.environ.get(ENV_MAX_QUEUE, "").strip()
        and os.environ.get("SPACES_ZERO_GPU") == "true"
    ):
        return None  # Gradio's default for ZeroGPU (one waiting event), as without this app
    return _count_from_env(ENV_MAX_QUEUE, DEFAULT_MAX_QUEUE, "128")


def max_sessions() -> int | None:
    """``$DIM3_MAX_SESSIONS``: the sessions Gradio keeps for all visitors together, least
    recently used dropped first (2,000; None: Gradio's own 10,000)."""
    return _count_from_env(ENV_MAX_SESSIONS, DEFAULT_MAX_SESSIONS, "2000")


def visitor_sessions() -> int | None:
    """``$DIM3_VISITOR_SESSIONS``: the sessions kept for one visitor; their least recently used
    goes when they make one more (100; None: no limit)."""
    return _count_from_env(ENV_VISITOR_SESSIONS, DEFAULT_VISITOR_SESSIONS, "100")


def proxy_hops() -> int:
    """``$DIM3_PROXY_HOPS``: the reverse proxies in front of the server whose
    ``X-Forwarded-For`` entries are trusted (1 on a Hugging Face Space, else 0)."""
    raw = os.environ.get(ENV_PROXY_HOPS, "").strip()
    if not raw:
        return 1 if os.environ.get("SPACE_ID") else 0
    try:
        hops = int(raw)
    except ValueError:
        hops = -1
    if not 0 <= hops <= 8:
        raise ValueError(
            f"${ENV_PROXY_HOPS}={raw!r} is not a number of proxies from 0 to 8; use 1 behind "
            "one reverse proxy that appends to X-Forwarded-For, 0 for none"
        )
    return hops


def visitor_address(headers: Any, peer: str | None, hops: int) -> str:
    """The address a request came from: with ``hops`` trusted proxies in front, the entry the
    outermost one appended to ``X-Forwarded-For`` (the ``hops``-th from the right); with none,
    or where the header has fewer entries than that, the connection's own address ``peer``.
    An IPv6 address stands for its /64 network (one home or host has all of it)."""
    address = peer or "unknown"
    if hops:
        forwarded = ",".join(headers.getlist("x-forwarded-for")) if headers is not None else ""
        entries = [e.strip() for e in forwarded.split(",") if e.strip()]
        if len(entries) >= hops:
            address = entries[-hops]
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class FairQueue:
    """Visitors take turns in a Gradio queue, and each holds at most ``limit`` events in it.

    Wraps the queue's ``push`` (the one step every route that queues an event goes through):

    - a visitor at the limit gets ``HTTPException(429)``, with the count and what to do, before
      the event is made. Events being pushed (``push`` awaits before it appends) count too, so a
      burst of simultaneous requests cannot pass the limit together;
    - once the event is in its line (one per concurrency id: the heavy jobs, the chats), the
      line is put in turn order: a visitor's n-th event there, counting theirs already running
      in it, waits behind every other visitor's events of lower n (stable, so first come first
      served among equals). Gradio serves a line from its front, so a newcomer waits for the
      jobs running and one of each other visitor's, not for all of one visitor's."""

    def __init__(self, queue: Any, limit: int | None, hops: int) -> None:
        self.queue, self.limit, self.hops = queue, limit, hops
        self._pushing: Counter[str] = Counter()

    @classmethod
    def install(cls, blocks: Any, sessions: SessionShare | None = None) -> FairQueue:
        """Put the limit from the environment on ``blocks``' queue (after ``blocks.queue()``);
        ``sessions`` then keeps a session that has an event here."""
        fair = cls(blocks._queue, max_queued(), proxy_hops())
        if sessions is not None:
            sessions.busy = fair.session_busy
        push = blocks._queue.push

        async def fair_push(body: Any, request: Any, username: str | None):
            return await fair.push(push, body, request, username)

        blocks._queue.push = fair_push
        return fair

    def visitor(self, request: Any, username: str | None) -> str:
        if username:
            return f"user {username}"
        client = getattr(request, "client", None)
        return visitor_address(
            getattr(request, "headers", None), getattr(client, "host", None), self.hops
        )

    def _running(self) -> list[Any]:
        return [e for job in self.queue.active_jobs if job for e in job]

    def _events(self) -> list[Any]:
        """Every event waiting (in any line) or running."""
        lines = self.queue.event_queue_per_concurrency_id.values()
        return [e for line in lines for e in line.queue] + self._running()

    def holding(self) -> Counter[str]:
        """Visitor -> the events of theirs waiting or running now."""
        held = Counter(self.visitor(e.request, e.username) for e in self._events())
        return held + self._pushing

    async def push(self, push: Any, body: Any, request: Any, username: str | None):
        who = self.visitor(request, username)
        if self.limit is not None:
            held = self.holding()[who]
            if held >= self.limit:
                from fastapi import HTTPException

                log.info("queue: a visitor at the limit (%d events) was refused one more", held)
                raise HTTPException(
                    status_code=429,
                    detail=(
                        f"You already have {held} request{'s' if held != 1 else ''} waiting or running "
                        "on this server, "
                        f"the most one visitor may have (${ENV_MAX_QUEUED}); wait for one to "
                        "finish, then try again."
                    ),
                    headers={"Retry-After": "10"},
                )
        self._pushing[who] += 1
        try:
            result = await push(body=body, request=request, username=username)
        finally:
            self._pushing[who] -= 1
            if not self._pushing[who]:
                del self._pushing[who]
        event = self.queue.event_ids_to_events.get(result[1]) if result[0] else None
        if event is not None:
            # its session made now, in this request (whose visitor is known), not when the
            # event runs in the queue's own task
            holder = getattr(self.queue.blocks, "state_holder", None)
            if holder is not None and event.session_hash not in holder:
                holder[event.session_hash]
            self.take_turns(event.concurrency_id)
        return result

    def session_busy(self, session: str) -> bool:
        """Whether an event of ``session`` is waiting or running."""
        return any(e.session_hash == session for e in self._events())

    def take_turns(self, concurrency_id: str) -> None:
        """Put the waiting events of one line in turn order (see the class). Runs on the event
        loop without awaiting, so no other step of the queue sees the line half-sorted."""
        line = self.queue.event_queue_per_concurrency_id.get(concurrency_id)
        if line is None or len(line.queue) < 2:
            return
        turn = Counter(
            self.visitor(e.request, e.username)
            for e in self._running()
            if e.concurrency_id == concurrency_id
        )
        keyed = []
        for i, e in enumerate(line.queue):
            who = self.visitor(e.request, e.username)
            keyed.append((turn[who], i, e))
            turn[who] += 1
        line.queue[:] = [e for *_, e in sorted(keyed, key=lambda k: k[:2])]


class SessionShare:
    """At most ``limit`` sessions kept per visitor in Gradio's session store.

    Gradio makes a session (its copy of every component's settings, and the values of the
    ``gr.State``\\ s: about 0.25 MB in this app) for every new session id a request names, by
    many routes (the queue's, ``/run/``, ``/api/``, ``/call/``, a heartbeat's end), a client
    picks the id, and the store keeps ``state_session_capacity`` of them, dropping the least
    recently used: one visitor naming new ids could fill the server's memory and push out every
    other visitor's conversation. Here the store itself is bounded (:meth:`bind`): whichever
    route makes a session, it is the visitor's of the request it is made in
    (:data:`CURRENT_VISITOR`, set by ``RequestGuard`` for every request), and when a visitor
    with ``limit`` sessions makes one more, the least recently used of theirs with no event
    waiting or running (``busy``) is dropped first: a visitor's flood only ever pushes out their
    own. ``on_drop(session)`` is told of every session dropped, the store's own capacity's
    included (the app's per-session records)."""

    def __init__(
        self, limit: int | None, hops: int, on_drop: Callable[[str], None] | None = None
    ) -> None:
        self.limit, self.hops, self.on_drop = limit, hops, on_drop
        self.busy: Callable[[str], bool] = lambda session: False
        self._owner: dict[str, str] = {}  # session -> visitor, for the sessions in the store
        self._lock = threading.Lock()

    def bind(self, holder: Any) -> None:
        """Bound ``holder`` (the app's ``StateHolder``); once per holder."""
        if getattr(holder, "_dim3_share", None) is self:
            return
        base = type(holder)

        class Bounded(base):  # type: ignore[misc, valid-type]
            def __getitem__(inner, session_id: str) -> Any:
                if session_id not in inner.session_data:
                    self._making(inner, session_id, CURRENT_VISITOR.get())
                return base.__getitem__(inner, session_id)

        holder._dim3_share = self
        holder.__class__ = Bounded

    def _making(self, holder: Any, session: str, visitor: str | None) -> None:
        """Before ``holder`` makes ``session`` for ``visitor``: drop what must go for it."""
        with self._lock:
            if visitor:
                self._owner[session] = visitor
            if len(self._owner) > 2 * holder.capacity:  # sessions the store let go of otherwise
                self._owner = {s: v for s, v in self._owner.items() if s in holder.session_data}
            mine = [s for s in holder.session_data if visitor and self._owner.get(s) == visitor]
        excess = len(mine) - self.limit + 1 if self.limit else 0
        drop = [s for s in mine if not self.busy(s)][: max(0, excess)]
        if len(holder.session_data) - len(drop) >= holder.capacity:  # the store drops its oldest
            drop += [s for s in list(holder.session_data)[:1] if s not in drop]
        for gone in drop:
            holder.delete_state(gone)
            with holder.lock:
                holder.session_data.pop(gone, None)
                holder.time_last_used.pop(gone, None)
            with self._lock:
                self._owner.pop(gone, None)
            if self.on_drop is not None:
                self.on_drop(gone)
        if drop:
            log.info("sessions: %d dropped to make room for a new one", len(drop))
