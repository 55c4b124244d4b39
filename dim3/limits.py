"""Bounds on what one request may cost a shared server: time per heavy job, picture sizes.

- **Time budget.** ``$DIM3_JOB_BUDGET`` (seconds; default ``DEFAULT_BUDGET``, ``0`` = none) is
  what one heavy job (merge, save, evaluate, sweep, diagnose, represent) may take. A job is
  estimated before it starts where a method's cost grows with an option (WUDI's and OptMerge's
  ``iterations``): :func:`estimate_rule_seconds` times that rule for a step or two on a tensor of
  the model's largest merged shape, on the job's device, and scales by the iterations and the
  tensors; over the budget, the job is refused before it reads a weight. While it runs,
  :class:`JobBudget` projects the total from the measured share done and ends it, from its
  progress callbacks (per tensor, per optimisation step, per model), once the projection or
  the clock passes the budget. The job's own clean-up (the writer's temporary folder, the
  model manager's staging copy) leaves nothing half-written.
- **Saved merges.** ``$DIM3_MAX_SAVED`` (default ``DEFAULT_MAX_SAVED``, ``0`` = none) is what
  the app's output folder ("Save to folder") may hold in all: :func:`check_saved_room` refuses,
  before anything is written, a save that would take it past that, with the sizes.
- **Pictures.** :func:`check_image_header` reads a picture's size from its header (no pixel is
  decoded) and refuses one that is too large or not a picture at all.
- **Batches and questions.** Generation batches are cut by the pixels and padded tokens they
  hold (:data:`MAX_BATCH_PIXELS`, :data:`MAX_BATCH_TOKENS`, ``dim3.evaluate``); a question
  longer than :data:`MAX_QUESTION_CHARS` is refused where it is read.

Nothing here knows Gradio; ``dim3.ui.jobs`` applies these to the app's handlers.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ENV_BUDGET = "DIM3_JOB_BUDGET"
DEFAULT_BUDGET = 600.0  # seconds: a public Space's visitor waits at most this long for another's
MIN_MEASURED = 1.0  # seconds of work before a projection is trusted
MIN_FRACTION = 0.02  # ... or this share of the work done, whichever comes first
PROBE_SECONDS = 0.1  # an estimate times a rule until one run takes this long ...
REPEATS = 3
MAX_PROBE_STEPS = 16  # ... or this many iterations (fewer are not estimated: cheap)
MAX_IMAGE_PIXELS = 40_000_000
# How many times longer than wide (or wide than tall) a picture may be. Processors that scale
# the shorter side to a size (CLIP's and SigLIP's for LLaVA: 336) scale the longer side with
# it: a 400,000 × 1 PNG of 467 bytes, within the pixel limit, took 4.9 GB to prepare for the
# demo VLM (shorter side 32), and would take a hundred times that at 336. At 50 to 1 a picture
# is at most 336 × 16,800 once scaled (68 MB as float32). Qwen2-VL's processors refuse 200 to 1.
MAX_ASPECT = 50
# What one batch of generation (evaluate, sweep) may hold, whatever its number of questions: the
# pictures it decodes at once (RGB, and the processor's copies: 72 pictures of 40 MP each, in
# batches of 64, took 17 GB over the server's resident size) and its prompts' tokens, padded to
# the longest (activations and cache grow with them: 72 questions of 16,000 tokens took 7.5 GB
# on the demo VLM). A batch past either is cut into smaller ones, in order; one question always
# fits. At 64 MP a batch holds one picture of the 40 MP allowed (0.4 GB on the demo VLM, where 8
# in one batch took 2.4 GB). Benchmarks' own batches stay whole: 64 xGQA pictures are some
# 20 MP, 64 of their prompts 4,000 tokens.
MAX_BATCH_PIXELS = 64_000_000
MAX_BATCH_TOKENS = 32_768
# The longest question (the prompt read by the model: a benchmark's wording around the dataset's
# question, or a probe's context and question) a dataset or probe file may hold. Twice the chat's
# message limit: a benchmark's prompts are at most a few thousand (M3Exam with its background).
MAX_QUESTION_CHARS = 8_000
ENV_MAX_SAVED = "DIM3_MAX_SAVED"
# What the app's output folder may hold in all, unless $DIM3_MAX_SAVED says otherwise: three 7B
# merges in bfloat16 (about 15 GB each). Saves add up while the server runs (the app deletes
# none, and a session may save under many names), on the disk that every visitor's Hub
# downloads share: without a limit one visitor's saves could leave no room for another's merge.
DEFAULT_MAX_SAVED = 50 * 10**9


class BudgetExceeded(ValueError):
    """A job that would take, or took, longer than the server allows; says what to change."""


def budget_from_env() -> float | None:
    """``$DIM3_JOB_BUDGET`` in seconds (default ``DEFAULT_BUDGET``); None when it is 0 (no
    limit: a server run by its only user)."""
    raw = os.environ.get(ENV_BUDGET, "").strip()
    if not raw:
        return DEFAULT_BUDGET
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"${ENV_BUDGET}={raw!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"${ENV_BUDGET} must be a number of seconds >= 0, got {raw!r}")
    return seconds or None


def saved_limit() -> int | None:
    """``$DIM3_MAX_SAVED`` in bytes (``50GB``, ``500MB``; default ``DEFAULT_MAX_SAVED``); None
    when it is 0 (no limit: a server run by its only user)."""
    from dim3.sizes import size_from_env

    return size_from_env(ENV_MAX_SAVED, DEFAULT_MAX_SAVED)


def folder_bytes(folder: Path) -> int:
    """The sizes of the files under ``folder`` (links not followed; 0 where it is missing)."""
    total = 0
    for parent, _, files in os.walk(folder, followlinks=False):
        for name in files:
            try:
                total += (Path(parent) / name).lstat().st_size
            except OSError:
                pass  # removed meanwhile
    return total


def check_saved_room(output_root: Path, nbytes: int) -> None:
    """Refuse a save of ``nbytes`` that would take the output folder past :func:`saved_limit`.
    What is there counts, a save this one overwrites included: the writer removes it only once
    the new one is in place."""
    limit = saved_limit()
    if limit is None:
        return
    from dim3.sizes import human_size

    held = folder_bytes(output_root)
    if held + nbytes > limit:
        raise ValueError(
            f"saving this merge ({human_size(nbytes)}) would bring the server's output folder to "
            f"{human_size(held + nbytes)}, past the {human_size(limit)} it may hold "
            f"(${ENV_MAX_SAVED}; {human_size(held)} saved already): chat with the merge without "
            "saving it, or save it on your own machine"
        )


def clock(seconds: float) -> str:
    """Seconds as ``m:ss`` (``h:mm:ss`` past an hour)."""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class JobBudget:
    """The time one job may take: ``check`` raises :class:`BudgetExceeded` once the clock, or
    the total projected from the share done, passes ``seconds`` (None: no limit).

    what: the job in words ("merge", "evaluation"), for the message. hint: how to make it
    smaller ("choose fewer iterations"). clock: for tests.
    """

    def __init__(
        self,
        seconds: float | None,
        what: str,
        hint: str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds, self.what, self.hint, self._clock = seconds, what, hint, clock
        self.started = clock()

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    def _help(self) -> str:
        hint = f"; {self.hint}" if self.hint else ""
        return (
            f"this server gives one job at most {clock(self.seconds or 0)} ($"
            f"{ENV_BUDGET}){hint}, or run it on your own machine"
        )

    def check(self, fraction: float | None = None, work_elapsed: float | None = None) -> None:
        """Raise if the budget is spent, or if ``fraction`` (0..1) of the work done in
        ``work_elapsed`` seconds (default: since the start) projects past it."""
        if self.seconds is None:
            return
        elapsed = self.elapsed
        if elapsed > self.seconds:
            raise BudgetExceeded(
                f"the {self.what} was stopped after {clock(elapsed)}: {self._help()}. Nothing "
                "it made was kept"
            )
        work = elapsed if work_elapsed is None else work_elapsed
        if not fraction or fraction <= 0 or fraction >= 1:
            return
        if work < MIN_MEASURED and fraction < MIN_FRACTION:
            return
        projected = elapsed + work * (1 - fraction) / fraction
        if projected > self.seconds:
            raise BudgetExceeded(
                f"the {self.what} would take about {clock(projected)} (measured over its first "
                f"{fraction:.1%}): {self._help()}. It was stopped; nothing it made was kept"
            )

    def refuse_estimate(self, estimate: float | None, detail: str = "") -> None:
        """Refuse, before it starts, a job estimated at ``estimate`` seconds."""
        if self.seconds is None or estimate is None or estimate <= self.seconds:
            return
        detail = f" ({detail})" if detail else ""
        raise BudgetExceeded(
            f"the {self.what} would take about {clock(estimate)}{detail}: {self._help()}. "
            "It was not started"
        )


def iterations_of(options: Any) -> int | None:
    """The ``iterations`` option of a method's options (WUDI, OptMerge), else None."""
    value = getattr(options, "iterations", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def estimate_rule_seconds(
    method: str,
    options: dict[str, Any],
    shapes: Sequence[tuple[int, ...]],
    n_tuned: int,
    device: str = "cpu",
) -> float | None:
    """Seconds the rule ``method`` with ``options`` would take over tensors of ``shapes``
    (the merged tensors, as the rule sees them), for a method whose cost grows with an
    ``iterations`` option; None for the others (their progress is checked as they run).

    Measured, not guessed: for each distinct 2-D shape the rule runs on random tensors of that
    shape on ``device`` with 1, 2, 4, ... iterations until a run takes ``PROBE_SECONDS`` and
    three times a one-iteration run, or reaches ``MAX_PROBE_STEPS``; that run and the
    one-iteration run (the fastest of three) give the fixed cost per tensor and the cost per
    iteration. On a busy
    machine the figure is what this machine does now (measured: within 2× of the real merge).
    """
    import torch

    from dim3.methods import get_method

    m = get_method(method)
    opts = m.make_options(options)
    iterations = iterations_of(opts)
    matrices = [tuple(s) for s in shapes if len(s) == 2]
    if iterations is None or iterations <= MAX_PROBE_STEPS or not matrices:
        return None
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    for shape in sorted(set(matrices)):
        base = torch.randn(shape, generator=gen).to(device)
        tuned = [base + 0.01 * torch.randn(shape, generator=gen).to(device) for _ in range(n_tuned)]
        run(m, base, tuned, options, 1, device)  # warm-up: allocations, kernels
        # the fastest of three: one stall of a busy machine (seconds, in a CI run beside another
        # job) would otherwise count as fixed cost in every tensor of this shape
        first = min(run(m, base, tuned, options, 1, device) for _ in range(3))
        steps, seconds = 2, run(m, base, tuned, options, 2, device)
        while steps < MAX_PROBE_STEPS and seconds < max(PROBE_SECONDS, 3 * first):
            steps *= 2
            seconds = run(m, base, tuned, options, steps, device)
        # seconds = fixed + steps * per_step, first = fixed + per_step
        per_step = max(seconds - first, 0.0) / (steps - 1)
        cost = max(first - per_step, 0.0) + per_step * iterations
        total += matrices.count(shape) * cost
    return total


def run(m: Any, base: Any, tuned: list, options: dict, steps: int, device: str) -> float:
    """Seconds one run of method ``m`` with ``steps`` iterations takes (best of ``REPEATS``)."""
    import torch

    probe = m.make_options({**options, "iterations": steps})
    best = math.inf
    for _ in range(REPEATS):  # the fastest of a few runs: what the machine does unhurried
        start = time.perf_counter()
        m.merge(base, tuned, probe, name="estimate")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def estimate_merges_seconds(
    merges: Iterable[tuple[str, dict[str, Any]]],
    shapes: Sequence[tuple[int, ...]],
    n_tuned: int,
    device: str = "cpu",
) -> tuple[float, str]:
    """Summed :func:`estimate_rule_seconds` of several merges (method, options), measured once
    per method and iteration count; and a note of what dominates, for the message."""
    cache: dict[tuple[str, str], float | None] = {}
    total, worst, note = 0.0, 0.0, ""
    for method, options in merges:
        key = (method, repr(sorted(options.items())))
        if key not in cache:
            cache[key] = estimate_rule_seconds(method, options, shapes, n_tuned, device)
        seconds = cache[key] or 0.0
        total += seconds
        if seconds > worst:
            worst = seconds
            iterations = options.get("iterations", "default")
            note = f"{method} with {iterations} iterations: ~{clock(seconds)} per merge"
    return total, note


def check_image_header(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of a picture, read from its header only; ``ValueError`` naming the file
    (its last part) when it is not a picture PIL can read or has more than ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(path) as img:  # reads the header; no pixel is decoded
                width, height = img.size
    except Image.DecompressionBombError:
        raise ValueError(
            f"the image {name} has too many pixels (more than {max_pixels:,} allowed); upload "
            "a smaller picture"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ValueError(
            f"the file {name} is not a readable image ({type(exc).__name__}); upload a PNG, "
            "JPEG or WebP picture"
        ) from None
    problem = image_size_problem(name, width, height, max_pixels)
    if problem:
        raise ValueError(problem)
    return width, height


def image_size_problem(name: str, width: int, height: int, max_pixels: int) -> str | None:
    """What is wrong with a picture of ``width`` × ``height`` (too many pixels, or too long for
    its width: :data:`MAX_IMAGE_PIXELS`, :data:`MAX_ASPECT`), said to the visitor; None if
    nothing."""
    if width * height > max_pixels:
        return (
            f"the image {name} is {width}×{height} pixels, more than the {max_pixels:,} allowed; "
            "upload a smaller picture"
        )
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        return (
            f"the image {name} is {width}×{height} pixels, more than {MAX_ASPECT} times as long "
            "as it is wide; crop it into a less elongated picture"
        )
    return None
