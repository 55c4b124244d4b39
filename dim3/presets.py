"""Checkpoint presets: ready-made (base, multilingual, multimodal) trios the app offers.

This module knows model ids and what each setting is for. It does not download or check
anything: the engine's plan does that when the user asks. Hub ids were checked against the Hub's
public pages where possible; see ``Preset.note`` for what each trio assumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_KEY = "demo"


@dataclass(frozen=True)
class Preset:
    """A trio of checkpoints (Hub ids or local folders) and a one-line note for the UI."""

    key: str
    title: str
    base: str
    multilingual: str
    multimodal: str
    note: str

    def __post_init__(self) -> None:
        for role in ("base", "multilingual", "multimodal"):
            if not getattr(self, role):
                raise ValueError(f"preset {self.key!r} has no {role} checkpoint")


def demo_preset() -> Preset:
    """The built-in offline trio under ``assets/demo`` (small trained models, CPU-friendly)."""
    try:
        from dim3.demo import demo_trio

        base, ml, mm = demo_trio()
    except (ImportError, FileNotFoundError):  # not trained yet: the merge will say so
        base, ml, mm = (ASSETS / "demo" / name for name in ("base", "multilingual", "multimodal"))
    return Preset(
        DEMO_KEY,
        "Built-in demo trio (offline, CPU, seconds)",
        str(base),
        str(ml),
        str(mm),
        "Tiny Llama + LLaVA models trained on a toy world of coloured shapes: the VLM learned "
        "English questions only, the multilingual LM eight languages.",
    )


_HUB_PRESETS = (
    Preset(
        "llava-1.5-7b-emma",
        "Paper: LLaVA-1.5-7B + EMMA-500 Llama-2-7B (GPU, ~14 GB per model)",
        base="meta-llama/Llama-2-7b-hf",
        multilingual="MaLA-LM/emma-500-llama2-7b",
        multimodal="llava-hf/llava-1.5-7b-hf",
        note="The paper's main setting. Llama-2 is gated: accept its licence on the Hub and "
        "set HF_TOKEN. EMMA-500 continues Llama-2-7B's pretraining on 500+ languages.",
    ),
    Preset(
        "qwen2-vl-7b-seallm",
        "Qwen2-VL-7B-Instruct + SeaLLMs-v3-7B-Chat (GPU, ~16 GB per model)",
        base="Qwen/Qwen2-7B",
        multilingual="SeaLLMs/SeaLLMs-v3-7B-Chat",
        multimodal="Qwen/Qwen2-VL-7B-Instruct",
        note="Qwen2-VL's language model starts from Qwen2-7B; SeaLLMs-v3 continues Qwen2 on "
        "Southeast Asian languages (Check plan confirms they share the base). Needs torchvision "
        "for Qwen2-VL's processor.",
    ),
    Preset(
        "qwen2-vl-2b-seallm",
        "Small: Qwen2-VL-2B-Instruct + SeaLLMs-v3-1.5B (fits a free 16 GB GPU)",
        base="Qwen/Qwen2-1.5B",
        multilingual="SeaLLMs/SeaLLMs-v3-1.5B",
        multimodal="Qwen/Qwen2-VL-2B-Instruct",
        note="About 4.5 GB per VLM in bf16, so original + merged fit a T4 or ZeroGPU slice. "
        "Needs torchvision for Qwen2-VL's processor.",
    ),
)


def presets() -> dict[str, Preset]:
    """All presets by key, the offline demo first."""
    return {p.key: p for p in (demo_preset(), *_HUB_PRESETS)}


def get_preset(key: str) -> Preset:
    """The preset ``key``; an unknown key lists the valid ones."""
    table = presets()
    try:
        return table[key]
    except KeyError:
        raise ValueError(f"unknown preset {key!r}; valid presets: {', '.join(table)}") from None
