"""Fisher-weighted merging on the demo world, over seeds: ``python benchmarks/fisher_demo.py``.

For each seed: the demo trio and its language-group experts (``--committed`` takes seed 0 from
``assets/demo``; other seeds are trained into ``WORK/seed{N}`` by ``dim3.demo.report``'s
functions, or reused when already there), then the diagonal Fisher of the VLM, the multilingual
model and each expert (``--data demo``, empirical labels, the seed's own sample), then the picture
probe (its first ``--limit`` questions) on the original VLM and on the VLM merged by task
arithmetic, TIES, DiM3 and Fisher-weighted averaging, with the one multilingual model (the trio)
and with the experts. Prints the mean and min–max over seeds per language and writes every number
to ``WORK/fisher_demo.json`` (a finished seed is reused by a rerun).

    python benchmarks/fisher_demo.py --seeds 0 1 2 --work /tmp/fd --committed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install

from dim3.demo import DEMO_DIR, demo_probe
from dim3.demo.report import expert_folders, summarise, train_seed, train_seed_experts
from dim3.evaluate import EvalSpec, evaluate_merges
from dim3.fisher import FisherSpec, estimate_to_folder
from dim3.recipe import Source

METHODS = ("task_arithmetic", "ties", "dim3", "fisher")


def seed_folder(seed: int, work: Path, committed: bool) -> tuple[Path, float]:
    """The seed's trio (with experts), trained unless there; (folder, training seconds)."""
    if committed and seed == 0:
        manifest = json.loads((DEMO_DIR / "manifest.json").read_text())
        assert manifest["config"]["seed"] == 0, "assets/demo is not seed 0"
        return DEMO_DIR, 0.0
    folder = work / f"seed{seed}"
    return folder, train_seed(seed, folder) + train_seed_experts(seed, folder)


def fisher_of(model: Path, out: Path, n: int, seed: int) -> tuple[str, float]:
    """A Fisher folder of ``model`` (estimated unless already there); (folder, seconds)."""
    if (out / "fisher.json").is_file():
        return str(out), 0.0
    start = time.perf_counter()
    spec = FisherSpec(Source(str(model)), data="demo", n=n, seed=seed, device="cpu")
    estimate_to_folder(spec, out)
    return str(out), time.perf_counter() - start


def run_seed(seed: int, work: Path, args: argparse.Namespace) -> dict:
    folder, trained = seed_folder(seed, work, args.committed)
    experts = expert_folders(folder)
    fishers = work / f"fishers{seed}"
    seconds: dict[str, float] = {"training": trained}
    mm, seconds["fisher multimodal"] = fisher_of(
        folder / "multimodal", fishers / "mm", args.n, seed
    )
    ml, seconds["fisher multilingual"] = fisher_of(
        folder / "multilingual", fishers / "ml", args.n, seed
    )
    ex = []
    for i, e in enumerate(experts, 1):
        f, seconds[f"fisher expert {e.name}"] = fisher_of(e, fishers / f"e{i}", args.expert_n, seed)
        ex.append(f)
    items = tuple(demo_probe())[: args.limit]
    out: dict = {"seed": seed, "folder": str(folder), "seconds": seconds}
    runs = {
        "trio": ((folder / "multilingual",), {"multimodal": mm, "multilingual": ml}),
        "experts": (
            tuple(experts),
            {"multimodal": mm} | {f"multilingual_{i}": f for i, f in enumerate(ex, 1)},
        ),
    }
    for name, (multilingual, fisher) in runs.items():
        start = time.perf_counter()
        spec = EvalSpec(
            base=str(folder / "base"),
            multilingual=tuple(str(m) for m in multilingual),
            multimodal=str(folder / "multimodal"),
            items=items,
            methods=METHODS,
            fisher=fisher,
        )
        out[name] = evaluate_merges(spec)
        seconds[f"eval {name}"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--committed", action="store_true", help="seed 0 from assets/demo")
    parser.add_argument("--n", type=int, default=128, help="Fisher examples: VLM, multilingual")
    parser.add_argument("--expert-n", type=int, default=32, help="Fisher examples per expert")
    parser.add_argument("--limit", type=int, default=960, help="probe questions (first N)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "fisher_demo.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    keep = {"n": args.n, "expert_n": args.expert_n, "limit": args.limit}
    if done.get("settings") != keep:
        done = {"settings": keep, "seeds": {}}
    for seed in args.seeds:
        if str(seed) not in done["seeds"]:
            print(f"seed {seed}…", flush=True)
            done["seeds"][str(seed)] = run_seed(seed, args.work, args)
            path.write_text(json.dumps(done, indent=1))
        print(f"seed {seed}: {done['seeds'][str(seed)]['seconds']}", flush=True)
    runs = [done["seeds"][str(s)] for s in args.seeds]
    for name in ("trio", "experts"):
        print(f"\n{name}, seeds {' '.join(map(str, args.seeds))}, first {args.limit} questions:\n")
        print(summarise([r[name] for r in runs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
