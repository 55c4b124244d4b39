"""Measure the demo world over several seeds: ``python -m dim3.demo.report --seeds 0 1 2 --work DIR``.

For each seed: train the trio (or reuse ``DIR/seed{N}`` if it is already trained), then measure

- the text-only probe (each probe picture replaced by its description in the question's language)
  on the base and the multilingual LLM: does the multilingual model know every language?
- the picture probe on the original VLM and on the VLM merged by each registered method.

Also per model: accuracy on colour and on shape questions, and how often the answer is a word of
the question's language (right or wrong). Prints markdown tables of the mean and the spread
(min–max over seeds) per language, and writes every number to ``DIR/report.json``.

``--experts``: also train the language-group experts of each seed (``DIR/seed{N}/experts``, reused
if there) and compare, per method, the merge with the one multilingual model (row ``method``)
against the merge with the experts (row ``method+experts``), on the same probe; the text probe
adds the experts. Every number goes to ``DIR/experts_report.json``.

This module only orchestrates ``train`` and ``dim3.evaluate``.
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
from dim3.demo.train import (
    ExpertConfig,
    TrainConfig,
    train_all,
    train_experts,
    write_experts_manifest,
    write_manifest,
)

ROLES = ("base", "multilingual", "multimodal")
EXPERTS = "+experts"  # suffix of a method's row when it merged the experts


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


def train_seed_experts(seed: int, folder: Path) -> float:
    """Train seed ``seed``'s experts from ``folder/base`` unless recorded there; returns seconds."""
    path = folder / "manifest.json"
    config = ExpertConfig(seed=seed)
    recorded = json.loads(path.read_text()).get("experts", {}) if path.is_file() else {}
    if recorded.get("quick") is False and all(
        (folder / "experts" / g / "model.safetensors").is_file() for g in config.groups
    ):
        return 0.0
    start = time.perf_counter()
    timings = train_experts(config, folder)
    timings["total"] = time.perf_counter() - start
    write_experts_manifest(config, folder, timings, quick=False)
    return timings["total"]


def expert_folders(folder: Path) -> list[Path]:
    """The experts of the trio in ``folder``, in the order of their manifest's groups."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return [folder / "experts" / g for g in manifest["experts"]["config"]["groups"]]


def text_accuracy(folder: Path, items) -> dict[str, float]:
    """Accuracy of the LLM in ``folder`` on text-only probe items."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dim3.evaluate import evaluate_model

    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    return evaluate_model(model, AutoTokenizer.from_pretrained(folder), items)


def combined_text_accuracy(base: Path, experts: list[Path], mean: bool, items) -> dict[str, float]:
    """Text-probe accuracy of the experts merged as plain LLMs (no VLM): ``base + Σ Δ_i`` (task
    arithmetic, λ = 1) or, with ``mean``, ``base + mean Δ_i`` (their weight average). A check on
    whether the experts' updates compose at all before any VLM is involved."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dim3.evaluate import evaluate_model

    state = load_file(str(base / "model.safetensors"))
    deltas = [load_file(str(e / "model.safetensors")) for e in experts]
    scale = 1 / len(experts) if mean else 1.0
    merged = {k: w + scale * sum(d[k] - w for d in deltas) for k, w in state.items()}
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).eval()
    model.load_state_dict(merged)
    return evaluate_model(model, AutoTokenizer.from_pretrained(base), items)


def right_language(items, predictions) -> dict[str, float]:
    """Per language (+ overall): the share of answers that are a word of the question's kind in
    the question's language, right or wrong (e.g. "braun" to a German colour question)."""
    from dim3.benchmarks.metrics import normalise
    from dim3.evaluate import accuracy

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
    text_items = demo_probe_module.text_probe()
    text = {role: text_accuracy(folder / role, text_items) for role in ("base", "multilingual")}
    return {"text": text, **measure_merges(folder, (folder / "multilingual",), methods)}


def measure_experts(folder: Path, methods: tuple[str, ...]) -> dict:
    """As :func:`measure_seed`, plus each expert on the text probe and every method merged with
    the experts instead of the multilingual model (rows ``method+experts``, after ``method``)."""
    experts = expert_folders(folder)
    one = measure_seed(folder, methods)
    text_items = demo_probe_module.text_probe()
    for expert in experts:
        one["text"][f"expert {expert.name}"] = text_accuracy(expert, text_items)
    for label, mean in (("experts summed (LLM)", False), ("experts averaged (LLM)", True)):
        one["text"][label] = combined_text_accuracy(folder / "base", experts, mean, text_items)
    several = measure_merges(folder, tuple(experts), methods)
    out = {"text": one["text"]}
    for key, rows in several.items():
        out[key] = {"original": one[key]["original"]}
        for method in methods:
            out[key][method] = one[key][method]
            out[key][method + EXPERTS] = rows[method]
    return out


def measure_merges(folder: Path, multilingual: tuple[Path, ...], methods: tuple[str, ...]) -> dict:
    """Picture probe of the VLM in ``folder`` and of its merges with ``multilingual`` (one or
    several): accuracy, per question kind, and answers in the question's language."""
    from dim3.demo import demo_probe
    from dim3.evaluate import EvalSpec, accuracy, evaluate_merges

    items = tuple(demo_probe())
    spec = EvalSpec(
        base=str(folder / "base"),
        multilingual=tuple(str(m) for m in multilingual),
        multimodal=str(folder / "multimodal"),
        items=items,
        methods=methods,
    )
    answers: dict[str, list[str]] = {}
    out = {"image": evaluate_merges(spec, answers=answers)}
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


def experts_gain(per_seed: list[dict[str, dict[str, float]]], methods: tuple[str, ...]) -> str:
    """A markdown table per method: English, the other languages' mean and overall, with the one
    multilingual model and with the experts (means over seeds), the change in "others" (mean and
    min–max over seeds) and in how many seeds the experts did better there."""
    per_seed = [{m: with_others(a) for m, a in run.items()} for run in per_seed]
    head = "| method | en: one | en: experts | others: one | others: experts | Δ others | "
    lines = [head + "overall: one | overall: experts | seeds experts ahead |", "|---" * 9 + "|"]
    for method in methods:
        one = [run[method] for run in per_seed]
        several = [run[method + EXPERTS] for run in per_seed]
        cells = []
        for col in ("en", "others", "overall"):
            cells += [f"{statistics.fmean(r[col] for r in rs):.2f}" for rs in (one, several)]
            if col == "others":
                delta = [b[col] - a[col] for a, b in zip(one, several, strict=True)]
                cells.append(
                    f"{statistics.fmean(delta):+.2f} ({min(delta):+.2f}…{max(delta):+.2f})"
                )
        ahead = sum(b["others"] > a["others"] for a, b in zip(one, several, strict=True))
        cells.append(f"{ahead}/{len(one)}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES = {
    "image": "Picture probe (VLM and merges): accuracy",
    "colour": "Picture probe, colour questions only: accuracy",
    "shape": "Picture probe, shape questions only: accuracy",
    "right_language": "Picture probe: answers that are a word of the question's language and kind",
}


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
    parser.add_argument(
        "--experts",
        action="store_true",
        help="also train the language-group experts and compare every method merged with the "
        "one multilingual model vs with the experts (writes experts_report.json)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the seeds already measured in the work folder's report file and measure only "
        "the others (e.g. a seed run on another machine, its results copied in)",
    )
    args = parser.parse_args(argv)
    methods = parse_methods(args.methods)
    report = args.work / ("experts_report.json" if args.experts else "report.json")
    results: dict[int, dict] = {}
    if args.resume and report.is_file():
        kept = {int(k): v for k, v in json.loads(report.read_text()).items()}
        results = {seed: kept[seed] for seed in args.seeds if seed in kept}
    for seed in args.seeds:
        if seed in results:
            print(f"seed {seed}: kept from {report.name}", flush=True)
            continue
        folder = args.work / f"seed{seed}"
        seconds = train_seed(seed, folder)
        if args.experts:
            seconds += train_seed_experts(seed, folder)
        start = time.perf_counter()
        measure = measure_experts if args.experts else measure_seed
        results[seed] = {**measure(folder, methods), "train_seconds": round(seconds, 1)}
        results[seed]["eval_seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"seed {seed}: trained in {seconds:.0f}s, measured in {results[seed]['eval_seconds']:.0f}s",
            flush=True,
        )
        report.write_text(json.dumps(results, indent=1) + "\n")
    report.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")
    runs = [results[seed] for seed in args.seeds]
    print(f"\nText-only probe (LLMs), seeds {args.seeds}: mean (min–max)\n")
    print(summarise([r["text"] for r in runs]))
    for key, title in TABLES.items():
        print(f"\n{title}, seeds {args.seeds}: mean (min–max)\n")
        print(summarise([r[key] for r in runs]))
    if args.experts:
        measured = tuple(m for m in methods if all(m in r["image"] for r in runs))
        missing = [m for m in methods if m not in measured]
        print(f"\nOne multilingual model vs the experts, picture probe, seeds {args.seeds}\n")
        if missing:  # kept seeds measured before these methods existed
            print(f"(not measured in every seed, left out: {', '.join(missing)})\n")
        print(experts_gain([r["image"] for r in runs], measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
