"""``python -m dim3 sweep``: a grid of one method's options, scored per language on a probe.

Each grid point is merged in memory and answers the probe (as ``python -m dim3 eval``). The
probe is cut once into a **tuning half** and a **reporting half** (:func:`dim3.probes.split_units`:
by picture, seeded, fixed): the best setting is *selected* on the tuning half only and *reported*
on the other half, so the reported figure is not the maximum of many noisy ones. The original
VLM, the method at its default options and (optionally) the other methods at their defaults are
scored beside the grid, as reference points.

Memory: one VLM is loaded, and nothing else model-sized. The original is scored first; then each
setting is merged into that same model in place with ``dim3.engine.merge_into_model``, which
recomputes every merged language-model tensor from the three checkpoints (it reads the VLM's
own tensors from disk, not from the model). So no pristine copy of the language model is needed:
re-reading is leaner than a CPU copy (zero extra bytes against the language model's size), at
the cost of reading the checkpoints once per point, which a merge does anyway. Peak memory is
the VLM plus the few tensors the engine holds at a time (``benchmarks/sweep_memory.py``).

This module knows grids, the split and the selection; nothing about Gradio.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dim3.evaluate import accuracy, generate_answers
from dim3.methods import METHODS, get_method
from dim3.probes import SPLIT_SEED, ProbeItem, load_probe, split_units

ENGLISH = "en"
SELECT_RULES = ("mean", "others", "overall")
ORIGINAL = "original"
MAX_POINTS = 200  # grid points one sweep may score


def parse_grid(values: Sequence[str]) -> dict[str, list[Any]]:
    """``["density=0.1,0.2", "scaling=1"]`` -> ``{"density": [0.1, 0.2], "scaling": [1]}``."""
    from dim3.cli import parse_option

    grid: dict[str, list[Any]] = {}
    for text in values:
        if "=" not in text:
            raise ValueError(f"--option {text!r} is not KEY=V1,V2,... (e.g. density=0.1,0.2)")
        key, raw = (part.strip() for part in text.split("=", 1))
        if not key or not raw.strip(", "):
            raise ValueError(f"--option {text!r} has no key or no values; write KEY=V1,V2,...")
        if key in grid:
            raise ValueError(f"option {key!r} is given twice; list all its values in one --option")
        texts = [v.strip() for v in raw.split(",") if v.strip()]
        if len(texts) > MAX_POINTS:  # counted before any value is parsed
            raise ValueError(
                f"option {key[:40]!r} has {len(texts):,} values; a grid has at most {MAX_POINTS} "
                "points"
            )
        grid[key] = [parse_option(f"{key}={v}")[1] for v in texts]
    return grid


def grid_points(
    method: str, grid: dict[str, list[Any]], fixed: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every combination of ``grid`` over ``fixed``, each checked by the method's options class
    (an unknown key or a value out of range fails here, before any model is loaded)."""
    m = get_method(method)
    keys = list(grid)
    count = math.prod(len(grid[k]) for k in keys)  # before any point is built
    if count > MAX_POINTS:
        sizes = " × ".join(str(len(grid[k])) for k in keys)
        raise ValueError(
            f"the grid has {sizes} = {count:,} points; keep it to at most {MAX_POINTS} "
            "(fewer values per option)"
        )
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        options = dict(fixed or {}) | dict(zip(keys, combo, strict=True))
        try:
            m.make_options(options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"grid point {options} of {method}: {exc}") from None
        points.append(options)
    return points


def full_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``method`` with its value (defaults filled in)."""
    return dataclasses.asdict(get_method(method).make_options(options))


def scores(items: Sequence[ProbeItem], predictions: Sequence[str]) -> dict[str, float]:
    """Per-language accuracy, ``overall`` (pooled), ``mean`` (over languages) and ``others``
    (mean over the languages other than English)."""
    acc = accuracy(items, predictions)
    langs = [k for k in acc if k != "overall"]
    acc["mean"] = sum(acc[k] for k in langs) / len(langs)
    others = [acc[k] for k in langs if k != ENGLISH]
    acc["others"] = sum(others) / len(others) if others else float("nan")
    return acc


@dataclass
class SweepPoint:
    """One scored model: the original, a reference method at its defaults, or a grid setting."""

    label: str
    kind: str  # "original", "reference", "default" or "grid"
    method: str
    options: dict[str, Any]
    tuning: dict[str, float]
    report: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep: the recipe (sources, method, fixed options), the grid and the probe."""

    recipe: Any
    grid: dict[str, list[Any]]
    items: tuple[ProbeItem, ...]
    references: tuple[str, ...] = ()
    select: str = "mean"
    split_seed: int = SPLIT_SEED
    batch_size: int = 64
    points: list[dict[str, Any]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.select not in SELECT_RULES and not self.select.startswith("lang:"):
            raise ValueError(
                f"selection rule {self.select!r} is not one of {', '.join(SELECT_RULES)}, lang:CODE"
            )
        if not self.items:
            raise ValueError("the probe set is empty: give at least one question")
        for name in self.references:
            get_method(name)
        method = self.recipe.method
        default = full_options(method, {})
        points = grid_points(method, self.grid, self.recipe.options)
        # a grid point equal to the defaults is the "default" point, scored once
        points = [p for p in points if full_options(method, p) != default]
        object.__setattr__(self, "points", points)
        split_units(self.items, self.split_seed)  # too small a probe fails here

    def total(self) -> int:
        """Models to score: original, references, default, grid points."""
        return 2 + len(self.references) + len(self.points)


def label(method: str, options: dict[str, Any], grid_keys: Sequence[str]) -> str:
    """``ties density=0.2 scaling=1`` (the grid's keys only)."""
    shown = " ".join(f"{k}={options[k]}" for k in grid_keys if k in options)
    return f"{method} {shown}".strip()


def iter_sweep(
    spec: SweepSpec,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    costs: Callable[[str, float, float], None] | None = None,
) -> Iterator[SweepPoint]:
    """Score the original, the references, the method's default and every grid point, yielding
    each :class:`SweepPoint` as it is done (the VLM loaded once, merged in place each time).

    ``costs(method, merge_seconds, answer_seconds)`` is told each point's measured cost (method
    "" and merge 0 for the original), for time estimates."""
    from dim3.chat import load_vlm
    from dim3.checkpoints import resolve
    from dim3.engine import merge_into_model, resolve_device

    recipe = spec.recipe
    tune, report = split_units(spec.items, spec.split_seed)
    halves = ([spec.items[i] for i in tune], [spec.items[i] for i in report])
    device = resolve_device(recipe.device).type
    folder = resolve(
        recipe.multimodal.ref, recipe.multimodal.revision, allowed_roots=allowed_roots, token=token
    )
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, processor = load_vlm(
        folder, dtype=dtype, device_map=None if device == "cpu" else {"": device}
    )

    def score(name: str, kind: str, method: str, options: dict[str, Any]) -> SweepPoint:
        start = time.perf_counter()
        if kind != "original":
            r = dataclasses.replace(recipe, method=method, options=options)
            merge_into_model(model, r, allowed_roots=allowed_roots, token=token)
        merged = time.perf_counter()
        preds = generate_answers(model, processor, spec.items, batch_size=spec.batch_size)
        if costs:
            costs(method, merged - start, time.perf_counter() - merged)
        split = ([preds[i] for i in tune], [preds[i] for i in report])
        return SweepPoint(
            name,
            kind,
            method,
            full_options(method, options) if method else {},
            scores(halves[0], split[0]),
            scores(halves[1], split[1]),
        )

    yield score(ORIGINAL, "original", "", {})  # before any merge touches the model
    for name in spec.references:
        yield score(f"{name} (default)", "reference", name, {})
    keys = list(spec.grid)
    yield score(f"{recipe.method} (default)", "default", recipe.method, {})
    for options in spec.points:
        yield score(label(recipe.method, options, keys), "grid", recipe.method, options)


def objective(point: SweepPoint, rule: str, half: str = "tuning") -> float:
    """The figure a selection rule maximises: ``mean``, ``others``, ``overall`` or ``lang:xx``."""
    accs = getattr(point, half)
    return accs.get(rule.removeprefix("lang:"), float("nan"))


def select(points: Sequence[SweepPoint], rule: str) -> SweepPoint:
    """The method's setting (grid or default) with the best tuning-half ``rule``; ties go to the
    earlier point (the default first)."""
    candidates = [p for p in points if p.kind in ("default", "grid")]
    return max(candidates, key=lambda p: objective(p, rule))


def summary(spec: SweepSpec, points: Sequence[SweepPoint]) -> dict[str, Any]:
    """The JSON of a sweep: every point's per-language accuracy on both halves, the choice."""
    tune, report = split_units(spec.items, spec.split_seed)
    chosen = select(points, spec.select)
    default = next(p for p in points if p.kind == "default")
    return {
        "method": spec.recipe.method,
        "grid": spec.grid,
        "fixed_options": spec.recipe.options,
        "select": spec.select,
        "split": {
            "seed": spec.split_seed,
            "unit": "picture (text-only: n-th question of each language)",
            "tuning_questions": len(tune),
            "report_questions": len(report),
        },
        "questions": len(spec.items),
        "points": [p.to_json() for p in points],
        "chosen": {
            "label": chosen.label,
            "options": chosen.options,
            "tuning": chosen.tuning,
            "report": chosen.report,
        },
        "default": {"label": default.label, "options": default.options, "report": default.report},
    }


def pareto_figure(points: Sequence[SweepPoint], half: str = "tuning", chosen: str | None = None):
    """English accuracy (x) against the mean of the other languages (y), one point per model;
    the Pareto front of the grid joined by a line, the chosen setting ringed
    (``dim3.plots.pareto_figure``: the same figure in the app and the CLI's PNG)."""
    from dim3 import plots

    return plots.pareto_figure(points, half, chosen, english=ENGLISH)


def format_table(points: Sequence[SweepPoint], rule: str) -> str:
    """One row per model: English, others and the rule's figure on both halves."""
    width = max(len(p.label) for p in points) + 2
    head = f"{'model':<{width}}{'tune en':>9}{'others':>8}{rule:>8}{'report en':>11}{'others':>8}{rule:>8}"
    lines = [head]
    for p in points:
        t, r = p.tuning, p.report
        lines.append(
            f"{p.label:<{width}}{t.get(ENGLISH, float('nan')):>9.3f}{t['others']:>8.3f}"
            f"{objective(p, rule):>8.3f}{r.get(ENGLISH, float('nan')):>11.3f}{r['others']:>8.3f}"
            f"{objective(p, rule, 'report'):>8.3f}"
        )
    return "\n".join(lines)


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m dim3 sweep`` (checkpoints and method as for ``merge``)."""
    from dim3.cli import add_method_arguments, add_source_arguments

    add_source_arguments(parser, required=False)
    add_method_arguments(parser)
    axis = parser._option_string_actions["--option"]  # here each --option is a grid axis
    axis.metavar, axis.help = "KEY=V1,V2,...", "an axis of the grid of options, repeatable"
    parser.add_argument(
        "--probe", default="demo", help="'demo' (built-in probe set) or a JSONL probe file"
    )
    parser.add_argument("--json", type=Path, required=True, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="also a Pareto plot PNG here")
    parser.add_argument(
        "--references",
        default="all",
        help="other methods scored at their defaults: 'all' (default), 'none' or a list",
    )
    parser.add_argument(
        "--select",
        default="mean",
        help="what the tuning half maximises: mean (over languages), others (non-English "
        "mean), overall, or lang:CODE",
    )
    parser.add_argument("--split-seed", type=int, default=SPLIT_SEED)
    parser.add_argument(
        "--per-language", type=int, default=0, help="first N questions per language (0 = all)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """Checkpoints (demo trio by default), grid, probe and rule -> a checked :class:`SweepSpec`."""
    from dim3.cli import recipe_from_args
    from dim3.demo import demo_probe_path
    from dim3.evaluate import parse_methods
    from dim3.represent import demo_defaults

    grid = parse_grid(args.option)
    demo_defaults(args)
    fixed = argparse.Namespace(**(vars(args) | {"option": []}))
    recipe = recipe_from_args(fixed)  # sources, method, DiM3 flags as fixed options
    items = load_probe(demo_probe_path() if args.probe == "demo" else args.probe)
    refs = () if args.references.strip() == "none" else parse_methods(args.references)
    return SweepSpec(
        recipe,
        grid,
        tuple(first_per_language(items, args.per_language)),
        references=tuple(m for m in refs if m != recipe.method),
        select=args.select,
        split_seed=args.split_seed,
        batch_size=args.batch_size,
    )


def first_per_language(items: Sequence[ProbeItem], n: int) -> list[ProbeItem]:
    """The first ``n`` questions of each language (all of them when ``n`` is 0)."""
    if n <= 0:
        return list(items)
    seen: dict[str, int] = {}
    kept = []
    for item in items:
        seen[item.language] = seen.get(item.language, 0) + 1
        if seen[item.language] <= n:
            kept.append(item)
    return kept


def run(args: argparse.Namespace) -> int:
    from dim3.cli import fetch

    spec = spec_from_args(args)
    fetch(spec.recipe)  # the trio's downloads, sized together first
    start = time.perf_counter()
    points = []
    for i, point in enumerate(iter_sweep(spec)):
        points.append(point)
        print(
            f"[{i + 1}/{spec.total()}] {point.label}: tuning {spec.select} "
            f"{objective(point, spec.select):.3f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    result = summary(spec, points)
    print("\n" + format_table(points, spec.select))
    chosen = result["chosen"]
    print(
        f"\nchosen on the tuning half: {chosen['label']}; on the reporting half: "
        f"{spec.select} {objective(select(points, spec.select), spec.select, 'report'):.3f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    if args.plot:
        from dim3.plots import save

        save(pareto_figure(points, chosen=chosen["label"]), args.plot)
        print(f"wrote {args.plot}")
    return 0


__all__ = ["METHODS", "SweepPoint", "SweepSpec", "iter_sweep", "parse_grid", "select"]
