"""The built-in demo world: three small trained models (base, multilingual, multimodal) + a probe set.

The checkpoints live in ``assets/demo/{base,multilingual,multimodal}`` (made by
``python -m dim3.demo.train --out assets/demo``); the probe set in ``assets/demo/probe``. This
package's ``__init__`` only locates them; ``world``, ``data``, ``build``, ``train`` and ``probe``
hold the world, the training data, the model parts, the training script and the probe format.
"""

from __future__ import annotations

from pathlib import Path

from dim3.demo.probe import ProbeError, ProbeItem, load_probe

DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo"
ROLES = ("base", "multilingual", "multimodal")

__all__ = [
    "DEMO_DIR",
    "ProbeError",
    "ProbeItem",
    "demo_probe",
    "demo_probe_path",
    "demo_trio",
    "load_probe",
]


def demo_trio() -> tuple[Path, Path, Path]:
    """The demo's (base, multilingual, multimodal) checkpoint folders; raises if one is missing."""
    folders = tuple(DEMO_DIR / role for role in ROLES)
    missing = [str(f) for f in folders if not (f / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"demo checkpoints missing: {missing}; train them with "
            "`python -m dim3.demo.train --out assets/demo`"
        )
    return folders  # type: ignore[return-value]


def demo_probe_path() -> Path:
    """The demo probe file (JSONL; pictures in ``images/`` beside it)."""
    path = DEMO_DIR / "probe" / "probe.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"demo probe set missing at {path}; write it with "
            "`python -c 'from dim3.demo.probe import write_demo_probe as w; "
            'from dim3.demo import DEMO_DIR; w(DEMO_DIR / "probe")\'`'
        )
    return path


def demo_probe() -> list[ProbeItem]:
    """The demo probe set: every picture x question kind x language, with answers."""
    return load_probe(demo_probe_path())
