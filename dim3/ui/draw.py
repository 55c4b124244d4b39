"""The Chat tab's "Draw a question": a benchmark question in the box, its gold answer after.

Layout and handlers only. "🎲 Draw a question" picks a random question of the chosen benchmark and
language (``dim3.benchmarks.sources.load_items``: a pool of up to 64 questions sampled from the
split's first 1,000, kept per source so later draws are instant) and puts its picture and its
prompt (the benchmark's reference wording) into the chat box, with the benchmark's generation
length in the settings (greedy). Once both models have answered that question, the line under
the panes shows the gold answer and whether each answer matches it under the benchmark's metric.
Pools keep their pictures encoded and are kept by bytes as well as by number: together at most
``CACHE_BYTES``; a larger pool is served but not kept, one past ``POOL_BYTES`` refused.
The drawn question lives in the session's ``gr.State`` as plain data. The demo probe is the
source offered first (it fits the demo trio the app starts with).
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from dim3.benchmarks import BENCHMARKS, PROBE, Item, decode_image, get_benchmark
from dim3.benchmarks.sources import MIB, item_bytes, load_items
from dim3.ui.common import AppContext, check_text, error_html, md_escape
from dim3.ui.jobs import budget, cleans_up, job_folder

POOL = 64  # questions kept per (source, dataset, language)
SCAN = 1000  # questions of a split the pool is drawn from
CACHED = 8  # pools kept
# What one pool may hold (encoded pictures and texts; a larger one is refused): 64 photos of the
# reference sets are some 30 MB (MaRVL's largest photos 100 MB); 64 padded pictures of 20 MB
# each were 1.3 GB, and a few such pools kept left an idle server at 9.1 GB.
POOL_BYTES = 256 * MIB
# What the kept pools may hold together: a dozen pools of real photos; one larger is not kept.
CACHE_BYTES = 128 * MIB
DEMO_LANGUAGES = ("en", "de", "es", "ru", "zh", "ar", "hi", "sw")
SOURCES = [("Demo probe", PROBE.name)] + [(b.title, b.name) for b in BENCHMARKS.values()]
PRIVATE = {"api_visibility": "private"}


@dataclass
class DrawControls:
    """The draw row's components, the gold line under the panes and the drawn question."""

    source: gr.Dropdown
    language: gr.Dropdown
    dataset: gr.Textbox
    button: gr.Button
    gold: gr.Markdown
    drawn: gr.State


def languages_of(source: str) -> list[str]:
    return list(DEMO_LANGUAGES if source == PROBE.name else get_benchmark(source).languages)


def switch_languages(source: str, language: str) -> gr.Dropdown:
    """The new source's languages, keeping the chosen one where the source has it."""
    langs = languages_of(source)
    return gr.Dropdown(choices=langs, value=language if language in langs else langs[0])


def gold_line() -> gr.Markdown:
    """The line under the pair where the drawn question's gold answer appears."""
    return gr.Markdown("", elem_id="dim3-gold", elem_classes="dim3-status")


def draw_controls(gold: gr.Markdown) -> DrawControls:
    """Lay out the draw row (inside the current Blocks)."""
    with gr.Accordion("🎲 Draw a benchmark question", open=False, elem_id="dim3-draw-panel"):
        with gr.Row():
            source = gr.Dropdown(
                SOURCES, value=PROBE.name, label="Benchmark", elem_id="dim3-draw-source"
            )
            language = gr.Dropdown(
                languages_of(PROBE.name),
                value=DEMO_LANGUAGES[1],
                label="Language",
                allow_custom_value=True,  # the benchmark's languages; a typo is refused on draw
                elem_id="dim3-draw-language",
            )
            dataset = gr.Textbox(
                label="Dataset: Hub id or local folder (empty = the benchmark's own)",
                max_length=300,
                elem_id="dim3-draw-dataset",
            )
        button = gr.Button("🎲 Draw a question", elem_id="dim3-draw")
    return DrawControls(source, language, dataset, button, gold, gr.State(None))


class Pools:
    """Question pools per (source, dataset, language): the most recent ``CACHED`` kept, together
    at most ``CACHE_BYTES`` (:func:`~dim3.benchmarks.sources.item_bytes`, pictures included)."""

    def __init__(self, cache_bytes: int = CACHE_BYTES) -> None:
        self.cache_bytes = cache_bytes
        self._pools: OrderedDict[tuple[str, str, str], tuple[list[Item], int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """The bytes the kept pools hold."""
        with self._lock:
            return sum(size for _, size in self._pools.values())

    def get(
        self,
        source: str,
        dataset: str,
        language: str,
        allowed_roots: Sequence[str | Path] | None = None,
        check: Callable[[], None] | None = None,
    ) -> list[Item]:
        """The pool of ``language``'s questions; ``check`` is called as the split is read (the
        draw's time budget) and raises to stop it."""
        key = (source, dataset, language)
        with self._lock:
            if key in self._pools:
                self._pools.move_to_end(key)
                return self._pools[key][0]
        pool = load_items(
            source,
            dataset or None,
            [language],
            limit=POOL,
            seed=0,
            allowed_roots=allowed_roots,
            scan=SCAN,
            max_bytes=POOL_BYTES,
            check=check,
        )
        size = sum(item_bytes(item) for item in pool)
        if size > self.cache_bytes:
            return pool  # served, not kept
        with self._lock:
            self._pools[key] = (pool, size)
            held = sum(size for _, size in self._pools.values())
            while len(self._pools) > CACHED or held > self.cache_bytes:
                held -= self._pools.popitem(last=False)[1][1]
        return pool


def drawn_record(source: str, item: Item) -> dict[str, Any]:
    """What the session keeps of a drawn question (plain data, enough to score answers)."""
    return {"benchmark": source, **item.record(), "max_new_tokens": item.max_new_tokens}


def judge_text(drawn: dict[str, Any] | None, left: list[dict], right: list[dict]) -> str:
    """The gold line: the gold answer and, per pane, whether its last answer matches it.

    Empty unless the last question asked is the drawn one and both panes have answered it."""
    if not drawn or not left or not right:
        return ""
    asked = [m for m in left if m["role"] == "user" and not m.get("notice")]
    if not asked or asked[-1]["content"].strip() != drawn["question"].strip():
        return ""
    if left[-1]["role"] != "assistant" or right[-1]["role"] != "assistant":
        return ""
    bench = get_benchmark(drawn["benchmark"])
    item = Item(
        drawn["id"],
        drawn["language"],
        drawn["question"],
        tuple(drawn["gold"]),
        options=tuple(drawn.get("options", ())),
    )
    metric = bench.primary
    marks = []
    for label, pane in (("Original", left), ("Merged", right)):
        ok = bench.score(pane[-1]["content"], item)[metric] == 1.0
        marks.append(f"**{label}:** {'✅ matches' if ok else '❌ does not match'}")
    gold = " / ".join(md_escape(g, 80) for g in drawn["gold"])
    where = f"{md_escape(bench.title)} · {md_escape(drawn['language'])} · {md_escape(drawn['id'])}"
    return (
        f"🎯 **Gold answer:** {gold} · " + " · ".join(marks) + f" · *{metric.replace('_', ' ')}, "
        f"{where}*"
    )


def wire_draw(ctx: AppContext, tab: Any, controls: DrawControls, answered: list) -> None:
    """Wire the draw row: source -> languages, draw -> box + settings, answers -> gold line.

    ``answered``: the chat's events that end with both answers (the gold line follows them)."""
    pools = Pools()
    controls.source.change(
        switch_languages,
        inputs=[controls.source, controls.language],
        outputs=[controls.language],
        **PRIVATE,
    )

    @cleans_up  # the picture's folder goes once Gradio has copied it into its cache
    def draw(source: str, language: str, dataset: str) -> dict:
        try:
            dataset = check_text(dataset, "dataset")
            check = budget("question draw").check  # a split read past SCAN rows it skips
            item = random.choice(pools.get(source, dataset, language, ctx.allowed_roots, check))
            files = []
            if item.image is not None:
                folder = job_folder("dim3-draw-")
                decode_image(item.image).save(folder / "question.png")
                files = [str(folder / "question.png")]
        except Exception as exc:  # noqa: BLE001 - the UI boundary: a message, never a crash
            gr.Warning(error_html(exc, ctx.allowed_roots), title="Cannot draw a question")
            return {controls.gold: gr.skip()}
        bench = get_benchmark(source)
        return {
            tab.box: gr.MultimodalTextbox(
                value={"text": item.question, "files": files}, interactive=True
            ),
            controls.drawn: drawn_record(source, item),
            tab.max_new_tokens: item.max_new_tokens,
            tab.temperature: 0.0,
            controls.gold: f"🎲 *A {md_escape(bench.title)} question in "
            f"{md_escape(item.language)} ({md_escape(item.id)}): send it to ask both models.*",
        }

    controls.button.click(
        draw,
        inputs=[controls.source, controls.language, controls.dataset],
        outputs=[tab.box, controls.drawn, tab.max_new_tokens, tab.temperature, controls.gold],
        **PRIVATE,
    )
    for event in answered:
        event.then(
            judge_text,
            inputs=[controls.drawn, tab.left_msgs, tab.right_msgs],
            outputs=[controls.gold],
            **PRIVATE,
        )
