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
    family: str = ""  # the VLM's model_type
    gigabytes: float = 0.0  # the VLM's weights in bf16 (each of the two loaded for chat)
    tested: str = ""  # what this project ran on this trio; "" = never run with real weights

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


def _family(
    key: str,
    family: str,
    base: str,
    multilingual: str,
    multimodal: str,
    gigabytes: float,
    gpu: str,
    note: str,
    tested: str = "",
) -> Preset:
    """A family's real trio; its title says the VLM, the GPU it needs and that it is untested."""
    mark = "" if tested else ", untested"
    title = f"{family}: {multimodal.split('/')[-1]} + {multilingual.split('/')[-1]} ({gpu}{mark})"
    shown = tested or "not run with real weights here: only tiny models of the family"
    return Preset(
        key,
        title,
        base,
        multilingual,
        multimodal,
        f"{note} About {gigabytes:g} GB per VLM in bf16. Tested: {shown}.",
        family,
        gigabytes,
        tested,
    )


# One real trio per family that docs/families.md lists. Hub ids as their model cards give them;
# "untested": nobody ran these weights here (no Hub access, no GPU), only tiny trios of the class
# and, where marked, header-true copies of the real files. Check plan verifies a trio first.
FAMILY_PRESETS = (
    _family(
        "qwen3-vl-8b-basque",
        "qwen3_vl",
        "Qwen/Qwen3-8B-Base",
        "HiTZ/eu_Qwen3-8B-Base",
        "Qwen/Qwen3-VL-8B-Instruct",
        17.5,
        "GPU, 48 GB for both",
        "Qwen3-VL-8B's language model is a Qwen3-8B; HiTZ continued Qwen3-8B-Base's pretraining "
        "on Basque. Needs torchvision for Qwen3-VL's processor. Header-true copies of Qwen3-VL-8B "
        "and -4B (real names, shapes, shards) plan here, and a 4B cut to 2 layers merges and "
        "loads.",
    ),
    _family(
        "gemma3-27b-sealion",
        "gemma3",
        "google/gemma-3-27b-pt",
        "aisingapore/Gemma-SEA-LION-v4-27B-IT",
        "google/medgemma-27b-it",
        54.9,
        "GPU, 2x80 GB or one 141 GB",
        "All three are Gemma3ForConditionalGeneration checkpoints (Gemma 3's base of 4B and up "
        "is multimodal): the base's and fine-tune's language models are merged, their vision "
        "towers left aside. MedGemma and SEA-LION v4 both descend from gemma-3-27b-pt (SEA-LION "
        "through gemma-3-27b-it). Gated: accept the Gemma and Health AI licences, set HF_TOKEN. "
        "A header-true copy of MedGemma-27B plans here.",
    ),
    _family(
        "llava-next-mistral-turkish",
        "llava_next",
        "mistralai/Mistral-7B-Instruct-v0.2",
        "malhajar/Mistral-7B-Instruct-v0.2-turkish",
        "llava-hf/llava-v1.6-mistral-7b-hf",
        15.1,
        "GPU, 40 GB for both",
        "LLaVA-NeXT-Mistral starts from Mistral-7B-Instruct-v0.2 (vocabulary 32,000 + <image>, "
        "padded to 32,064); the fine-tune tunes that model on Turkish.",
    ),
    _family(
        "llava-onevision-qwen2-seallm",
        "llava_onevision",
        "Qwen/Qwen2-7B-Instruct",
        "SeaLLMs/SeaLLMs-v3-7B-Chat",
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        16.1,
        "GPU, 40 GB for both",
        "LLaVA-OneVision-7B's language model is Qwen2-7B-Instruct; SeaLLMs-v3 tunes Qwen2-7B on "
        "Southeast Asian languages. Needs torchvision for its processor.",
    ),
    _family(
        "mistral-small-3.1-sarvam",
        "mistral3",
        "mistralai/Mistral-Small-3.1-24B-Base-2503",
        "sarvamai/sarvam-m",
        "mistralai/Mistral-Small-3.1-24B-Instruct-2503",
        48.0,
        "GPU, 2x80 GB or one 141 GB",
        "Mistral-Small-3.1 (40 layers, vocabulary 131,072); Sarvam-M tunes its base on Indic "
        "languages. The base checkpoint is multimodal like the VLM: its vision tower is left aside.",
    ),
    _family(
        "llama-3.2-vision-sealion",
        "mllama",
        "meta-llama/Llama-3.1-8B-Instruct",
        "aisingapore/llama3.1-8b-cpt-sea-lionv3-base",
        "meta-llama/Llama-3.2-11B-Vision-Instruct",
        21.3,
        "GPU, 48 GB for both",
        "Llama-3.2-Vision's 40 text layers are Llama-3.1-8B's 32 with 8 cross-attention layers "
        "inserted (copied, named in the plan) and 8 more embedding rows; SEA-LION v3 continues "
        "Llama-3.1-8B-Instruct on Southeast Asian languages. Gated: accept the Llama licence.",
    ),
)


def presets() -> dict[str, Preset]:
    """All presets by key, the offline demo first."""
    return {p.key: p for p in (demo_preset(), *_HUB_PRESETS, *FAMILY_PRESETS)}


def get_preset(key: str) -> Preset:
    """The preset ``key``; an unknown key lists the valid ones."""
    table = presets()
    try:
        return table[key]
    except KeyError:
        raise ValueError(f"unknown preset {key!r}; valid presets: {', '.join(table)}") from None
