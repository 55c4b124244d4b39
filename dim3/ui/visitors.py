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
- ``visitor_address``: behind ``$DIM3_PROXY_HOPS`` reverse proxies (1 on a Hugging Face Space,
  where ``$SPACE_ID`` is set; 0 elsewhere), the address the outermost of them saw, taken from
  the right of ``X-Forwarded-For``, where each proxy appends the address it saw, so that
  addresses a client writes into the header itself (on the left) change nothing.

This module knows Gradio's queue (``Blocks._queue``: its ``push``, the waiting events per
concurrency id and the running ones, each with its request); it decides nothing about which
event runs next. Visitors behind one address (an office, a classroom) share its limit: raise
``$DIM3_MAX_QUEUED`` for a showcase to such a room.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

log = logging.getLogger("dim3.ui")

ENV_MAX_QUEUED = "DIM3_MAX_QUEUED"
ENV_MAX_QUEUE = "DIM3_MAX_QUEUE"
ENV_PROXY_HOPS = "DIM3_PROXY_HOPS"
DEFAULT_MAX_QUEUED = 16  # a visitor's tab has at most a few events at once (a chat turn, a job)
DEFAULT_MAX_QUEUE = 128  # all visitors' waiting events: ~128 MiB of requests at $DIM3_MAX_REQUEST


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
    or where the header has fewer entries than that, the connection's own address ``peer``."""
    if hops:
        forwarded = ",".join(headers.getlist("x-forwarded-for")) if headers is not None else ""
        entries = [e.strip() for e in forwarded.split(",") if e.strip()]
        if len(entries) >= hops:
            return entries[-hops]
    return peer or "unknown"


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
    def install(cls, blocks: Any) -> FairQueue:
        """Put the limit from the environment on ``blocks``' queue (after ``blocks.queue()``)."""
        fair = cls(blocks._queue, max_queued(), proxy_hops())
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

    def holding(self) -> Counter[str]:
        """Visitor -> the events of theirs waiting or running now."""
        events = [e for q in self.queue.event_queue_per_concurrency_id.values() for e in q.queue]
        events += [e for job in self.queue.active_jobs if job for e in job]
        held = Counter(self.visitor(e.request, e.username) for e in events)
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
            self.take_turns(event.concurrency_id)
        return result

    def take_turns(self, concurrency_id: str) -> None:
        """Put the waiting events of one line in turn order (see the class). Runs on the event
        loop without awaiting, so no other step of the queue sees the line half-sorted."""
        line = self.queue.event_queue_per_concurrency_id.get(concurrency_id)
        if line is None or len(line.queue) < 2:
            return
        running = [e for job in self.queue.active_jobs if job for e in job]
        turn = Counter(
            self.visitor(e.request, e.username)
            for e in running
            if e.concurrency_id == concurrency_id
        )
        keyed = []
        for i, e in enumerate(line.queue):
            who = self.visitor(e.request, e.username)
            keyed.append((turn[who], i, e))
            turn[who] += 1
        line.queue[:] = [e for *_, e in sorted(keyed, key=lambda k: k[:2])]
