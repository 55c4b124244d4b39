"""How far the demo's quick training lands from a reference when only floating-point rounding
differs: the measured spread behind the tolerance of ``tests/test_demo.py``'s fingerprint tests.

    python benchmarks/demo_fingerprint_spread.py                       # this torch vs the committed manifest
    python benchmarks/demo_fingerprint_spread.py --threads 1            # + a 1-thread run (other reduction splits)
    python benchmarks/demo_fingerprint_spread.py --write-manifest FILE  # save this run's manifest

It trains the ``--quick`` trio and experts (seed of the committed quick manifest) in a temporary
folder and prints, per statistic (sum, sum of |x|, index-weighted sum), the largest deviation from
the reference in units of the tensor's sum of |x| (the test's measure), separately for tensors
whose gradient is zero in exact arithmetic (attention key biases: softmax ignores a constant
added to every logit of a query, so Adam drives them by rounding noise alone).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dim3.demo import train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "assets" / "demo" / "quick_manifest.json"
STATS = ("sum", "abs_sum", "weighted_sum")


def zero_gradient(key: str) -> bool:
    """Attention key biases: their exact gradient is zero (softmax is shift invariant)."""
    return key.endswith("k_proj.bias")


def quick_manifest(threads: int | None) -> dict:
    """Train the quick trio + experts as the test does; return the manifest the script writes."""
    committed = json.loads(COMMITTED.read_text())
    if threads:
        train.THREADS = threads
    out = Path(tempfile.mkdtemp(prefix="dim3-spread-"))
    try:
        config = dataclasses.replace(train.QUICK, seed=committed["config"]["seed"])
        experts = dataclasses.replace(
            train.QUICK_EXPERTS, seed=committed["experts"]["config"]["seed"]
        )
        timings = train.train_all(config, out)
        train.write_manifest(config, out, timings, quick=True)
        timings = train.train_experts(experts, out)
        train.write_experts_manifest(experts, out, timings, quick=True)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["command"] = committed["command"]
        manifest["experts"]["command"] = committed["experts"]["command"]
        return manifest
    finally:
        shutil.rmtree(out, ignore_errors=True)


def models(manifest: dict) -> dict[str, dict]:
    out = dict(manifest["fingerprints"])
    out.update({f"experts/{g}": f for g, f in manifest["experts"]["fingerprints"].items()})
    return out


def spread(ours: dict, ref: dict) -> dict[str, tuple[float, str]]:
    """Largest |ours - ref| / sum|x| per group of tensors, with the tensor that reached it."""
    worst: dict[str, tuple[float, str]] = {"ordinary": (0.0, ""), "zero-gradient": (0.0, "")}
    for model, tensors in models(ours).items():
        for key, fp in tensors.items():
            theirs = models(ref)[model][key]
            dev = max(abs(fp[s] - theirs[s]) / (abs(theirs["abs_sum"]) + 1e-6) for s in STATS)
            group = "zero-gradient" if zero_gradient(key) else "ordinary"
            if dev > worst[group][0]:
                worst[group] = (dev, f"{model}: {key}")
    return worst


def report(title: str, ours: dict, ref: dict) -> None:
    print(
        f"{title} (torch {ours['torch']}, {ours['threads']} threads vs torch {ref['torch']}, "
        f"{ref['threads']} threads):"
    )
    for group, (dev, where) in spread(ours, ref).items():
        print(f"  {group:>13}: max deviation {dev:.3e} x sum|x|  ({where or '-'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="also train with N threads")
    parser.add_argument(
        "--reference", type=Path, default=COMMITTED, help="manifest to compare with"
    )
    parser.add_argument(
        "--write-manifest", type=Path, default=None, help="save this run's manifest"
    )
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.1f}")
    reference = json.loads(args.reference.read_text())
    ours = quick_manifest(None)
    report("this run vs reference", ours, reference)
    if args.threads:
        other = quick_manifest(args.threads)
        report(f"{args.threads}-thread run vs this run", other, ours)
    if args.write_manifest:
        args.write_manifest.write_text(json.dumps(ours, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.write_manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
