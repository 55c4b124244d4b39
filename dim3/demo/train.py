"""Train the demo trio from scratch: ``python -m dim3.demo.train --out assets/demo [--seed N] [--quick]``.

``--stage experts`` trains only the language-group experts, from the base already in ``--out``;
``--stage all`` trains the trio and then the experts.

1. A byte-level BPE tokenizer on the world's text (all languages).
2. Base: a small Llama "pretrained" on mostly English text with a little of each other language.
3. Multilingual: the base, trained further on much more text in all languages (never pictures).
4. Multimodal: LLaVA = CLIP-style tower + projector + the base's text model, trained on English
   picture questions: first tower + projector with the text model frozen, then briefly everything.
5. Experts (``--stage experts``, from the base already in ``--out``): one model per language
   group (``de+es+ru``, ``zh+ar+hi+sw``), each the base trained further on the multilingual
   mixture restricted to its group plus a little English, saved to ``experts/<group>/``.

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


EXPERT_GROUPS = ("de+es+ru", "zh+ar+hi+sw")


def group_languages(group: str) -> tuple[str, ...]:
    """``"de+es+ru"`` -> ("de", "es", "ru"); raises naming the problem for a bad group name."""
    languages = tuple(group.split("+"))
    others = world.LANGUAGES[1:]
    unknown = [x for x in languages if x not in others]
    if unknown or len(set(languages)) != len(languages):
        raise ValueError(
            f"bad expert group {group!r}: give distinct non-English languages of the world "
            f"joined by '+', from {'+'.join(others)}"
        )
    return languages


@dataclass(frozen=True)
class ExpertConfig:
    """Everything that decides the language-group experts' weights, given the base they start from.

    ``steps`` per expert: the multilingual stage's 2000 steps split over the two groups, so the
    experts together cost what the multilingual model cost, and each of their languages sees about
    as much text as in the multilingual stage (1000 x 7/8 / 3 or / 4 batches vs 2000 / 8).
    ``english_share``: English's share in the multilingual mixture (one language of eight).
    """

    seed: int = 0
    groups: tuple[str, ...] = EXPERT_GROUPS
    steps: int = 1000
    batch: int = 32
    lr: float = 3e-3
    english_share: float = 1 / len(world.LANGUAGES)

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ExpertConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.english_share < 1:
            raise ValueError(f"english_share must be in [0, 1), got {self.english_share}")
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"expert groups must be distinct and at least one, got {self.groups}")
        for group in self.groups:
            group_languages(group)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


QUICK_EXPERTS = ExpertConfig(steps=6)


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


def train_experts(config: ExpertConfig, out: Path) -> dict:
    """Train one expert per group of ``config`` from ``out/base`` into ``out/experts/<group>``.

    Each expert starts from the base's weights and keeps its tokenizer files byte for byte.
    Folders are written beside their place and moved in only when complete. Returns the seconds
    each expert took.
    """
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    base = out / "base"
    if not (base / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no base model in {base}: train it first with `python -m dim3.demo.train --out {out}`"
        )
    set_determinism(config.seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base)
    timings = {}
    for group in config.groups:
        t0 = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        languages = group_languages(group)
        print(f"expert {group}: {config.steps} steps", flush=True)

        def sampler(rng: random.Random, languages=languages) -> data.Sample:
            return data.group_sample(rng, languages, config.english_share)

        loss = text_loss(model, sampler, tokenizer, config.batch, 0)
        rng = random.Random(f"{config.seed}/experts/{group}")  # str seeds hash deterministically
        train_loop(model.parameters(), loss, config.steps, config.lr, rng, group)
        _save_expert(model, tokenizer, base, out / "experts" / group)
        timings[group] = time.perf_counter() - t0
    return timings


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _save_expert(model: nn.Module, tokenizer, base: Path, folder: Path) -> None:
    """Save ``model`` to ``folder`` via a partial folder; tokenizer files copied from ``base``."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    build.save_llm(model, tokenizer, partial)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, partial / name)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


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


def write_experts_manifest(config: ExpertConfig, out: Path, timings: dict, quick: bool) -> dict:
    """Add the experts' entry (config, timings, base file hash, fingerprints) to ``manifest.json``.

    The trio's entries, if any, are kept; the entry records the sha256 of the base file the
    experts started from, so a manifest cannot pair experts with another base silently.
    """
    path = out / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    base_bytes = (out / "base" / "model.safetensors").read_bytes()
    manifest["experts"] = {
        "command": "python -m dim3.demo.train --out DIR --seed {} --stage experts{}".format(
            config.seed, " --quick" if quick else ""
        ),
        "quick": quick,
        "config": config.to_dict(),
        "base_sha256": hashlib.sha256(base_bytes).hexdigest(),
        "torch": torch.__version__,
        "threads": THREADS,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "fingerprints": {g: fingerprint(out / "experts" / g) for g in config.groups},
    }
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
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
        "--stage",
        choices=("trio", "experts", "all"),
        default="trio",
        help="trio: base, multilingual, multimodal; experts: the language-group experts from "
        "the base in --out; all: both (default: trio)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps only (for tests; weights are useless)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing model folders in --out"
    )
    args = parser.parse_args(argv)
    names = {
        "trio": ["base", "multilingual", "multimodal", "experts"],
        "experts": ["experts"],
        "all": ["base", "multilingual", "multimodal", "experts"],
    }[args.stage]
    existing = [n for n in names if (args.out / n).exists()]
    if existing and not args.overwrite:
        print(
            f"error: {args.out} already has {existing}; pass --overwrite to replace them",
            file=sys.stderr,
        )
        return 2
    if args.stage == "experts":
        problem = _experts_problem(args.out, args.seed)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    for name in existing:
        shutil.rmtree(args.out / name)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("trio", "all"):
        config = dataclasses.replace(QUICK if args.quick else TrainConfig(), seed=args.seed)
        start = time.perf_counter()
        timings = train_all(config, args.out)
        timings["total"] = time.perf_counter() - start
        write_manifest(config, args.out, timings, args.quick)
        print(f"trained the demo trio in {timings['total']:.0f}s -> {args.out}")
    if args.stage in ("experts", "all"):
        experts = QUICK_EXPERTS if args.quick else ExpertConfig()
        experts = dataclasses.replace(experts, seed=args.seed)
        start = time.perf_counter()
        timings = train_experts(experts, args.out)
        timings["total"] = time.perf_counter() - start
        write_experts_manifest(experts, args.out, timings, args.quick)
        print(f"trained {len(experts.groups)} experts in {timings['total']:.0f}s -> {args.out}")
    return 0


def _experts_problem(out: Path, seed: int) -> str | None:
    """Why the experts cannot be trained from ``out``'s base with ``seed`` (None if they can)."""
    if not (out / "base" / "model.safetensors").is_file():
        return f"no base model in {out / 'base'}; train it first with --stage trio (or all)"
    path = out / "manifest.json"
    recorded = (
        json.loads(path.read_text()).get("config", {}).get("seed") if path.is_file() else None
    )
    if recorded is not None and recorded != seed:
        return f"{path} records seed {recorded} for the base; pass --seed {recorded}"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
