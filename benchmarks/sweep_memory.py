"""Memory of a sweep's model handling: merge in place (re-read) against keeping a pristine copy.

``python -m dim3 sweep`` loads one VLM and merges every grid point into it in place;
``merge_into_model`` recomputes each merged tensor from the three checkpoints, so the original
language model needs no copy. The alternative keeps a CPU copy of the language-model tensors and
restores it before each merge. This script builds a real LLaVA trio (random weights, transformers
classes, saved with ``save_pretrained``), then in a fresh process per mode loads the VLM (float32,
CPU) and runs three merges, printing anonymous RSS (RssAnon plus RssShmem, sampled every 20 ms) after loading
and at the peak, and the wall time per merge.

    python benchmarks/sweep_memory.py [--hidden 1024 --layers 12 --vocab 8000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, no install
sys.path.insert(0, str(Path(__file__).resolve().parent))

GIB = 1024**3


def build(root: Path, hidden: int, layers: int, vocab: int) -> None:
    """Base, multilingual (base + noise) and LLaVA VLM (its LM = base + noise) under ``root``."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=vocab,
    )
    base = LlamaForCausalLM(text)
    base.save_pretrained(root / "base")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))
    base.save_pretrained(root / "multilingual")
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    vlm = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1)
    )
    state = LlamaForCausalLM.from_pretrained(root / "base").state_dict()
    with torch.no_grad():
        lm = vlm.model.language_model
        for name, p in lm.state_dict().items():
            p.copy_(state[f"model.{name}"] + 0.01 * torch.randn_like(p))
        vlm.lm_head.weight.copy_(state["lm_head.weight"])
    vlm.save_pretrained(root / "multimodal")


def measure(root: Path, mode: str) -> dict:
    from merge_throughput import AnonPeak

    from dim3.engine import merge_into_model
    from dim3.recipe import Recipe, Source

    with AnonPeak() as peak:
        before = AnonPeak.now()
        model = load_vlm_model(root)
        loaded = AnonPeak.now()
        recipe = Recipe(
            base=Source(str(root / "base")),
            multilingual=Source(str(root / "multilingual")),
            multimodal=Source(str(root / "multimodal")),
            method="dim3",
        )
        pristine = None
        if mode == "copy":
            pristine = {
                k: v.detach().clone() for k, v in model.state_dict().items() if "language" in k
            }
        times = []
        for _ in range(3):
            start = time.perf_counter()
            if pristine is not None:
                with torch.no_grad():
                    state = model.state_dict()
                    for k, v in pristine.items():
                        state[k].copy_(v)
            merge_into_model(model, recipe)
            times.append(time.perf_counter() - start)
    n = sum(p.numel() for p in model.parameters())
    return {
        "mode": mode,
        "params": n,
        "model_gib": n * 4 / GIB,
        "before_gib": before / GIB,
        "loaded_gib": loaded / GIB,
        "peak_gib": peak.peak / GIB,
        "peak_over_loaded_gib": (peak.peak - loaded) / GIB,
        "seconds_per_merge": sum(times) / len(times),
    }


def load_vlm_model(root: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        str(root / "multimodal"), dtype=torch.float32, use_safetensors=True
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--measure", choices=("inplace", "copy"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.measure:
        print(json.dumps(measure(args.root, args.measure)))
        return
    with tempfile.TemporaryDirectory(prefix="dim3-sweep-mem-") as tmp:
        root = Path(tmp)
        build(root, args.hidden, args.layers, args.vocab)
        for mode in ("inplace", "copy"):
            out = (
                subprocess.run(
                    [sys.executable, __file__, "--measure", mode, "--root", str(root)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            print(
                f"{mode:8s} params {r['params'] / 1e6:.0f}M (fp32 {r['model_gib']:.2f} GiB): "
                f"anonymous RSS loaded {r['loaded_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB "
                f"(+{r['peak_over_loaded_gib']:.2f} over loaded), "
                f"{r['seconds_per_merge']:.1f} s per merge"
            )


if __name__ == "__main__":
    main()
