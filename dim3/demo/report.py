"""Measure the demo world over several seeds: ``python -m dim3.demo.report --seeds 0 1 2 --work DIR``.

For each seed: train the trio (or reuse ``DIR/seed{N}`` if it is already trained), then measure

- the text-only probe (each probe picture replaced by its description in the question's language)
  on the base and the multilingual LLM: does the multilingual model know every language?
- the picture probe on the original VLM and on the VLM merged by each registered method.

Also per model: accuracy on colour and on shape questions, and how often the answer is a word of
the question's language (right or wrong). Prints markdown tables of the mean and the spread
(min–max over seeds) per language, and writes every number to ``DIR/report.json``. This module only orchestrates ``train`` and ``dim3.evaluate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from dim3.demo import probe as demo_probe_module
from dim3.demo import world
from dim3.demo.train import TrainConfig, train_all, write_manifest

ROLES = ("base", "multilingual", "multimodal")


def train_seed(seed: int, folder: Path) -> float:
    """Train seed ``seed`` into ``folder`` unless already there; returns training seconds (0 if reused)."""
    if (folder / "manifest.json").is_file():
        return 0.0
    folder.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(seed=seed)
    start = time.perf_counter()
    timings = train_all(config, folder)
    timings["total"] = time.perf_counter() - start
    write_manifest(config, folder, timings, quick=False)
    return timings["total"]


def text_accuracy(folder: Path, items) -> dict[str, float]:
    """Accuracy of the LLM in ``folder`` on text-only probe items."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dim3.evaluate import evaluate_model

    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    return evaluate_model(model, AutoTokenizer.from_pretrained(folder), items)


def right_language(items, predictions) -> dict[str, float]:
    """Per language (+ overall): the share of answers that are a word of the question's kind in
    the question's language, right or wrong (e.g. "braun" to a German colour question)."""
    from dim3.evaluate import accuracy, normalise

    def vocabulary(language: str, kind: str) -> set[str]:
        concepts = world.COLOURS if kind == "colour" else world.SHAPES
        return {normalise(world.WORDS[language][c]) for c in concepts}

    hits = [
        "x" if normalise(p) in vocabulary(it.language, it.kind) else ""
        for it, p in zip(items, predictions, strict=True)
    ]
    return accuracy([dataclasses.replace(it, answer="x") for it in items], hits)


def measure_seed(folder: Path, methods: tuple[str, ...]) -> dict:
    """Text probe of base + multilingual and picture probe of the VLM and its merges.

    Besides accuracy per language, records for each model the accuracy on colour and on shape
    questions and how often it answers with a word of the question's language.
    """
    from dim3.demo import demo_probe
    from dim3.evaluate import EvalSpec, accuracy, evaluate_merges

    text_items = demo_probe_module.text_probe()
    text = {role: text_accuracy(folder / role, text_items) for role in ("base", "multilingual")}
    items = tuple(demo_probe())
    spec = EvalSpec(*(str(folder / r) for r in ROLES), items=items, methods=methods)
    answers: dict[str, list[str]] = {}
    out = {"text": text, "image": evaluate_merges(spec, answers=answers)}
    out["right_language"] = {m: right_language(items, a) for m, a in answers.items()}
    for kind in world.QUESTION_KINDS:
        keep = [i for i, it in enumerate(items) if it.kind == kind]
        out[kind] = {
            m: accuracy([items[i] for i in keep], [a[i] for i in keep]) for m, a in answers.items()
        }
    return out


def with_others(accs: dict[str, float]) -> dict[str, float]:
    """``accs`` plus ``others``: the mean over the non-English languages (before ``overall``)."""
    languages = [k for k in accs if k not in ("en", "overall")]
    out = {k: v for k, v in accs.items() if k != "overall"}
    out["others"] = statistics.fmean(accs[k] for k in languages)
    out["overall"] = accs["overall"]
    return out


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> str:
    """A markdown table: rows = models, columns = languages; cells 'mean (min–max)' over seeds."""
    per_seed = [{m: with_others(a) for m, a in run.items()} for run in per_seed]
    models = list(per_seed[0])
    columns = list(per_seed[0][models[0]])
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model in models:
        cells = []
        for col in columns:
            values = [run[model][col] for run in per_seed]
            mean = statistics.fmean(values)
            cells.append(
                f"{mean:.2f}"
                if len(values) == 1
                else f"{mean:.2f} ({min(values):.2f}–{max(values):.2f})"
            )
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dim3.evaluate import parse_methods

    parser = argparse.ArgumentParser(
        prog="python -m dim3.demo.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--work", type=Path, required=True, help="folder for the seeds' trios and report.json"
    )
    parser.add_argument(
        "--methods", default=None, help="comma-separated methods (default: all registered)"
    )
    args = parser.parse_args(argv)
    methods = parse_methods(args.methods)
    results = {}
    for seed in args.seeds:
        folder = args.work / f"seed{seed}"
        seconds = train_seed(seed, folder)
        start = time.perf_counter()
        results[seed] = {**measure_seed(folder, methods), "train_seconds": round(seconds, 1)}
        results[seed]["eval_seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"seed {seed}: trained in {seconds:.0f}s, measured in {results[seed]['eval_seconds']:.0f}s",
            flush=True,
        )
        (args.work / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    runs = list(results.values())
    print(f"\nText-only probe (LLMs), seeds {args.seeds}: mean (min–max)\n")
    print(summarise([r["text"] for r in runs]))
    tables = {
        "image": "Picture probe (VLM and merges): accuracy",
        "colour": "Picture probe, colour questions only: accuracy",
        "shape": "Picture probe, shape questions only: accuracy",
        "right_language": "Picture probe: answers that are a word of the question's language and kind",
    }
    for key, title in tables.items():
        print(f"\n{title}, seeds {args.seeds}: mean (min–max)\n")
        print(summarise([r[key] for r in runs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
