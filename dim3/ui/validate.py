"""Typed inputs for every event: wrong types, NaN and unreadable files answered with a clear
message (``gr.Error``) before Gradio or a handler touches them.

A browser sends what its widgets hold; an API caller may send anything: ``"abc"`` for a slider,
``NaN`` for an integer, a text file named ``.png``, a 20000 × 20000 picture. Gradio would turn
those into "upstream app raised an exception" (or no message at all). :class:`StudioBlocks`
checks each input of each event against its component's type first, naming the parameter and
what it takes; whatever else Gradio's own input processing raises is answered the same way.
:func:`header_checked` makes an image input read a picture's size from its header
(``dim3.limits``) before anything decodes it. Nothing here decides what a handler does with
valid input.
"""

from __future__ import annotations

import html
import math
from typing import Any

import gradio as gr
from gradio.exceptions import InvalidPathError

from dim3.limits import check_image_header

NUMBERS = (gr.Number, gr.Slider)
FILE_INPUTS = (gr.Image, gr.File, gr.MultimodalTextbox)
CHOICES = (gr.Dropdown, gr.Radio)
SHOWN_CHARS = 40  # of a refused value, in the message


def _shown(value: Any) -> str:
    """A refused value as the message shows it: its ``repr``, cut, HTML escaped (Gradio's error
    pop-ups render their text as HTML)."""
    text = repr(value)
    return html.escape(
        text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…", quote=False
    )


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _unencodable(text: str) -> bool:
    """Whether ``text`` holds what is no character (a lone surrogate, which JSON can carry but
    no tokenizer or file takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def type_problem(block: Any, value: Any) -> str | None:
    """What is wrong with ``value`` as the input of ``block``, in words; None if nothing."""
    if isinstance(block, NUMBERS):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {_shown(value)}"
        if not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        low, high = getattr(block, "minimum", None), getattr(block, "maximum", None)
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"from {_number(low)}" if low is not None else "up"
            span += f" to {_number(high)}" if high is not None else ""
            return f"must be {span}, got {_number(value)}"
        if getattr(block, "precision", None) == 0 and value != int(value):
            return f"must be a whole number, got {_number(value)}"
    elif isinstance(block, gr.Checkbox):
        if not isinstance(value, bool):
            return f"must be true or false, got {_shown(value)}"
    elif isinstance(block, gr.Textbox):
        if value is not None and not isinstance(value, str):
            return f"must be text, got {_shown(value)}"
        if value is not None and _unencodable(value):
            return "holds a code point that is no character (a lone surrogate); send UTF-8 text"
    elif isinstance(block, gr.CheckboxGroup):
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            return f"must be a list of names, got {_shown(value)}"
    elif isinstance(block, CHOICES):
        many = isinstance(block, gr.Dropdown) and getattr(block, "multiselect", False)
        kinds = (str, int, float, list) if many else (str, int, float)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            return f"must be one of the listed choices, got {_shown(value)}"
        if value is not None and not getattr(block, "allow_custom_value", False):
            listed = [c[1] if isinstance(c, (tuple, list)) else c for c in block.choices or []]
            picked = value if isinstance(value, list) else [value]
            wrong = next((v for v in picked if v not in listed), None)
            if listed and wrong is not None:
                names = ", ".join(_shown(c) for c in listed[:12])
                more = ", …" if len(listed) > 12 else ""
                return f"must be one of {names}{more}; got {_shown(wrong)}"
    return None


def parameter_name(block_fn: Any, index: int, block: Any) -> str:
    """The API parameter's name of input ``index`` (else the widget's label)."""
    names = getattr(block_fn, "input_parameter_names", None) or []
    if index < len(names) and names[index]:
        return str(names[index])
    return str(getattr(block, "label", None) or f"input {index + 1}")


class StudioBlocks(gr.Blocks):
    """``gr.Blocks`` whose events check their inputs' types first (see the module docstring)."""

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):  # type: ignore[override]
        blocks = list(getattr(block_fn, "inputs", []) or [])
        props = getattr(block_fn, "component_prop_inputs", ()) or ()
        if isinstance(inputs, list) and len(inputs) != len(blocks) and blocks:
            names = [parameter_name(block_fn, i, b) for i, b in enumerate(blocks)]
            lacking = names[len(inputs) :]
            said = (
                f"without {', '.join(lacking[:6])}{', …' if len(lacking) > 6 else ''}"
                if lacking
                else f"with {len(inputs) - len(blocks)} too many"
            )
            raise gr.Error(
                f"this endpoint takes {len(blocks)} inputs, in order; it was sent {len(inputs)}, "
                f"{said}: send every one (gradio_client fills in the form's defaults)",
                print_exception=False,
            )
        if isinstance(inputs, list) and len(inputs) == len(blocks):
            for i, (block, value) in enumerate(zip(blocks, inputs, strict=True)):
                if getattr(block, "stateful", False) or i in props:
                    continue
                if state is not None and block._id in state:  # as this session updated it
                    block = state[block._id]
                problem = type_problem(block, value)
                if problem:
                    raise gr.Error(
                        f"{parameter_name(block_fn, i, block)} {problem}", print_exception=False
                    )
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - any other unreadable input: say which
            raise gr.Error(_unreadable(block_fn, exc), print_exception=False) from None


def _unreadable(block_fn: Any, exc: Exception) -> str:
    """Which input Gradio could not read, without echoing server paths or internals."""
    blocks = list(getattr(block_fn, "inputs", []) or [])
    text = str(exc)
    if isinstance(exc, InvalidPathError):  # a path the server was never sent, or not its own
        files = [i for i, b in enumerate(blocks) if isinstance(b, FILE_INPUTS)]
        name = parameter_name(block_fn, files[0], blocks[files[0]]) if len(files) == 1 else "a file"
        return (
            f"the input {name} names a file this server was not sent: upload the file "
            "(gradio_client: handle_file(path)) rather than naming a path"
        )
    for i, block in enumerate(blocks):
        label = type(block).__name__
        if label in text or str(getattr(block, "label", "") or "\0") in text:
            name = parameter_name(block_fn, i, block)
            return f"the input {name} could not be read ({type(exc).__name__}); check its type"
    return f"an input could not be read ({type(exc).__name__}); check the parameters' types"


def header_checked(image: gr.Image) -> gr.Image:
    """``image`` made to refuse a file that is not a picture, or one with too many pixels,
    from its header, before Gradio or a handler decodes it (``dim3.limits.check_image_header``).
    (A wrapper of this one component's ``preprocess``, not a subclass: Gradio would write a
    type stub beside a subclass.)"""
    preprocess = image.preprocess

    def checked(payload: Any) -> Any:
        path = getattr(payload, "path", None)
        if path:
            try:
                check_image_header(path)
            except ValueError as exc:  # names the file as the visitor named it: escaped
                raise gr.Error(html.escape(str(exc), quote=False), print_exception=False) from None
        return preprocess(payload)

    image.preprocess = checked  # type: ignore[method-assign]
    return image
