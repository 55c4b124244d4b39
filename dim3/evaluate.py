"""``python -m dim3 eval``: scores of the original VLM and of every merge on a question source.

For each model (the original VLM, then the VLM merged in memory by each method) the source's
questions are answered by greedy decoding and scored by the source's metric. Sources
(``dim3.benchmarks``): a probe (the built-in demo set, ``--probe demo``, with the demo trio as
default checkpoints, or a user's JSONL file), judged by exact match of the answer in the question's
language (after trimming spaces and end punctuation, Unicode NFC and case folding); or a
multilingual benchmark (``--benchmark xgqa|maxm|marvl|m3exam``, a Hub id or local folder via
``--dataset``) asked with its reference prompt and generation length and scored by its reference
metric, on a seeded sample of ``--limit`` questions per language. Results are per language plus
``overall`` (all questions pooled); ``--json`` also keeps every question's id, gold answers and
each model's prediction, so the results can be rescored. Merges use
``dim3.engine.merge_into_model``; between methods the VLM's loaded weights are restored from an
in-memory copy (so memory is twice the VLM's: fine for demo and small models; for large ones,
evaluate one method at a time).

This module knows generation, scoring and the command line; sources and metrics live in
``dim3.benchmarks``. It knows nothing about Gradio.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dim3.benchmarks import PROBE, Benchmark, get_benchmark
from dim3.benchmarks.metrics import is_correct
from dim3.benchmarks.sources import DEFAULT_LIMIT
from dim3.probes import ProbeItem
from dim3.recipe import Recipe, Source

ORIGINAL = "original"


def accuracy(items: Sequence[ProbeItem], predictions: Sequence[str]) -> dict[str, float]:
    """Per-language accuracy (0..1) plus ``overall`` over every item; languages in probe order."""
    totals: dict[str, list[int]] = {}
    for item, pred in zip(items, predictions, strict=True):
        hits = totals.setdefault(item.language, [0, 0])
        hits[0] += is_correct(pred, item.answer)
        hits[1] += 1
    result = {lang: hit / n for lang, (hit, n) in totals.items()}
    result["overall"] = sum(h for h, _ in totals.values()) / max(1, len(items))
    return result


def score_items(
    benchmark: Benchmark, items: Sequence[Any], predictions: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``{metric: {language: mean, ..., "overall": mean}}`` of ``predictions`` under every metric
    of ``benchmark`` (the primary metric first); languages in item order, ``overall`` pooled."""
    sums: dict[str, dict[str, float]] = {m: {} for m in benchmark.metrics}
    counts: dict[str, int] = {}
    for item, pred in zip(items, predictions, strict=True):
        counts[item.language] = counts.get(item.language, 0) + 1
        for metric, value in benchmark.score(pred, item).items():
            sums[metric][item.language] = sums[metric].get(item.language, 0.0) + value
    out: dict[str, dict[str, float]] = {}
    for metric, per_lang in sums.items():
        out[metric] = {lang: per_lang.get(lang, 0.0) / n for lang, n in counts.items()}
        out[metric]["overall"] = sum(per_lang.values()) / max(1, len(items))
    return out


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _prompt(processor: Any, item: ProbeItem) -> str:
    text = f"{item.context}\n{item.question}" if item.context else item.question
    if item.image is not None:
        content: Any = [{"type": "image"}, {"type": "text", "text": text}]
    elif hasattr(processor, "image_processor"):
        content = [{"type": "text", "text": text}]
    else:
        content = text
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _batch_inputs(model: Any, processor: Any, items: Sequence[ProbeItem]) -> Any:
    """Tokenized prompts (left-padded) and pictures of ``items`` (all with or all without one).

    Pictures are decoded here, for this batch only (files, or encoded bytes from a dataset)."""
    from dim3.benchmarks import decode_image

    tokenizer = _tokenizer(processor)
    prompts = [_prompt(processor, item) for item in items]
    # as transformers' apply_chat_template does: no second BOS when the template writes one
    bos = tokenizer.bos_token
    special = not (bos and prompts[0].startswith(bos))
    kwargs: dict[str, Any] = {
        "return_tensors": "pt",
        "padding": True,
        "add_special_tokens": special,
    }
    if items[0].image is not None:
        inputs = processor(text=prompts, images=[decode_image(it.image) for it in items], **kwargs)
    elif hasattr(processor, "image_processor"):
        inputs = processor(text=prompts, **kwargs)
    else:
        inputs = tokenizer(prompts, **kwargs)
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 12,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to ``items``, in order. ``processor``: a VLM processor or an LLM tokenizer.

    Items with and without a picture are batched apart, and items with their own generation
    length (``item.max_new_tokens``, benchmarks) apart from each other; prompts use the model's
    chat template. ``progress(n)`` is called with the number of items answered after each batch;
    with it, the first batch is small (8), so that a time per item is known early.
    """
    tokenizer = _tokenizer(processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: dict[int, str] = {}
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, it in enumerate(items):
        key = (it.image is None, int(getattr(it, "max_new_tokens", max_new_tokens)))
        groups.setdefault(key, []).append(i)
    first = min(8, batch_size) if progress else None
    for (_, new_tokens), group in sorted(groups.items()):
        costs = {i: _costs(processor, items[i]) for i in group}
        for chunk in _chunks(group, batch_size, first, costs):
            inputs = _batch_inputs(model, processor, [items[i] for i in chunk])
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(
                out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            answers.update(zip(chunk, texts, strict=True))
            if progress:
                progress(len(answers))
        first = None
    return [answers[i] for i in range(len(items))]


def _costs(processor: Any, item: Any) -> tuple[int, int]:
    """What asking ``item`` holds in memory: its prompt's tokens (text only: a picture's tokens
    are bounded by its pixels) and its picture's pixels, read from the header."""
    from dim3.benchmarks import picture_pixels

    tokens = len(_tokenizer(processor)(_prompt(processor, item))["input_ids"])
    return tokens, picture_pixels(item.image) if item.image is not None else 0


def _chunks(
    indices: list[int],
    size: int,
    first: int | None = None,
    costs: dict[int, tuple[int, int]] | None = None,
) -> list[list[int]]:
    """``indices`` cut, in order, into batches of ``size`` (the first one of ``first`` when
    given), a batch also ended before it would hold more than ``MAX_BATCH_TOKENS`` prompt tokens
    padded to its longest or more than ``MAX_BATCH_PIXELS`` pixels (``costs``: each index's
    tokens and pixels); a batch holds at least one."""
    from dim3.limits import MAX_BATCH_PIXELS, MAX_BATCH_TOKENS

    batches: list[list[int]] = []
    batch: list[int] = []
    longest = pixels = 0
    for i in indices:
        tokens, px = (costs or {}).get(i, (0, 0))
        if batch and (
            len(batch) >= ((first or size) if not batches else size)
            or (len(batch) + 1) * max(longest, tokens) > MAX_BATCH_TOKENS
            or pixels + px > MAX_BATCH_PIXELS
        ):
            batches.append(batch)
            batch, longest, pixels = [], 0, 0
        batch.append(i)
        longest, pixels = max(longest, tokens), pixels + px
    return batches + [batch] * bool(batch)


def evaluate_model(
    model: Any, processor: Any, items: Sequence[ProbeItem], batch_size: int = 64
) -> dict[str, float]:
    """Accuracy of ``model`` on ``items`` (per language + overall)."""
    return accuracy(items, generate_answers(model, processor, items, batch_size=batch_size))


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: the checkpoints (one or more multilingual models), the methods (with
    options), the items (probe items or ``dim3.benchmarks.Item``) and the benchmark scoring them."""

    base: Source
    multilingual: tuple[Source, ...]
    multimodal: Source
    items: tuple[Any, ...]
    methods: tuple[str, ...]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 64
    benchmark: str = PROBE.name  # how items are scored (dim3.benchmarks)
    fisher: dict[str, str] = field(default_factory=dict)  # Fisher folders by role (fisher method)

    def recipe(self, method: str, device: str = "auto") -> Recipe:
        """The recipe that merges ``method`` with its options (and the Fishers it may need)."""
        return Recipe(
            base=self.base,
            multilingual=self.multilingual,
            multimodal=self.multimodal,
            method=method,
            options=self.options.get(method, {}),
            device=device,
            fisher=self.fisher,
        )

    def __post_init__(self) -> None:

        get_benchmark(self.benchmark)  # an unknown name fails here, listing the valid ones

        for role in ("base", "multimodal"):
            ref = getattr(self, role)
            if not isinstance(ref, Source):
                object.__setattr__(self, role, Source(str(ref)))
        ml = self.multilingual
        ml = (ml,) if isinstance(ml, (Source, str)) else tuple(ml)
        ml = tuple(m if isinstance(m, Source) else Source(str(m)) for m in ml)
        if not ml:
            raise ValueError("give at least one multilingual model")
        object.__setattr__(self, "multilingual", ml)
        if not self.items:
            raise ValueError("the probe set is empty: give at least one question")
        for name in self.methods:
            self.recipe(name)  # unknown names, bad options, missing Fisher folders fail here
        unknown = sorted(set(self.options) - set(self.methods))
        if unknown:
            raise ValueError(f"options given for methods not evaluated: {unknown}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


Progress = Callable[[str, int, int], None]  # (model name, models done, models total)


def evaluate_merges(
    spec: EvalSpec,
    progress: Progress | None = None,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    answers: dict[str, list[str]] | None = None,
    metrics: dict[str, dict[str, dict[str, float]]] | None = None,
    item_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """``{"original": {lang: score, ..., "overall": score}, method: {...}, ...}`` for ``spec``,
    under the benchmark's primary metric.

    Loads the VLM once (float32 on CPU, bfloat16 on CUDA), scores it, then for each method
    restores its weights, merges into it in memory and scores it again. ``allowed_roots``
    restricts local folders as in :func:`dim3.checkpoints.resolve` (None: any folder). When
    ``answers`` is a dict, each model's raw answers (in ``spec.items`` order) are put in it; when
    ``metrics`` is, each model's scores under every metric (see :func:`score_items`).
    ``item_progress(model, items done, items)`` follows each model's answers batch by batch.
    """
    from dim3.chat import load_vlm
    from dim3.checkpoints import resolve
    from dim3.engine import merge_into_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    folder = resolve(
        spec.multimodal.ref, spec.multimodal.revision, allowed_roots=allowed_roots, token=token
    )
    model, processor = load_vlm(
        folder, dtype=dtype, device_map={"": device} if device == "cuda" else None
    )
    loaded = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [ORIGINAL, *spec.methods]
    results: dict[str, dict[str, float]] = {}
    for done, name in enumerate(names):
        if progress:
            progress(name, done, len(names))
        if name != ORIGINAL:
            _restore(model, loaded)
            recipe = spec.recipe(name, device)
            merge_into_model(model, recipe, allowed_roots=allowed_roots, token=token)
        follow = _follow(item_progress, name, len(spec.items)) if item_progress else None
        predictions = generate_answers(
            model, processor, spec.items, batch_size=spec.batch_size, progress=follow
        )
        scores = score_items(get_benchmark(spec.benchmark), spec.items, predictions)
        results[name] = next(iter(scores.values()))
        if metrics is not None:
            metrics[name] = scores
        if answers is not None:
            answers[name] = predictions
    _restore(model, loaded)
    if progress:
        progress("", len(names), len(names))
    return results


def _follow(
    item_progress: Callable[[str, int, int], None], name: str, total: int
) -> Callable[[int], None]:
    return lambda done: item_progress(name, done, total)


@torch.no_grad()
def _restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, tensor in model.state_dict().items():
        tensor.copy_(state[key])


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A fixed-width text table: one row per model, one column per language, then overall."""
    languages = [k for k in next(iter(results.values())) if k != "overall"]
    columns = [*languages, "overall"]
    width = max(len(n) for n in results) + 2
    lines = ["model".ljust(width) + "".join(c.rjust(8) for c in columns)]
    for name, accs in results.items():
        lines.append(
            name.ljust(width) + "".join(f"{accs.get(c, float('nan')):8.3f}" for c in columns)
        )
    return "\n".join(lines)


def parse_methods(text: str | None) -> tuple[str, ...]:
    """``"dim3,ties"`` -> ("dim3", "ties"); None or "all" -> every data-free method (``fisher``
    needs Fisher folders, so it is named explicitly); "none" -> ()."""
    from dim3.methods import METHODS, get_method

    if text is None or text.strip() == "all":
        return tuple(name for name, m in METHODS.items() if not m.extra_inputs)
    if text.strip() == "none":
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        get_method(n)
    return names


def parse_options(values: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["dim3.calibration=0.8"]`` -> ``{"dim3": {"calibration": 0.8}}``."""
    from dim3.cli import parse_option

    out: dict[str, dict[str, Any]] = {}
    for text in values:
        method, sep, rest = text.partition(".")
        if not sep or "=" not in rest:
            raise ValueError(
                f"--option {text!r} is not METHOD.KEY=VALUE (e.g. dim3.calibration=0.8)"
            )
        key, value = parse_option(rest)
        out.setdefault(method, {})[key] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m dim3 eval``."""
    from dim3.benchmarks import BENCHMARKS

    parser.add_argument(
        "--probe", default="demo", help="'demo' (built-in probe set) or a JSONL probe file"
    )
    parser.add_argument(
        "--benchmark",
        default=None,
        choices=sorted(BENCHMARKS),
        help="a multilingual benchmark instead of the probe (reference prompt and metric)",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="the benchmark's dataset: Hub id (default: the benchmark's) or local folder",
    )
    parser.add_argument(
        "--languages",
        default=None,
        help="comma-separated languages (the dataset's splits; default: all of the benchmark's)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the per-language sample (benchmarks)"
    )
    for role in ("base", "multilingual", "multimodal"):
        several = " (repeat for several experts)" if role == "multilingual" else ""
        parser.add_argument(
            f"--{role}",
            default=None,
            action="append" if several else "store",
            help=f"the {role} checkpoint{several} (default: the demo trio's)",
        )
    parser.add_argument(
        "--methods", default=None, help="comma-separated merge methods, 'all' (default) or 'none'"
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="a method option, repeatable",
    )
    parser.add_argument(
        "--fisher",
        nargs="+",
        default=[],
        metavar="ROLE=FOLDER",
        help="Fisher folders for the fisher method (python -m dim3 fisher): multimodal=F "
        "multilingual=F (multilingual_1=F ... for several experts)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the results, with every question's prediction and gold, as JSON here",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="probe: the first N questions; benchmark: a seeded sample of N per language "
        f"(default {DEFAULT_LIMIT})",
    )


def _items(args: argparse.Namespace) -> tuple[str, tuple[Any, ...]]:
    """The benchmark's name and its items, from ``--benchmark`` or ``--probe``."""
    from dim3.benchmarks.sources import load_items

    languages = [x for x in (args.languages or "").split(",") if x.strip()]
    if getattr(args, "benchmark", None):
        limit = DEFAULT_LIMIT if args.limit is None else args.limit
        items = load_items(args.benchmark, args.dataset, languages, limit, args.seed)
        return args.benchmark, tuple(items)
    if args.dataset:
        raise ValueError("--dataset needs --benchmark (for a probe file, use --probe FILE)")
    items = load_items(PROBE, args.probe, languages, limit=None)
    if args.limit is not None:
        items = items[: args.limit]
    return PROBE.name, tuple(items)


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    """Resolve the question source and the checkpoints (demo defaults) into an :class:`EvalSpec`."""
    from dim3.cli import parse_fisher
    from dim3.demo import demo_trio

    roles = ("base", "multilingual", "multimodal")
    given = {r: getattr(args, r) for r in roles}
    if any(given.values()) and not all(given.values()):
        missing = [f"--{r}" for r in roles if not given[r]]
        raise ValueError(
            f"give all three checkpoints or none (for the demo trio); missing {', '.join(missing)}"
        )
    if not all(given.values()):
        given = dict(zip(roles, (str(p) for p in demo_trio()), strict=True))
    ml = given.pop("multilingual")
    given["multilingual"] = tuple(Source(r) for r in ([ml] if isinstance(ml, str) else ml))
    benchmark, items = _items(args)
    return EvalSpec(
        base=Source(given["base"]),
        multilingual=given["multilingual"],
        multimodal=Source(given["multimodal"]),
        items=items,
        methods=parse_methods(args.methods),
        options=parse_options(args.option),
        batch_size=args.batch_size,
        benchmark=benchmark,
        fisher=parse_fisher(getattr(args, "fisher", [])),
    )


def results_record(
    spec: EvalSpec,
    results: dict[str, dict[str, float]],
    metrics: dict[str, dict[str, dict[str, float]]],
    answers: dict[str, list[str]],
    **about: Any,
) -> dict[str, Any]:
    """The JSON results: scores per model (primary metric, then every metric) and, per question,
    its id, language, gold answer(s) and each model's prediction and scores."""
    bench = get_benchmark(spec.benchmark)
    rows = []
    for i, item in enumerate(spec.items):
        preds = {name: answers[name][i] for name in answers}
        scores = {name: bench.score(pred, item) for name, pred in preds.items()}
        rows.append(item.record() | {"predictions": preds, "scores": scores})
    return {
        "benchmark": bench.name,
        **about,
        "metric": bench.primary,
        "questions": len(spec.items),
        "models": results,
        "metrics": metrics,
        "items": rows,
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically (a temporary file moved into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def steady_seconds(marks: dict[str, Any], now: float, done: int, total: int) -> float | None:
    """Seconds per question of a model, from its second batch on: the first carries the first
    generation's set-up (the demo trio's quick look printed 7.6 minutes from it for a run of
    19 s). ``marks``: where the model started (``"model"``, a clock reading) and, kept here,
    where its first batch ended; ``now``: the clock as ``done`` of ``total`` are answered. None
    until the second batch ends, unless the first was all."""
    if "first" not in marks and done < total:
        marks["first"] = (now, done)
        return None
    since, before = marks.get("first", (marks["model"], 0))
    return (now - since) / max(1, done - before)


def run(args: argparse.Namespace) -> int:
    from dim3.cli import fetch

    spec = spec_from_args(args)
    bench = get_benchmark(spec.benchmark)
    fetch(spec.recipe("task_arithmetic"))  # the trio's downloads, sized together first
    start = time.perf_counter()
    names = [ORIGINAL, *spec.methods]
    timing: dict[str, float] = {}

    def progress(name: str, done: int, total: int) -> None:
        if name:
            timing["model"] = time.perf_counter()
            print(f"[{done + 1}/{total}] {name} ({time.perf_counter() - start:.0f}s)", flush=True)

    def items_done(name: str, done: int, total: int) -> None:
        if name != ORIGINAL or "per_item" in timing:
            return
        per_item = steady_seconds(timing, time.perf_counter(), done, total)
        if per_item is not None:
            timing["per_item"] = per_item
            est = per_item * total * len(names)
            print(
                f"  {per_item:.2g} s per question: about {est / 60:.1f} min for "
                f"{total} questions x {len(names)} models (merges not counted)",
                flush=True,
            )

    answers: dict[str, list[str]] = {}
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    results = evaluate_merges(
        spec, progress, answers=answers, metrics=metrics, item_progress=items_done
    )
    what = (
        "exact match in the question's language"
        if bench is PROBE
        else f"{bench.title} {bench.primary} (reference metric), seeded sample"
    )
    print(f"\n{len(spec.items)} questions; {what}\n")
    print(format_table(results))
    for metric in list(bench.metrics)[1:]:
        print(f"\n{metric}\n" + format_table({m: s[metric] for m, s in metrics.items()}))
    if args.json:
        about = {
            "dataset": getattr(args, "dataset", None)
            or (args.probe if bench is PROBE else bench.dataset)
        }
        if bench is not PROBE:
            about |= {"seed": args.seed, "limit_per_language": args.limit or DEFAULT_LIMIT}
        write_json(args.json, results_record(spec, results, metrics, answers, **about))
        print(f"\nwrote {args.json}")
    return 0
