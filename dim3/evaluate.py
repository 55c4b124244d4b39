"""``python -m dim3 eval``: accuracy of the original VLM and of every merge on a probe set.

For each model (the original VLM, then the VLM merged in memory by each method) the probe's
questions are answered by greedy decoding and judged by exact match of the answer in the
question's language (after trimming spaces and end punctuation, Unicode NFC and case folding).
Results are per language plus ``overall`` (all questions pooled). The probe is the built-in demo
set (``--probe demo``, with the demo trio as default checkpoints) or a user's JSONL file with any
three checkpoints. Merges use ``dim3.engine.merge_into_model``; between methods the VLM's loaded
weights are restored from an in-memory copy (so memory is twice the VLM's: fine for demo and
small models; for large ones, evaluate one method at a time).

This module knows probe files, generation and scoring; it knows nothing about Gradio.
"""

from __future__ import annotations

import argparse
import json
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dim3.probes import ProbeItem, load_probe
from dim3.recipe import Recipe, Source

END_PUNCTUATION = ".。!！?？,，;；:：\"'«»“”„()[]"
ORIGINAL = "original"


def normalise(text: str) -> str:
    """The form answers are compared in: NFC, trimmed of spaces and end punctuation, case-folded."""
    return unicodedata.normalize("NFC", text).strip().strip(END_PUNCTUATION).strip().casefold()


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match of ``prediction`` and ``answer`` after ``normalise``."""
    return normalise(prediction) == normalise(answer)


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
    """Tokenized prompts (left-padded) and pictures of ``items`` (all with or all without one)."""
    from dim3.chat import load_image

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
        inputs = processor(text=prompts, images=[load_image(it.image) for it in items], **kwargs)
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
    items: Sequence[ProbeItem],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 12,
) -> list[str]:
    """Greedy answers to ``items``, in order. ``processor``: a VLM processor or an LLM tokenizer.

    Items with and without a picture are batched apart; prompts use the model's chat template.
    """
    tokenizer = _tokenizer(processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: dict[int, str] = {}
    with_image = [i for i, it in enumerate(items) if it.image is not None]
    without = [i for i, it in enumerate(items) if it.image is None]
    for group in (with_image, without):
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            inputs = _batch_inputs(model, processor, [items[i] for i in chunk])
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(
                out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
            answers.update(zip(chunk, texts, strict=True))
    return [answers[i] for i in range(len(items))]


def evaluate_model(
    model: Any, processor: Any, items: Sequence[ProbeItem], batch_size: int = 64
) -> dict[str, float]:
    """Accuracy of ``model`` on ``items`` (per language + overall)."""
    return accuracy(items, generate_answers(model, processor, items, batch_size=batch_size))


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate: the checkpoints (one or more multilingual models), the methods (with
    options) and the probe items."""

    base: Source
    multilingual: tuple[Source, ...]
    multimodal: Source
    items: tuple[ProbeItem, ...]
    methods: tuple[str, ...]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 64
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
) -> dict[str, dict[str, float]]:
    """``{"original": {lang: acc, ..., "overall": acc}, method: {...}, ...}`` for ``spec``.

    Loads the VLM once (float32 on CPU, bfloat16 on CUDA), scores it, then for each method
    restores its weights, merges into it in memory and scores it again. ``allowed_roots``
    restricts local folders as in :func:`dim3.checkpoints.resolve` (None: any folder). When
    ``answers`` is a dict, each model's raw answers (in ``spec.items`` order) are put in it.
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
        predictions = generate_answers(model, processor, spec.items, batch_size=spec.batch_size)
        results[name] = accuracy(spec.items, predictions)
        if answers is not None:
            answers[name] = predictions
    _restore(model, loaded)
    if progress:
        progress("", len(names), len(names))
    return results


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
    parser.add_argument(
        "--probe", default="demo", help="'demo' (built-in probe set) or a JSONL probe file"
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
        "--json", type=Path, default=None, help="also write the results as JSON here"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--limit", type=int, default=None, help="use only the first N probe questions"
    )


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    """Resolve ``--probe`` and the checkpoints (demo defaults) into an :class:`EvalSpec`."""
    from dim3.cli import parse_fisher
    from dim3.demo import demo_probe_path, demo_trio

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
    items = load_probe(demo_probe_path() if args.probe == "demo" else args.probe)
    if args.limit is not None:
        items = items[: args.limit]
    return EvalSpec(
        base=Source(given["base"]),
        multilingual=given["multilingual"],
        multimodal=Source(given["multimodal"]),
        items=tuple(items),
        methods=parse_methods(args.methods),
        options=parse_options(args.option),
        batch_size=args.batch_size,
        fisher=parse_fisher(getattr(args, "fisher", [])),
    )


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    start = time.perf_counter()

    def progress(name: str, done: int, total: int) -> None:
        if name:
            print(f"[{done + 1}/{total}] {name} ({time.perf_counter() - start:.0f}s)", flush=True)

    results = evaluate_merges(spec, progress)
    print(f"\n{len(spec.items)} questions; exact match in the question's language\n")
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"models": results, "questions": len(spec.items)}, indent=1) + "\n"
        )
        print(f"\nwrote {args.json}")
    return 0
