"""How much of the server's queue one visitor may hold: a real ``python app.py`` and real HTTP
requests, as ``gradio_client``, a browser, or a script would send them (``dim3.ui.visitors``).

The server's queue is held still by a ``sitecustomize`` hook in its process (events wait, or
stay running, while a file exists; it can write down the order they leave the line in), so
that what is waiting and running is known; the limit and the turns are the app's own code.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.datastructures import Headers

from dim3.ui.visitors import (
    max_queue,
    max_queued,
    max_sessions,
    proxy_hops,
    visitor_address,
    visitor_sessions,
)
from tests.app_server import ROOT, running_app

HOLD_HOOK = """
import asyncio, os
import gradio.queueing as _q
_process = _q.Queue.process_events
async def _held(self, events, *args, **kwargs):
    if os.environ.get("DIM3_TEST_ORDER"):  # the order events leave the line in
        with open(os.environ["DIM3_TEST_ORDER"], "a") as f:
            f.write(events[0].data.data[0] + "\\n")
    while os.path.exists(os.environ["DIM3_TEST_HOLD"]):
        await asyncio.sleep(0.05)
    return await _process(self, events, *args, **kwargs)
_q.Queue.process_events = _held
"""


@contextlib.contextmanager
def held_app(tmp_path: Path, hold: Path, **env: str) -> Iterator[str]:
    """The app with :data:`HOLD_HOOK` in its process, held while ``hold`` exists (created
    here); yields its URL."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_HOOK)
    hold.touch()
    env = {"PYTHONPATH": str(hook), "DIM3_TEST_HOLD": str(hold), **env}
    with running_app(tmp_path, [ROOT / "assets", tmp_path], **env) as url:
        log = (tmp_path / "app.log").read_text()
        assert "Error in sitecustomize" not in log, log  # the hold is on
        yield url


def ask(url: str, visitor: str | None, text: str = "Hallo") -> httpx.Response:
    """``/call/chat`` (the REST API's way in), from ``visitor`` as the Space's proxy would
    tell it (``X-Forwarded-For``)."""
    headers = {"X-Forwarded-For": visitor} if visitor else {}
    body = {"data": [text, None, 4, 0.0, 1.0]}
    return httpx.post(url + "gradio_api/call/chat", json=body, headers=headers, timeout=30)


def join(url: str, visitor: str, fn_index: int) -> httpx.Response:
    """``/queue/join``, as the browser queues the same event."""
    body = {
        "data": ["Hallo", None, 4, 0.0, 1.0],
        "fn_index": fn_index,
        "session_hash": f"s{time.monotonic_ns()}",  # a new one each time, as a script may
        "event_data": None,
        "trigger_id": None,
    }
    return httpx.post(
        url + "gradio_api/queue/join",
        json=body,
        headers={"X-Forwarded-For": visitor},
        timeout=30,
    )


def answer(url: str, event_id: str) -> str:
    """The final data of a ``/call/chat`` event."""
    with httpx.stream("GET", url + f"gradio_api/call/chat/{event_id}", timeout=120) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("complete", "error"):
                assert event == "complete", line
                return json.loads(line[6:])[0]
    raise AssertionError("the stream ended without a result")


def test_one_visitor_holds_a_bounded_share_of_the_queue(tmp_path):
    """One visitor (an address behind the Space's proxy) may have ``$DIM3_MAX_QUEUED`` events
    waiting or running: the next is refused with a message that says so, whichever route it
    takes and whatever session id or forged ``X-Forwarded-For`` entries it carries, while other
    visitors still get in; all waiting events together stop at ``$DIM3_MAX_QUEUE`` (Gradio's
    "busy"); once a visitor's events are done, their share is theirs again."""
    hold = tmp_path / "hold"
    env = {"DIM3_MAX_QUEUED": "3", "DIM3_MAX_QUEUE": "2", "DIM3_PROXY_HOPS": "1"}
    with held_app(tmp_path, hold, **env) as url:
        config = httpx.get(url + "config", timeout=30).json()
        chat = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")

        first = [ask(url, "203.0.113.7") for _ in range(2)]  # running (the chat's 4 slots)
        assert [r.status_code for r in first] == [200, 200], [r.text for r in first]
        assert join(url, "203.0.113.7", chat).status_code == 200  # the browser's way in
        for refused in (
            ask(url, "203.0.113.7"),
            join(url, "203.0.113.7", chat),
            ask(url, "198.51.100.1, 203.0.113.7"),  # a forged entry left of the proxy's
        ):
            assert refused.status_code == 429, refused.text
            detail = refused.json()["detail"]
            assert "You already have 3 requests waiting or running" in detail, detail
            assert "$DIM3_MAX_QUEUED" in detail and "try again" in detail, detail

        assert ask(url, "198.51.100.1").status_code == 200  # another visitor: the 4th slot
        waiting = [ask(url, "198.51.100.1"), ask(url, "192.0.2.5")]  # the queue's 2 places
        assert [r.status_code for r in waiting] == [200, 200], [r.text for r in waiting]
        full = ask(url, "192.0.2.99")
        assert full.status_code == 503 and "Queue is full" in full.text, full.text

        hold.unlink()  # the held events run, and end
        deadline = time.monotonic() + 120
        again = ask(url, "203.0.113.7", "Welche Farbe?")
        while again.status_code != 200:
            assert again.status_code in (429, 503), again.text
            assert time.monotonic() < deadline, "the visitor's share never came back"
            time.sleep(0.5)
            again = ask(url, "203.0.113.7", "Welche Farbe?")
        assert answer(url, again.json()["event_id"]).strip()  # the original VLM answered
    log = (tmp_path / "app.log").read_text()
    assert "203.0.113.7" not in log  # refusals are logged without the address


def test_visitors_take_turns_in_a_line(tmp_path):
    """A visitor who queued many chat turns does not hold the others up for all of them: with
    the chat's 4 slots taken by one visitor and 2 more of theirs waiting, the next two visitors'
    first turns are served before those two (Gradio alone serves its line first come, first
    served: A5, A6, B1, C1)."""
    hold, order = tmp_path / "hold", tmp_path / "order"
    env = {"DIM3_TEST_ORDER": str(order), "DIM3_MAX_QUEUED": "10", "DIM3_PROXY_HOPS": "1"}
    with held_app(tmp_path, hold, **env) as url:
        sent = [ask(url, "203.0.113.7", f"A{i}") for i in range(1, 7)]
        sent += [ask(url, "198.51.100.1", "B1"), ask(url, "192.0.2.5", "C1")]
        assert all(r.status_code == 200 for r in sent), [r.text for r in sent]
        hold.unlink()
        for r in sent:
            answer(url, r.json()["event_id"])
    served = order.read_text().split()
    assert sorted(served[:4]) == ["A1", "A2", "A3", "A4"], served  # the 4 slots, at once
    assert served[4:] == ["B1", "C1", "A5", "A6"], served


def test_the_visitor_is_the_address_the_trusted_proxy_saw():
    """``X-Forwarded-For`` read from the right, as many entries as there are trusted proxies;
    the connection's address where there are none, or the header is shorter than that."""
    h = Headers(raw=[(b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"), (b"x-forwarded-for", b"3.3.3.3")])
    assert visitor_address(h, "10.0.0.9", 0) == "10.0.0.9"
    assert visitor_address(h, "10.0.0.9", 1) == "3.3.3.3"
    assert visitor_address(h, "10.0.0.9", 2) == "2.2.2.2"
    assert visitor_address(h, "10.0.0.9", 4) == "10.0.0.9"
    assert visitor_address(Headers(), "10.0.0.9", 1) == "10.0.0.9"
    # an IPv6 address is its /64: a host has all of it, so one address each would be no limit
    v6 = Headers(raw=[(b"x-forwarded-for", b"2001:db8:0:7::1")])
    assert visitor_address(v6, None, 1) == "2001:db8:0:7::/64"
    assert visitor_address(None, "2001:db8:0:7:ffff::2", 0) == "2001:db8:0:7::/64"
    assert visitor_address(None, "2001:db8:0:8::1", 0) == "2001:db8:0:8::/64"
    assert visitor_address(None, "::ffff:192.0.2.1", 0) == "192.0.2.1"


@pytest.mark.parametrize(
    ("name", "value", "read"),
    [
        ("DIM3_MAX_QUEUED", "lots", max_queued),
        ("DIM3_MAX_QUEUED", "-1", max_queued),
        ("DIM3_MAX_QUEUE", "1.5", max_queue),
        ("DIM3_PROXY_HOPS", "yes", proxy_hops),
        ("DIM3_PROXY_HOPS", "99", proxy_hops),
        ("DIM3_MAX_SESSIONS", "many", max_sessions),
        ("DIM3_VISITOR_SESSIONS", "-4", visitor_sessions),
    ],
)
def test_a_mistyped_queue_setting_is_named(monkeypatch, name, value, read):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"\${name}={value!r}"):
        read()


def test_queue_settings_defaults(monkeypatch):
    for name in (
        "DIM3_MAX_QUEUED",
        "DIM3_MAX_QUEUE",
        "DIM3_PROXY_HOPS",
        "SPACE_ID",
        "SPACES_ZERO_GPU",
    ):
        monkeypatch.delenv(name, raising=False)
    assert (max_queued(), max_queue(), proxy_hops()) == (16, 128, 0)
    assert (max_sessions(), visitor_sessions()) == (2000, 100)
    monkeypatch.setenv("SPACE_ID", "someone/dim3-studio")
    assert proxy_hops() == 1
    monkeypatch.setenv("DIM3_MAX_QUEUED", "0")
    assert max_queued() is None
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")  # Gradio's own queue size there, unless set
    assert max_queue() is None
    monkeypatch.setenv("DIM3_MAX_QUEUE", "64")
    assert max_queue() == 64


def _fn(config: dict, elem_id: str, trigger: str) -> int:
    """The event of the component ``elem_id`` on ``trigger``, as the page calls it."""
    ids = {c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id}
    return next(
        d["id"]
        for d in config["dependencies"]
        if [t for t in d["targets"] if t[0] in ids] and any(t[1] == trigger for t in d["targets"])
    )


def _page_event(url: str, fn: int, data: list, session: str, visitor: str) -> dict:
    """A queued event as the page sends it, for ``session``; its final output."""
    body = {"data": data, "fn_index": fn, "session_hash": session, "event_data": None}
    headers = {"X-Forwarded-For": visitor}
    r = httpx.post(url + "gradio_api/queue/join", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    params = {"session_hash": session}
    with httpx.stream("GET", url + "gradio_api/queue/data", params=params, timeout=120) as s:
        for line in s.iter_lines():
            if (
                line.startswith("data:")
                and (m := json.loads(line[5:]))["msg"] == "process_completed"
            ):
                return m["output"]
    raise AssertionError("no result")


def test_one_visitors_new_sessions_push_out_only_their_own(tmp_path):
    """Gradio keeps a session (~0.25 MB here) for every new session id a request names, up to
    ``$DIM3_MAX_SESSIONS``, dropping the least recently used: a visitor naming new ids (outside
    the queue, by a page event a script can call) pushed every other visitor's conversation out
    (attack round 5), and so did new ids by every other route that makes one (the queue's,
    ``/api/``, a heartbeat's end: the bypass round). Now one visitor keeps
    ``$DIM3_VISITOR_SESSIONS`` (here 3), whatever the route, and their own least recently used
    goes: another visitor's conversation stays, the flooder's first goes.
    Deep links (a GET that wrote each session's settings to disk) and component server
    functions (none here; the route made a session for any id, in any body) are off."""
    env = {"DIM3_MAX_SESSIONS": "10", "DIM3_VISITOR_SESSIONS": "3", "DIM3_PROXY_HOPS": "1"}
    with running_app(tmp_path, [ROOT / "assets", tmp_path], **env) as url:
        config = httpx.get(url + "config", timeout=30).json()
        ask, regen = _fn(config, "dim3-box", "submit"), _fn(config, "dim3-regen", "click")
        status = _fn(config, "dim3-tab-chat", "select")  # outside the queue
        question = [{"text": "What colour is the circle?", "files": []}, None, None, None, 0]
        visitor, flooder = ("198.51.100.9", "s-visitor"), ("203.0.113.7", "s-flooder")
        for who, session in (visitor, flooder):
            _page_event(url, ask, question, session, who)
        headers = {"X-Forwarded-For": flooder[0]}
        for route in ("run/predict", "api/predict"):  # events outside the queue
            for i in range(8):
                body = {"data": [], "fn_index": status, "session_hash": f"{route}{i}"}
                r = httpx.post(url + f"gradio_api/{route}", json=body, headers=headers, timeout=30)
                assert r.status_code == 200, r.text
        for i in range(4):  # the queue's: the page's way in
            _page_event(url, regen, [None, None, None, 0], f"queued{i}", flooder[0])
        for i in range(8):  # a heartbeat's end runs the page's unload for its session
            beat = url + f"gradio_api/heartbeat/beat{i}"
            with httpx.stream("GET", beat, headers=headers, timeout=30) as r:
                next(r.iter_lines())
        time.sleep(2)
        kept = _page_event(url, regen, [None, None, None, 0], "s-visitor", visitor[0])
        assert kept["data"][0][0]["content"][0]["text"] == "What colour is the circle?", kept
        gone = _page_event(url, regen, [None, None, None, 0], "s-flooder", flooder[0])
        assert gone["data"][0] == {"__type__": "update"}, gone  # nothing to regenerate
        deep = httpx.get(url + "gradio_api/deep_link", params={"session_hash": "s-visitor"})
        assert deep.status_code == 404 and "no deep links" in deep.text
        body = {"session_hash": "s-new", "component_id": 1, "fn_name": "ls", "data": None}
        server_fn = httpx.post(url + "gradio_api/component_server/", json=body, timeout=30)
        assert server_fn.status_code == 404 and "no server functions" in server_fn.text
    assert "sessions: 1 dropped" in (tmp_path / "app.log").read_text()


def test_an_api_chat_leaves_no_session_record(tmp_path):
    """``/chat`` through the REST API is a new session each call: its stop flag and records go
    when it ends (they stayed for good, one per call: attack round 5)."""
    import gradio as gr

    from dim3.models import ModelManager
    from dim3.presets import get_preset
    from dim3.ui.chat_api import _api_chat
    from dim3.ui.common import AppContext

    ctx = AppContext(
        manager=ModelManager(
            allowed_roots=[ROOT / "assets"], default_vlm=get_preset("demo").multimodal
        ),
        allowed_roots=[ROOT / "assets"],
        output_root=tmp_path / "outputs",
    )
    chat = _api_chat(ctx)
    for i in range(3):
        *_, last = chat("What colour is the circle?", request=gr.Request(session_hash=f"api{i}"))
        assert last[0].strip(), last
    assert ctx.stop_flags.sessions() == 0


def test_a_refused_queue_stream_is_one_line_in_the_log_not_a_traceback(tmp_path):
    """Gradio's queue stream refuses a session it does not hold (``GET /queue/data``, the REST
    API's ``GET /call/<name>/<event>``) once the stream has begun, and uvicorn logged a
    75-line traceback for each: one request naming a made-up id, one traceback (attack round
    5, F4). The visitor's answer is Gradio's as before; the log holds one line a minute."""
    with running_app(tmp_path, [ROOT / "assets", tmp_path]) as url:

        def streamed(path: str) -> str:  # what came before Gradio broke the stream off
            got = []
            with httpx.stream("GET", url + path, timeout=30) as r:
                with contextlib.suppress(httpx.RemoteProtocolError):
                    got += r.iter_lines()
            return "\n".join(got)

        for i in range(3):
            text = streamed(f"gradio_api/queue/data?session_hash=made-up-{i}")
            message = json.loads(text.strip().removeprefix("data: "))
            assert message["msg"] == "unexpected_error" and message["session_not_found"], text
        text = streamed("gradio_api/call/chat/made-up-event")
        assert text.startswith("event: error"), text
        time.sleep(1)
    log = (tmp_path / "app.log").read_text()
    assert "Traceback" not in log and "response already started" not in log, log
    lines = [line for line in log.splitlines() if "stream(s) refused" in line]
    assert len(lines) == 1 and "the last with 404" in lines[0], log


def test_stream_refusals_counts_the_lines_it_leaves_out():
    """``StreamRefusals``: a refused stream's record becomes one warning; those within the
    minute after it are left out and counted in the next; any other record passes whole."""
    import logging
    import sys

    from starlette.exceptions import HTTPException

    from dim3.ui.uploads import STREAM_REFUSED, StreamRefusals

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "x", None, info)

    def chained() -> logging.LogRecord:
        try:
            try:
                raise HTTPException(404)
            except HTTPException as cause:
                raise RuntimeError(f"{STREAM_REFUSED}.") from cause
        except RuntimeError as exc:
            return record(exc)

    quiet = StreamRefusals(every=3600)
    first = chained()
    assert quiet.filter(first) and first.levelname == "WARNING" and first.exc_info is None
    assert first.getMessage().startswith("1 stream(s) refused"), first.getMessage()
    assert not quiet.filter(chained()) and not quiet.filter(chained())
    other = record(ValueError("boom"))
    assert quiet.filter(other) and other.exc_info is not None and other.levelname == "ERROR"
    unchained = record(RuntimeError(f"{STREAM_REFUSED}."))  # no HTTPException behind: passes
    assert quiet.filter(unchained) and unchained.exc_info is not None
    quiet.next = 0.0  # the minute is over
    later = chained()
    assert quiet.filter(later) and later.getMessage().startswith("3 stream(s) refused")
    logger = logging.getLogger(StreamRefusals.LOGGER)
    installed = StreamRefusals.install()
    try:
        assert StreamRefusals.install() is installed
        assert sum(isinstance(f, StreamRefusals) for f in logger.filters) == 1
    finally:
        logger.removeFilter(installed)
