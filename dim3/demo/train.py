"""Train the demo trio from scratch: ``python -m dim3.demo.train --out assets/demo [--seed N] [--quick]``.

1. A byte-level BPE tokenizer on the world's text (all languages).
2. Base: a small Llama "pretrained" on mostly English text with a little of each other language.
3. Multilingual: the base, trained further on much more text in all languages (never pictures).
4. Multimodal: LLaVA = CLIP-style tower + projector + the base's text model, trained on English
   picture questions: first tower + projector with the text model frozen, then briefly everything.

Deterministic given the seed on one machine (fixed thread count, deterministic algorithms,
seeded data); ``manifest.json`` records the config, timings and per-tensor fingerprints. Across
machines, floating-point kernels may differ in the last bits (see ``fingerprint``). This module
knows training; the world, the data and the model parts come from their own modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dim3.demo import build, data, world
from dim3.demo.build import ModelSize

THREADS = 2  # fixed, so reductions split the same way on every run


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the code and the torch version)."""

    seed: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    batch: int = 32
    tokenizer_texts: int = 6000
    base_steps: int = 1200
    multilingual_steps: int = 2000
    tower_steps: int = 3000
    tower_batch: int = 64
    tower_lr: float = 3e-3
    projector_steps: int = 800
    vlm_steps: int = 150
    lr: float = 3e-3
    projector_lr: float = 2e-3
    vlm_lr: float = 3e-4

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and f.name != "seed" and value <= 0:
                raise ValueError(f"TrainConfig.{f.name} must be positive, got {value}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


QUICK = TrainConfig(
    tokenizer_texts=400,
    base_steps=6,
    multilingual_steps=6,
    tower_steps=4,
    projector_steps=4,
    vlm_steps=3,
)


def set_determinism(seed: int) -> None:
    """Seed torch and fix the thread count and algorithms so that a run repeats bit for bit."""
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of ``peak``."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(
    params: Iterable[nn.Parameter],
    loss_fn: Callable[[random.Random], Tensor],
    steps: int,
    peak_lr: float,
    rng: random.Random,
    label: str,
) -> list[float]:
    """AdamW over ``params`` for ``steps`` batches; ``loss_fn(rng)`` draws a batch and returns its loss."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak_lr, betas=(0.9, 0.98), weight_decay=0.0)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        loss = loss_fn(rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            recent = losses[-max(1, steps // 10) :]
            print(
                f"  {label} step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    return losses


def text_loss(model: nn.Module, sampler, tokenizer, batch: int, image_tokens: int):
    """A ``loss_fn`` over text batches drawn by ``sampler(rng) -> data.Sample``."""

    def loss_fn(rng: random.Random) -> Tensor:
        encoded = [data.encode(sampler(rng), tokenizer, image_tokens) for _ in range(batch)]
        return model(**data.collate(encoded, tokenizer.pad_token_id)).loss

    return loss_fn


def vlm_loss(model: nn.Module, tokenizer, image_processor, batch: int, image_tokens: int):
    """A ``loss_fn`` over English picture-question batches."""

    def loss_fn(rng: random.Random) -> Tensor:
        samples = [data.vlm_sample(rng) for _ in range(batch)]
        encoded = [data.encode(s, tokenizer, image_tokens) for s in samples]
        inputs = data.collate(encoded, tokenizer.pad_token_id)
        pixels = image_processor([world.render(s.image) for s in samples], return_tensors="pt")
        return model(**inputs, pixel_values=pixels["pixel_values"]).loss

    return loss_fn


def tower_loss(tower: nn.Module, heads: nn.ModuleDict, image_processor, batch: int):
    """A ``loss_fn`` pretraining the vision tower alone: name each picture's shape, colour, size.

    It stands in for CLIP's contrastive pretraining (a LLaVA tower comes pretrained): a linear
    head per attribute reads the mean of the patch features, the features LLaVA passes on.
    """
    attributes = {"shape": world.SHAPES, "colour": world.COLOURS, "size": world.SIZES}

    def loss_fn(rng: random.Random) -> Tensor:
        scenes = [world.random_scene(rng) for _ in range(batch)]
        pixels = image_processor([world.render(s) for s in scenes], return_tensors="pt")[
            "pixel_values"
        ]
        features = (
            tower(pixel_values=pixels).last_hidden_state[:, 1:].mean(dim=1)
        )  # (batch, hidden)
        loss = torch.zeros(())
        for name, values in attributes.items():
            target = torch.tensor([values.index(getattr(s, name)) for s in scenes])
            loss = loss + nn.functional.cross_entropy(heads[name](features), target)
        return loss

    return loss_fn


def tower_heads(hidden: int) -> nn.ModuleDict:
    """Linear read-outs of the tower's features used only by its pretraining (then dropped)."""
    return nn.ModuleDict(
        {
            "shape": nn.Linear(hidden, len(world.SHAPES)),
            "colour": nn.Linear(hidden, len(world.COLOURS)),
            "size": nn.Linear(hidden, len(world.SIZES)),
        }
    )


def train_all(config: TrainConfig, out: Path) -> dict:
    """Train the tokenizer and the three models per ``config`` and save them under ``out``.

    Returns the seconds each stage took.
    """
    set_determinism(config.seed)
    t0 = time.perf_counter()
    texts = data.tokenizer_corpus(random.Random(config.seed), config.tokenizer_texts)
    tokenizer = build.train_tokenizer(texts, config.size.vocab_size)
    timings = {"tokenizer": time.perf_counter() - t0}
    timings |= train_llms(config, tokenizer, out)
    t0 = time.perf_counter()
    train_vlm(config, tokenizer, out)
    timings["multimodal"] = time.perf_counter() - t0
    return timings


def train_llms(config: TrainConfig, tokenizer, out: Path) -> dict:
    """Base (mostly English), then the same model on far more text in every language."""
    size, timings = config.size, {}
    model = build.new_llm(size, tokenizer, config.seed)
    stages = (
        ("base", data.base_sample, config.base_steps),
        ("multilingual", data.multilingual_sample, config.multilingual_steps),
    )
    for offset, (name, sampler, steps) in enumerate(stages, start=1):
        t0 = time.perf_counter()
        print(f"{name}: {steps} steps", flush=True)
        loss = text_loss(model, sampler, tokenizer, config.batch, size.image_tokens)
        train_loop(
            model.parameters(), loss, steps, config.lr, random.Random(config.seed + offset), name
        )
        build.save_llm(model, tokenizer, out / name)
        timings[name] = time.perf_counter() - t0
    return timings


def train_vlm(config: TrainConfig, tokenizer, out: Path) -> None:
    """LLaVA from the base: tower pretraining, projector (+ tower) with the LM frozen, then all."""
    size = config.size
    base = build.new_llm(size, tokenizer, config.seed)
    base.load_state_dict(_load_state(out / "base"))
    vlm = build.new_vlm(size, base, tokenizer, config.seed + 3)
    proc = build.processor(size, tokenizer)
    print(f"vision tower: {config.tower_steps} pretraining steps", flush=True)
    tower = vlm.model.vision_tower
    heads = tower_heads(size.vision_hidden)
    loss = tower_loss(tower, heads, proc.image_processor, config.tower_batch)
    params = [*tower.parameters(), *heads.parameters()]
    rng = random.Random(config.seed + 6)
    train_loop(params, loss, config.tower_steps, config.tower_lr, rng, "tower")
    loss = vlm_loss(vlm, tokenizer, proc.image_processor, config.batch, size.image_tokens)
    print(f"multimodal: {config.projector_steps} + {config.vlm_steps} steps", flush=True)
    lm = [*vlm.model.language_model.parameters(), *vlm.lm_head.parameters()]
    for p in lm:
        p.requires_grad_(False)
    rng = random.Random(config.seed + 4)
    train_loop(
        vlm.parameters(), loss, config.projector_steps, config.projector_lr, rng, "projector"
    )
    for p in lm:
        p.requires_grad_(True)
    rng = random.Random(config.seed + 5)
    train_loop(vlm.parameters(), loss, config.vlm_steps, config.vlm_lr, rng, "multimodal")
    build.save_vlm(vlm, proc, tokenizer, out / "multimodal")


def _load_state(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def fingerprint(folder: Path) -> dict:
    """Per-tensor fingerprints of a checkpoint: sha256 of the bytes (bitwise) + float statistics.

    The statistics (sum, sum of |x|, sum of x*index) allow a tolerance check across machines whose
    floating-point kernels differ in the last bits; the hash checks bitwise identity.
    """
    state = _load_state(folder)
    out = {}
    for key in sorted(state):
        t = state[key].detach().double().flatten()
        index = torch.arange(t.numel(), dtype=torch.float64) / max(1, t.numel())
        out[key] = {
            "sha256": hashlib.sha256(state[key].contiguous().numpy().tobytes()).hexdigest(),
            "sum": t.sum().item(),
            "abs_sum": t.abs().sum().item(),
            "weighted_sum": (t * index).sum().item(),
        }
    return out


def write_manifest(config: TrainConfig, out: Path, timings: dict, quick: bool) -> dict:
    """Record config, timings, versions and fingerprints of the three models in ``manifest.json``."""
    manifest = {
        "command": "python -m dim3.demo.train --out DIR --seed {}{}".format(
            config.seed, " --quick" if quick else ""
        ),
        "quick": quick,
        "config": config.to_dict(),
        "torch": torch.__version__,
        "threads": THREADS,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "fingerprints": {
            name: fingerprint(out / name) for name in ("base", "multilingual", "multimodal")
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dim3.demo.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for base/, multilingual/, multimodal/"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="a few steps only (for tests; weights are useless)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing model folders in --out"
    )
    args = parser.parse_args(argv)
    config = dataclasses.replace(QUICK if args.quick else TrainConfig(), seed=args.seed)
    existing = [n for n in ("base", "multilingual", "multimodal") if (args.out / n).exists()]
    if existing and not args.overwrite:
        print(
            f"error: {args.out} already has {existing}; pass --overwrite to replace them",
            file=sys.stderr,
        )
        return 2
    for name in existing:
        shutil.rmtree(args.out / name)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings = train_all(config, args.out)
    timings["total"] = time.perf_counter() - start
    write_manifest(config, args.out, timings, args.quick)
    print(f"trained the demo trio in {timings['total']:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
