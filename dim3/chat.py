"""Chat with a vision-language model: load it, turn a conversation into inputs, stream a reply.

This module knows transformers VLMs (``AutoModelForImageTextToText`` + ``AutoProcessor``) and plain
conversations: a list of ``{"role": "user" | "assistant", "content": str}`` dicts plus at most one
image, which belongs to the first user turn (LLaVA-1.5 style: a new image starts a new
conversation). It does not know Gradio, model management (see ``dim3.models``) or merging.

``stream_reply`` starts ``model.generate`` in a thread with a :class:`TokenStreamer` (text of every
token as soon as it decodes to whole characters, not held back until a word ends) and a stopping
criterion that reads a ``threading.Event``; setting the event, closing the iterator or leaving it
unread for ``idle_timeout`` seconds (a client that went away) ends generation within one token.
Work per request is bounded before any forward pass: a message longer than
``MAX_MESSAGE_CHARS`` is refused before tokenizing, a conversation longer than the model's
context after tokenizing, and ``max_new_tokens`` is cut to the room the context leaves. ``interleave`` merges two reply streams into snapshots of both texts,
so two models can answer side by side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import TextIteratorStreamer

from dim3.limits import image_size_problem

MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused (decompression-bomb guard)
MAX_MESSAGE_CHARS = 4000  # one message; longer ones are refused before tokenizing
IDLE_TIMEOUT = 20.0  # seconds a reply may stay unread before its generation stops
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


class ChatError(ValueError):
    """A conversation, image or setting that cannot be used; the message says how to fix it."""


MIN_TEMPERATURE = 0.01  # the smallest sampling temperature: logits × 100 stay finite


@dataclass(frozen=True)
class GenerationParams:
    """How to sample a reply. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = field(
        default=64, metadata={"help": "Longest reply, in tokens.", "min": 1, "max": 2048}
    )
    temperature: float = field(
        default=0.0,
        metadata={
            "help": "0 = always the most likely token; higher = more varied.",
            "min": 0.0,
            "max": 2.0,
        },
    )
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "Sample only from the smallest set of tokens with this total probability.",
            "min": 0.05,
            "max": 1.0,
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= 2048:
            raise ChatError(
                f"max new tokens must be an integer in [1, 2048], got {self.max_new_tokens!r}"
            )
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise ChatError(f"temperature must lie in [0, 2], got {self.temperature!r}")
        if 0.0 < float(self.temperature) < MIN_TEMPERATURE:
            # logits / 1e-300 are infinite: sampling then fails on NaN probabilities
            raise ChatError(
                f"temperature must be 0 (always the most likely token) or at least "
                f"{MIN_TEMPERATURE}, got {self.temperature!r}"
            )
        if not 0.05 <= float(self.top_p) <= 1.0:
            raise ChatError(f"top-p must lie in [0.05, 1], got {self.top_p!r}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
        }


def load_vlm(
    path: str | Path, *, dtype: torch.dtype, device_map: Any = None, max_memory: dict | None = None
) -> tuple[Any, Any]:
    """Load a VLM and its processor from a local folder (safetensors only, no remote code).

    dtype: e.g. ``torch.float32`` on CPU, ``torch.bfloat16`` on GPU. device_map: None (CPU), a
    dict ``{"": "cuda:0"}`` or ``"auto"`` (accelerate spreads the layers over the GPUs, within
    ``max_memory`` bytes per GPU index when given).
    Returns ``(model, processor)`` with the model in eval mode. Its shards' headers are checked
    first (:class:`dim3.checkpoints.Checkpoint`): a truncated or damaged file is named, with the
    fix, rather than failing inside transformers' loading.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from dim3.checkpoints import Checkpoint

    Checkpoint(Path(path)).close()
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except ImportError as exc:  # e.g. Qwen2-VL's video processor needs torchvision
        hint = "install torchvision (`pip install torchvision`) and restart the app; "
        raise ChatError(
            f"cannot load the processor of {path}: "
            f"{hint if 'orchvision' in str(exc) else ''}{str(exc).strip().splitlines()[0]}"
        ) from exc
    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=dtype, device_map=device_map, max_memory=max_memory, use_safetensors=True
    )
    model.eval()
    return model, processor


def load_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an uploaded image as RGB, or raise ``ChatError`` saying what is wrong with the file."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            problem = image_size_problem(path.name, *img.size, max_pixels)
            if problem:
                raise ChatError(problem)
            img.load()
            return img.convert("RGB")
    except Image.DecompressionBombError:
        raise ChatError(
            f"the image {path.name} has too many pixels (more than {max_pixels:,} allowed); "
            "upload a smaller picture"
        ) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ChatError(
            f"the file {path.name} is not a readable image ({type(exc).__name__}); "
            f"upload a PNG, JPEG or WebP picture"
        ) from exc


def to_processor_messages(messages: Sequence[dict], with_image: bool) -> list[dict]:
    """Plain ``{"role", "content": str}`` turns -> the processor's chat format.

    The image placeholder goes first in the first user turn. Empty assistant turns are dropped.
    """
    if not messages or messages[-1].get("role") != "user":
        raise ChatError("the conversation must end with a user message")
    out: list[dict] = []
    image_pending = with_image
    for m in messages:
        role, text = m.get("role"), m.get("content")
        if role not in ("user", "assistant", "system") or not isinstance(text, str):
            raise ChatError(f"bad message {m!r}: need role user/assistant/system and text content")
        if role == "assistant" and not text:
            continue
        if role == "user" and len(text) > MAX_MESSAGE_CHARS:
            raise ChatError(
                f"the message is {len(text):,} characters long; the limit is "
                f"{MAX_MESSAGE_CHARS:,}: shorten it"
            )
        parts: list[dict] = []
        if image_pending and role == "user":
            parts.append({"type": "image"})
            image_pending = False
        parts.append({"type": "text", "text": text})
        out.append({"role": role, "content": parts})
    return out


def build_inputs(model: Any, processor: Any, messages: Sequence[dict], image: Image.Image | None):
    """Tokenize a conversation (and image) for ``model.generate``, on the model's device.

    Returns a ``BatchFeature`` with ``input_ids`` (1, L) and, with an image, the processor's
    pixel tensors cast to the model's dtype.
    """
    if getattr(processor, "chat_template", None) is None:
        raise ChatError(
            "this model's processor has no chat template; use a chat (instruct) VLM checkpoint"
        )
    chat = to_processor_messages(messages, with_image=image is not None)
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    kwargs: dict[str, Any] = {"text": prompt, "return_tensors": "pt"}
    if image is not None:
        kwargs["images"] = image
    inputs = processor(**kwargs)
    return inputs.to(model.device, dtype=model.dtype)


def context_length(model: Any) -> int | None:
    """The most tokens the model's language model reads (prompt + reply), or None if unknown."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    return getattr(text, "max_position_embeddings", None) or getattr(
        config, "max_position_embeddings", None
    )


def fit_to_context(model: Any, prompt_tokens: int, params: GenerationParams) -> GenerationParams:
    """``params`` with ``max_new_tokens`` cut to the room the context leaves after the prompt.

    Raises ``ChatError`` when the prompt alone (the conversation, picture tokens included) fills
    the context, so nothing longer than the model can read ever reaches a forward pass.
    """
    limit = context_length(model)
    if limit is None or prompt_tokens + params.max_new_tokens <= limit:
        return params
    room = limit - prompt_tokens
    if room < 1:
        raise ChatError(
            f"the conversation is {prompt_tokens:,} tokens long (picture included) but this model "
            f"reads at most {limit:,}; ask a shorter question or press Clear to start afresh"
        )
    return GenerationParams(room, params.temperature, params.top_p)


class TokenStreamer(TextIteratorStreamer):
    """A ``TextIteratorStreamer`` that hands out each token's text at once.

    transformers' streamers hold text back until a word ends (a space, a newline or a CJK
    character), so the first visible text waits for the first whole word. This one emits the new
    text after every token, holding back only an incomplete UTF-8 character (a byte-level token
    that decodes to U+FFFD until its next byte arrives).
    """

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("TokenStreamer only supports batch size 1")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd"):
            return
        printable, self.print_len = text[self.print_len :], len(text)
        if printable:
            self.on_finalized_text(printable)


class _StopOnEvent:
    """Stopping criterion: true once an event is set or ``idle()`` says the reader is gone;
    counts the steps it was asked."""

    def __init__(self, *events: threading.Event) -> None:
        self.events = events
        self.steps = 0
        self.idle: Callable[[], bool] = lambda: False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.steps += 1
        stop = any(e.is_set() for e in self.events) or self.idle()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class Reply:
    """An iterator of text chunks from a generation thread (what ``stream_reply`` returns).

    ``thread`` is the generation thread; ``new_tokens`` how many tokens it produced so far;
    ``stopped`` whether the stop flag, ``close()`` or an idle reader ended it; ``max_new_tokens``
    the limit it runs under (cut to the model's context). Closing the iterator early stops the
    generation and waits for the thread.
    """

    def __init__(
        self,
        streamer: Any,
        thread: threading.Thread,
        criterion: _StopOnEvent,
        closed: threading.Event,
        errors: list[BaseException],
        *,
        max_new_tokens: int = 0,
        idle_timeout: float | None = None,
    ) -> None:
        self._streamer, self.thread, self._criterion = streamer, thread, criterion
        self._closed, self._errors = closed, errors
        self._done = False
        self.max_new_tokens = max_new_tokens
        self._last_read = time.monotonic()
        if idle_timeout is not None:
            criterion.idle = lambda: self._idle(idle_timeout)

    def _idle(self, timeout: float) -> bool:
        if time.monotonic() - self._last_read > timeout:
            self._closed.set()
        return self._closed.is_set()

    @property
    def new_tokens(self) -> int:
        return self._criterion.steps

    @property
    def stopped(self) -> bool:
        return any(e.is_set() for e in self._criterion.events)

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            chunk = next(self._streamer)
        except StopIteration:
            self._finish()
            raise
        self._last_read = time.monotonic()
        return chunk

    def _finish(self) -> None:
        self._done = True
        self.thread.join()
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        """Stop generating and wait for the thread to end (at once if it already has)."""
        self._closed.set()
        if not self._done:
            self._done = True
            for _ in self._streamer:  # up to the end signal, which follows the stop
                pass
        self.thread.join()


def stream_reply(
    model: Any,
    processor: Any,
    messages: Sequence[dict],
    image: Image.Image | None,
    params: GenerationParams,
    stop: threading.Event | None = None,
    *,
    idle_timeout: float | None = IDLE_TIMEOUT,
) -> Reply:
    """Start generating the assistant's next turn and return an iterator of text chunks.

    messages: plain turns ending with the user's, ``[{"role": "user", "content": "..."}, ...]``.
    image: the conversation's picture (belongs to the first user turn) or None.
    stop: set it from any thread to end generation after the current token.
    idle_timeout: seconds the iterator may stay unread before generation stops (the reader went
    away); None never.
    Input errors (no chat template, bad messages, a message or conversation too long for the
    model) raise ``ChatError`` here, before any thread starts; errors inside ``generate`` are
    re-raised by the iterator.
    """
    from transformers import StoppingCriteriaList

    inputs = build_inputs(model, processor, messages, image)
    params = fit_to_context(model, int(inputs["input_ids"].shape[-1]), params)
    tokenizer = getattr(processor, "tokenizer", processor)
    streamer = TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    closed = threading.Event()
    criterion = _StopOnEvent(*(e for e in (stop, closed) if e is not None))
    errors: list[BaseException] = []
    kwargs = dict(
        **inputs,
        **params.generate_kwargs(),
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([criterion]),
    )
    if getattr(tokenizer, "pad_token_id", None) is None and tokenizer.eos_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, name="dim3-generate", daemon=True)
    reply = Reply(
        streamer,
        thread,
        criterion,
        closed,
        errors,
        max_new_tokens=params.max_new_tokens,
        idle_timeout=idle_timeout,
    )
    thread.start()
    return reply


def interleave(left: Iterable[str], right: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Merge two streams of text chunks into snapshots ``(left_text, right_text)``.

    Takes one chunk from each live stream in turn and yields both full texts so far after each
    chunk, so two replies generated concurrently appear side by side. A stream that ends stays
    at its final text; the other goes on. Pure: no threads, no models.
    """
    streams = [iter(left), iter(right)]
    texts = ["", ""]
    live = [True, True]
    while any(live):
        for i in (0, 1):
            if not live[i]:
                continue
            try:
                texts[i] += next(streams[i])
            except StopIteration:
                live[i] = False
                continue
            yield texts[0], texts[1]
