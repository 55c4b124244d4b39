"""Show a view's results only once a run has made them; until then a line says what will appear.

Layout only: :func:`reveal_after` chains a private step after a run's event that shows the
results (a ``gr.Column``) and hides the empty-state line when the run's status line reports
success (``✅``), and the reverse otherwise. Being a separate, private step, it leaves the public
API's outputs as they were. It knows nothing of what the results are.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

OK = "✅"


def succeeded(status: Any) -> bool:
    """True when a status line reports success."""
    return str(status or "").lstrip().startswith(OK)


def reveal_after(event: Any, status: gr.Markdown, results: gr.Column, empty: gr.Markdown) -> Any:
    """After ``event``: ``results`` shown and ``empty`` hidden when ``status`` says ✅, the
    other way round otherwise. Returns the chained event."""

    def step(text: str) -> dict[Any, Any]:
        ok = succeeded(text)
        return {results: gr.Column(visible=ok), empty: gr.Markdown(visible=not ok)}

    return event.then(
        step,
        inputs=[status],
        outputs=[results, empty],
        api_visibility="private",
        queue=False,
    )


def reveal_now(trigger: Any, results: gr.Column, empty: gr.Markdown) -> None:
    """When ``trigger`` fires (a Run button whose results grow while it runs): show ``results``
    and hide ``empty`` at once; :func:`reveal_after` puts them back if the run fails."""
    trigger(
        lambda: {results: gr.Column(visible=True), empty: gr.Markdown(visible=False)},
        outputs=[results, empty],
        api_visibility="private",
        queue=False,
    )
