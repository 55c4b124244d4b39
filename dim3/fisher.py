"""``python -m dim3 fisher``: estimate a model's diagonal Fisher information, and read it back.

Estimation (:func:`estimate`, :func:`estimate_to_folder`). For each of N examples ``(x, y)`` drawn
(seeded) from a data source, the gradient of the log-likelihood ``log p_θ(y | x)`` of the answer
given the prompt is taken, squared elementwise and averaged:

    F = 1/N Σ_n (∇_θ log p_θ(y_n | x_n))²

Matena & Raffel (https://arxiv.org/abs/2111.09832) define the Fisher with ``y`` drawn from the
model's own predictive distribution (their reference code sums over all labels, weighted by their
probabilities); the "empirical Fisher" puts the data's answers in its place. Both are offered:

- ``labels="sampled"`` (the paper's Fisher, one Monte-Carlo sample per example): ``y`` is sampled
  token by token from the model itself (temperature 1, no top-k/top-p), up to ``max_new_tokens``
  or the end-of-sequence token, with a seeded generator.
- ``labels="given"`` (the empirical Fisher): ``y`` is the example's answer followed by the
  end-of-sequence token.

Examples are probe items (:mod:`dim3.probes`): a question (with its picture for a VLM, or a text
context for an LLM) and its answer. The prompt is the model's chat template, as ``eval`` asks it.
Memory stays bounded: one example at a time, and each parameter's gradient is squared into its
float32 accumulator and freed as soon as backpropagation has finished with it, so the peak is the
model, one gradient-sized accumulator and one example's activations, on the chosen device.

Storage (a *Fisher folder*): the language model's tensors under their canonical LLM names
(``model.layers.N...``, ``model.embed_tokens.weight``, ``lm_head.weight`` unless tied: a tied
embedding's Fisher holds both its uses), in the model's shapes, float32 or bfloat16, as sharded
safetensors; plus ``fisher.json`` with what was estimated how: model, data, N, seed, labels, dtype,
the Fisher's L2 norm, the time taken. Reading it back is :mod:`dim3.fisher_files`' (the merge
engine reads the Fishers row slice by row slice beside the weights, for the ``fisher`` rule).
A server's Fishers (:func:`fishers_for`, under ``OUTPUT/fisher/``) are one per model, data, N,
seed and labels whatever the role, and bounded by :func:`fishers_limit` (least recently used
deleted first). This module knows models, probe items and files; it knows nothing about Gradio.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import dim3
from dim3.checkpoints import Checkpoint, check_under_roots, looks_local, resolve
from dim3.fisher_files import FORMAT, fingerprint, is_vlm, language_keys
from dim3.layout import LANGUAGE, layout_for
from dim3.probes import ProbeItem, load_probe
from dim3.recipe import FISHER_FILE, Source
from dim3.writer import ShardedWriter, TensorSpec

FISHER_ROOT = "fisher"  # a server's Fishers: this folder of its output root (dim3.paths.RESERVED)
LABELS = ("given", "sampled")
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEMO_SOURCES = ("demo", "demo-text", "demo-probe")
# the demo world's Fisher data: scenes drawn by their own seed, never the probe's (1_000_003) nor
# training's (0..N+5), so a Fisher estimated on "demo" does not see the questions eval asks
DEMO_FISHER_SEED = 2_000_003
DEMO_FISHER_SCENES = 48


# --------------------------------------------------------------------------- what to estimate


@dataclass(frozen=True)
class FisherSpec:
    """One Fisher estimation: the model, the data source, N examples, the seed and the labels.

    data: ``demo`` (fresh scenes of the demo world, not the probe's: pictures for a VLM, their
    descriptions as text for an LLM; every language and question kind), ``demo-text`` (always the
    descriptions), ``demo-probe`` (the demo probe itself, which ``eval`` scores: for checks only)
    or a probe JSONL file. dtype: of the stored Fisher.
    """

    model: Source
    data: str = "demo"
    n: int = 64
    seed: int = 0
    labels: str = "given"
    dtype: str = "float32"
    device: str = "auto"
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.model, Source):
            object.__setattr__(self, "model", Source(str(self.model)))
        if self.labels not in LABELS:
            raise ValueError(f"labels {self.labels!r} is not one of {', '.join(LABELS)}")
        if self.dtype not in OUT_DTYPES:
            raise ValueError(f"Fisher dtype {self.dtype!r} is not one of {', '.join(OUT_DTYPES)}")
        for name, lo in (("n", 1), ("seed", 0), ("max_new_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ValueError(f"Fisher {name} must be an integer ≥ {lo}, got {value!r}")
        if not str(self.data).strip():
            raise ValueError("give a data source: demo, demo-text or a probe JSONL file")


def source_items(
    data: str,
    *,
    vlm: bool,
    workdir: Path | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
) -> list[ProbeItem]:
    """The examples of a data source (see :class:`FisherSpec`); an LLM cannot take pictures.

    ``demo`` for a VLM draws its pictures into ``workdir`` (which must then be given). A probe
    file and the pictures it names must lie under ``allowed_roots`` (a server's; None: any).
    """
    from dim3.demo import demo_probe
    from dim3.demo.probe import demo_items, demo_scenes, text_probe

    if data in ("demo", "demo-text"):
        scenes = demo_scenes(DEMO_FISHER_SCENES, DEMO_FISHER_SEED)
        paths = None
        if vlm and data == "demo":
            if workdir is None:
                raise ValueError("the demo source draws pictures: give a folder for them")
            from dim3.demo import world

            paths = [workdir / f"{i:04d}.png" for i in range(len(scenes))]
            for scene, path in zip(scenes, paths, strict=True):
                world.render(scene).save(path)
        items = demo_items(scenes, paths)
    elif data == "demo-probe":
        items = demo_probe() if vlm else text_probe()
    else:
        items = load_probe(data, allowed_roots=allowed_roots)
    if not vlm and any(item.image is not None for item in items):
        raise ValueError(
            f"the data source {data} has pictures but the model is a text-only LLM; give text "
            "questions (a probe without images, with a context) or demo-text"
        )
    return items


def choose(items: Sequence[ProbeItem], n: int, seed: int) -> list[ProbeItem]:
    """``n`` of ``items`` drawn without replacement by ``seed``, kept in their source order."""
    if n > len(items):
        raise ValueError(
            f"N = {n} examples asked for but the data source has {len(items)}; give N ≤ "
            f"{len(items)}"
        )
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


# --------------------------------------------------------------------------- the model


def load_model(folder: Path, device: torch.device) -> tuple[Any, Any]:
    """``(model, processor or tokenizer)``: float32 on CPU, bfloat16 on GPU, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dim3.chat import load_vlm

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    placement = {"": str(device)} if device.type != "cpu" else None
    if is_vlm(config):
        return load_vlm(folder, dtype=dtype, device_map=placement)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, device_map=placement, use_safetensors=True
    )
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def language_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The language model's parameters by canonical LLM name (a tied embedding once)."""
    params = dict(model.named_parameters())  # shared parameters appear once
    config = model.config.to_dict()
    if not is_vlm(config):
        return params
    layout = layout_for(config, params)
    out = {}
    for name, p in params.items():
        cls = layout.classify(name)
        if cls and cls[0] == LANGUAGE and cls[1]:
            out[cls[1]] = p
    return out


class SquaredGrads:
    """Float32 accumulators of the squared gradients of some parameters.

    Each parameter's gradient is added (squared) as soon as backpropagation has finished it, then
    freed, so no two full sets of gradients are alive at once. Use as a context manager.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.sums = {
            name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for name, p in params.items()
        }
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._hook(self.sums[name]))
            for name, p in params.items()
        ]

    @staticmethod
    def _hook(acc: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def add(param: torch.Tensor) -> None:
            acc.addcmul_(param.grad, param.grad)  # (∂ log p / ∂θ)², in float32
            param.grad = None

        return add

    def __enter__(self) -> SquaredGrads:
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()


def _given(tokenizer: Any, item: ProbeItem) -> list[int]:
    """The given answer's token ids, then the end-of-sequence token (as the demo was trained)."""
    ids = list(tokenizer(item.answer, add_special_tokens=False)["input_ids"])
    return [*ids, tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


@torch.no_grad()
def _sample(model: Any, inputs: Any, g: torch.Generator, eos: int | None, steps: int = 8) -> list:
    """Answer tokens drawn one by one from the model's full distribution (temperature 1)."""
    out: list[int] = []
    for _ in range(steps):
        logits = _forward(model, inputs, out)[0, -1].float()
        token = int(torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g))
        out.append(token)
        if token == eos:
            break
    return out


def _forward(model: Any, inputs: Any, answer: Sequence[int]) -> torch.Tensor:
    """Logits (1, prompt + answer, vocab) of the prompt followed by ``answer``."""
    kwargs = dict(inputs)
    if answer:
        extra = torch.tensor([list(answer)], dtype=kwargs["input_ids"].dtype)
        extra = extra.to(kwargs["input_ids"].device)
        kwargs["input_ids"] = torch.cat([kwargs["input_ids"], extra], dim=1)
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.cat([mask, torch.ones_like(extra, dtype=mask.dtype)], 1)
    return model(**kwargs, use_cache=False).logits


def log_likelihood(model: Any, inputs: Any, answer: Sequence[int]) -> torch.Tensor:
    """``log p(answer | prompt)``: the sum of the answer tokens' log-probabilities (a scalar)."""
    logits = _forward(model, inputs, answer)[0]  # (P + A, vocab)
    a = len(answer)
    logp = torch.log_softmax(logits[-a - 1 : -1].float(), dim=-1)  # predicts answer tokens
    target = torch.tensor(list(answer), device=logp.device)
    return logp.gather(1, target[:, None]).sum()


Progress = Callable[[int, int, float], None]  # (examples done, examples in all, seconds so far)


def estimate(
    model: Any,
    processor: Any,
    items: Sequence[ProbeItem],
    *,
    labels: str = "given",
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher ``1/N Σ_n (∇ log p(y_n | x_n))²`` of ``model``'s language parameters,
    float32 on the model's device, by canonical name; one example at a time (see the module).

    Parameters outside the language model get no gradient. ``progress(done, total, seconds)``
    hears every example and may raise to stop.
    """
    from dim3.evaluate import _batch_inputs, _tokenizer

    if labels not in LABELS:
        raise ValueError(f"labels {labels!r} is not one of {', '.join(LABELS)}")
    params = language_parameters(model)
    wanted = {id(p) for p in params.values()}
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    g = torch.Generator().manual_seed(seed)
    tokenizer = _tokenizer(processor)
    start = time.perf_counter()
    try:
        with SquaredGrads(params) as squares:
            for done, item in enumerate(items):
                inputs = _batch_inputs(model, processor, [item])
                if labels == "given":
                    answer = _given(tokenizer, item)
                else:
                    answer = _sample(model, inputs, g, tokenizer.eos_token_id, max_new_tokens)
                log_likelihood(model, inputs, answer).backward()
                if progress is not None:
                    progress(done + 1, len(items), time.perf_counter() - start)
        return {name: acc.div_(len(items)) for name, acc in squares.sums.items()}
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
            p.grad = None


# --------------------------------------------------------------------------- the folder


@dataclass(frozen=True)
class FisherResult:
    """What an estimation wrote: the folder, its metadata and the seconds it took."""

    out_dir: Path
    meta: dict[str, Any]
    seconds: float


def fisher_norm(fisher: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """The L2 norm over all entries of the Fisher as stored (in ``dtype``)."""
    total = sum(float(t.to(dtype).double().square().sum()) for t in fisher.values())
    return math.sqrt(total)


def estimate_to_folder(
    spec: FisherSpec,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
) -> FisherResult:
    """Estimate ``spec`` and write a Fisher folder at ``out_dir`` (moved into place when done)."""
    from dim3.engine import resolve_device

    device = resolve_device(spec.device)
    out = Path(out_dir).expanduser().resolve()
    folder = resolve(spec.model.ref, spec.model.revision, allowed_roots=allowed_roots, token=token)
    if out == folder or out.is_relative_to(folder):
        raise ValueError(f"output folder {out} lies in the model {folder}; choose another folder")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="dim3-fisher-") as work:
        everything = source_items(
            spec.data, vlm=is_vlm(config), workdir=Path(work), allowed_roots=allowed_roots
        )
        items = choose(everything, spec.n, spec.seed)
        model, processor = load_model(folder, device)
        start = time.perf_counter()
        fisher = estimate(
            model,
            processor,
            items,
            labels=spec.labels,
            seed=spec.seed,
            max_new_tokens=spec.max_new_tokens,
            progress=progress,
        )
        seconds = time.perf_counter() - start
    dtype = OUT_DTYPES[spec.dtype]
    meta = {
        "format": FORMAT,
        "fisher": "diagonal",
        **asdict(spec),
        "model": str(spec.model),
        "commit": folder.name if folder.parent.name == "snapshots" else None,
        "fingerprint": fingerprint(Checkpoint(folder)),
        "data_examples": len(everything),
        "family": config.get("model_type", ""),
        "names": "canonical language-model names (model.layers.N..., lm_head.weight)",
        "norm": fisher_norm(fisher, dtype),
        "seconds": round(seconds, 2),
        "device": str(device),
        "dim3_version": dim3.__version__,
        "paper": "https://arxiv.org/abs/2111.09832",
    }
    specs = [TensorSpec(name, dtype, tuple(t.shape)) for name, t in fisher.items()]
    with ShardedWriter(out, specs, overwrite=overwrite) as writer:
        for name, t in fisher.items():
            writer.write(name, t.to("cpu", dtype))
        (writer.folder / FISHER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return FisherResult(out, meta, seconds)


ENV_MAX_FISHERS = "DIM3_MAX_FISHERS"
# Fishers are as large as their models (float32): the share of $DIM3_MAX_SAVED they may hold
# when $DIM3_MAX_FISHERS is unset
FISHER_SHARE = 4
_in_use: dict[Path, int] = {}  # Fisher folders a running fishers_for has chosen (a count each)


def fishers_limit() -> int | None:
    """What the Fishers a server keeps may hold in all: ``$DIM3_MAX_FISHERS`` (``10GB``), else a
    quarter of ``$DIM3_MAX_SAVED``; None when that is 0 (no limit)."""
    from dim3.limits import saved_limit
    from dim3.sizes import size_from_env

    saved = saved_limit()
    return size_from_env(ENV_MAX_FISHERS, None if saved is None else saved // FISHER_SHARE)


def fisher_bytes(model: Path, dtype: str = "float32") -> int:
    """The size of ``model``'s Fisher folder as stored (its language tensors in ``dtype``), from
    the checkpoint's headers."""
    ckpt = Checkpoint(model)
    try:
        numel = sum(math.prod(ckpt.shape(disk)) for disk in language_keys(ckpt).values())
    finally:
        ckpt.close()
    return numel * OUT_DTYPES[dtype].itemsize


def make_fisher_room(root: Path, nbytes: int, keep: Sequence[Path] = ()) -> None:
    """Delete the least recently used Fishers under ``root`` (none in ``keep`` nor in use) until
    ``nbytes`` more fit :func:`fishers_limit`; refuse, deleting nothing, when they cannot."""
    import shutil

    from dim3.limits import folder_bytes
    from dim3.sizes import human_size

    limit = fishers_limit()
    if limit is None:
        return
    held = folder_bytes(root)
    if held + nbytes <= limit:
        return
    protected = {Path(k).resolve() for k in keep} | set(_in_use)
    old = [f for f in root.iterdir() if f.is_dir() and f.resolve() not in protected]
    old.sort(key=lambda f: _last_used(f))
    sizes = {f: folder_bytes(f) for f in old}
    free = held - sum(sizes.values())
    if free + nbytes > limit:
        raise ValueError(
            f"this Fisher ({human_size(nbytes)}) does not fit the {human_size(limit)} the "
            f"server keeps for Fishers (${ENV_MAX_FISHERS}; {human_size(free)} of them in use "
            "by this or a running job): choose fewer or smaller models, or estimate the "
            "Fishers on your own machine (`python -m dim3 fisher`)"
        )
    for folder in old:
        if held + nbytes <= limit:
            break
        shutil.rmtree(folder, ignore_errors=True)
        held -= sizes[folder]


def _last_used(folder: Path) -> float:
    try:
        return (folder / FISHER_FILE).stat().st_mtime
    except OSError:
        return 0.0  # half-written or foreign: first to go


def fishers_for(
    sources: dict[str, Source],
    out_root: str | Path,
    *,
    base: bool = False,
    device: str = "auto",
    data: str = "demo",
    n: int = 32,
    seed: int = 0,
    labels: str = "given",
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, str]:
    """Estimate (or reuse, when the same model, data, N, seed and labels were estimated before,
    for whatever role) the Fishers that a ``fisher`` merge of ``sources``
    (:meth:`Recipe.sources`) needs, under ``out_root/fisher/``: ``{role: folder}`` (the base's
    only when ``base``). ``progress(role, done, n, seconds)`` hears every example.

    The Fishers kept there are bounded (:func:`fishers_limit`): before each estimation the least
    recently used ones, none this call or a running one holds, are deleted to make room, or the
    estimation is refused. A call that fails (stopped by its budget, cancelled) deletes the
    Fishers it made, so that its message "nothing it made was kept" holds and a job over its
    budget cannot go on where it stopped on the next call."""
    roles = {r: s for r, s in sources.items() if r != "base" or base}
    if data not in DEMO_SOURCES and allowed_roots is not None:
        data = str(check_under_roots(Path(data), allowed_roots))
    root = Path(out_root) / FISHER_ROOT
    out: dict[str, str] = {}
    made: list[Path] = []
    held: list[Path] = []
    try:
        for role, source in roles.items():
            spec = FisherSpec(source, data=data, n=n, seed=seed, labels=labels, device=device)
            model = resolve(source.ref, source.revision, allowed_roots=allowed_roots, token=token)
            key = json.dumps([str(model), *asdict(spec).values()], default=str)
            folder = root / hashlib.sha256(key.encode()).hexdigest()[:16]  # no role: one each
            resolved = folder.resolve()
            _in_use[resolved] = _in_use.get(resolved, 0) + 1
            held.append(resolved)
            if not (folder / FISHER_FILE).is_file():
                root.mkdir(parents=True, exist_ok=True)
                make_fisher_room(root, fisher_bytes(model, spec.dtype), keep=[folder])
                report = None if progress is None else functools.partial(progress, role)
                if not looks_local(source.ref) and model.parent.name == "snapshots":
                    # a Hub id: at the commit just resolved (a path into the Hub cache would be
                    # outside a server's allowed folders), and named so in its fisher.json
                    spec = dataclasses.replace(spec, model=Source(source.ref, model.name))
                else:  # a local folder: where it resolved to (symlinks followed)
                    spec = dataclasses.replace(spec, model=Source(str(model)))
                made.append(folder)
                estimate_to_folder(
                    spec,
                    folder,
                    overwrite=True,
                    progress=report,
                    allowed_roots=allowed_roots,
                    token=token,
                )
            else:
                (folder / FISHER_FILE).touch()  # used now: the last to be deleted for room
                if progress is not None:
                    progress(role, n, n, 0.0)
            out[role] = str(folder)
    except BaseException:
        import shutil

        for folder in made:
            if _in_use.get(folder.resolve(), 0) <= 1:
                shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        for folder in held:
            _in_use[folder] -= 1
            if not _in_use[folder]:
                del _in_use[folder]
    return out


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m dim3 fisher``."""
    parser.add_argument("--model", required=True, help="an LLM or VLM: Hub id or folder")
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument(
        "--data",
        default="demo",
        help="demo (fresh demo-world scenes, not the probe's: pictures for a VLM, text for an "
        "LLM), demo-text, demo-probe (the probe eval scores), or a probe JSONL file (question, "
        "answer, language; image or context)",
    )
    parser.add_argument("--n", type=int, default=64, help="examples drawn from the source")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw and the sampling")
    parser.add_argument(
        "--labels",
        default="given",
        choices=LABELS,
        help="given: the data's answers (empirical Fisher); sampled: answers sampled from the "
        "model (the paper's Fisher)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=8, help="length of sampled answers")
    parser.add_argument("--dtype", default="float32", choices=tuple(OUT_DTYPES))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", required=True, help="the Fisher folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    spec = FisherSpec(
        Source(args.model, args.revision),
        data=args.data,
        n=args.n,
        seed=args.seed,
        labels=args.labels,
        dtype=args.dtype,
        device=args.device,
        max_new_tokens=args.max_new_tokens,
    )
    bar = tqdm(total=spec.n, unit="example", desc="Fisher")
    try:
        result = estimate_to_folder(
            spec,
            args.out,
            overwrite=args.overwrite,
            progress=lambda done, _total, _s: bar.update(done - bar.n),
        )
    finally:
        bar.close()
    print(
        f"Wrote {result.out_dir}: diagonal Fisher ({spec.labels} labels) of {spec.model} over "
        f"{spec.n} examples of {spec.data} in {result.seconds:.1f} s"
    )
    return 0
