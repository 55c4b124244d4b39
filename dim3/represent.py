"""``python -m dim3 represent``: how merging reshapes multilingual representations, layer by layer.

The DiM3 paper (arXiv 2605.12960, Figures 3–9) explains its result with the hidden states of
parallel inputs (the same content in several languages): t-SNE maps and layer-wise silhouette
scores of average-pooled hidden states, for the original and the merged models. This module
computes that view for any models and parallel set (:mod:`dim3.probes`):

- **Pooling**: each item's prompt is the model's chat template around one user turn (the picture,
  then the text, for multimodal items). At every layer the hidden states are averaged over the
  tokens of the item's *text* only (the question, for a picture, as the paper pools the question
  span): not the template's own tokens, BOS, image tokens or padding. Layers follow
  ``output_hidden_states``: the embeddings (after the picture's features are put in place) first,
  then each decoder layer's output, the last one after the final norm. Forward hooks pool each
  layer as it is computed, so only one layer's hidden states of one batch exist at a time.
- **Metrics, per layer**: the silhouette score (scikit-learn, cosine distance) of the points
  labelled by **language** (high: languages apart; cross-lingual alignment lowers it) and by
  **content** (high: the same meaning together); and parallel-item **retrieval** accuracy: for
  each item in language A, is its nearest neighbour (cosine) among language B's items the same
  content? averaged over all ordered language pairs (chance is 1 / number of contents).
- **Maps**: a 2-D t-SNE (or PCA, the fast option) of one layer, coloured by language, marker by
  content.

It knows models' forward passes, tokenization spans and the metrics; it knows nothing about
Gradio. Writing files and the CLI are at the end.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import io
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dim3.probes import ParallelItem, ProbeError, check_parallel, load_parallel

SENTENCES = Path(__file__).resolve().parent.parent / "assets" / "parallel" / "sentences.jsonl"
BUILTIN = ("demo", "demo-text", "sentences")
POOLING = (
    "mean over the tokens of each item's text (the question, for a picture) inside the chat "
    "template's user turn; template tokens, BOS, image tokens and padding excluded"
)
METRICS = {
    "silhouette_language": "silhouette by language (low: aligned)",
    "silhouette_content": "silhouette by content (high: meaning)",
    "retrieval": "retrieval of translations",
}
CSV_FILE, JSON_FILE = "represent.csv", "represent.json"
CURVES_FILE = "represent_curves.png"
MAP_METHODS = ("tsne", "pca")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")

Progress = Callable[[str, int, int], None]  # (model name, items done, items total)


# --- inputs -----------------------------------------------------------------------------------


def parallel_items(
    name: str, *, allowed_roots: Sequence[str | Path] | None = None
) -> list[ParallelItem]:
    """A built-in parallel set (``demo``, ``demo-text``, ``sentences``) or a JSONL file (which,
    with its pictures, must lie under ``allowed_roots`` when given: the app)."""
    if name == "demo":
        from dim3.demo.parallel import demo_parallel

        return demo_parallel(pictures=True)
    if name == "demo-text":
        from dim3.demo.parallel import demo_parallel

        return demo_parallel(pictures=False)
    if name == "sentences":
        return load_parallel(SENTENCES)
    return load_parallel(name, allowed_roots=allowed_roots)


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def _prompt(processor: Any, item: ParallelItem) -> str:
    """The chat-template prompt for ``item`` (the raw text for a tokenizer without a template)."""
    tokenizer = _tokenizer(processor)
    if item.image is not None:
        content: Any = [{"type": "image"}, {"type": "text", "text": item.text}]
    elif hasattr(processor, "image_processor"):
        content = [{"type": "text", "text": item.text}]
    elif getattr(tokenizer, "chat_template", None):
        content = item.text
    else:
        return item.text  # a base LLM without a chat template reads the text as it is
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _text_tail(tokenizer: Any, prompt: str, text: str, special: bool) -> tuple[list[int], int]:
    """(token ids from the text's first token to the prompt's end, how many are the text's)."""
    start = prompt.rfind(text)
    if start < 0:
        raise ValueError(f"the chat template dropped the text {text[:40]!r}; cannot pool it")
    end = start + len(text)
    enc = tokenizer(prompt, add_special_tokens=special, return_offsets_mapping=True)
    inside = [
        i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start
    ]
    if not inside:
        raise ValueError(f"the text {text[:40]!r} has no tokens of its own in the prompt")
    first = inside[0]
    return list(enc["input_ids"][first:]), inside[-1] - first + 1


def batch_inputs(
    model: Any, processor: Any, items: Sequence[ParallelItem]
) -> tuple[Any, torch.Tensor]:
    """Model inputs for ``items`` (all with or all without a picture) and the text-token mask.

    The mask (batch, seq) is 1 on the tokens of each item's text. The text's tokens are found in
    the template prompt by character offsets, then matched against the end of the model's own
    input row (a processor expands image placeholders, which come before the text).
    """
    from dim3.chat import load_image

    tokenizer = _tokenizer(processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [_prompt(processor, it) for it in items]
    bos = tokenizer.bos_token
    special = not (bos and prompts[0].startswith(bos))  # as evaluate: never two BOS
    kwargs: dict[str, Any] = {
        "return_tensors": "pt",
        "padding": True,
        "padding_side": "left",
        "add_special_tokens": special,
    }
    if items[0].image is not None:
        images = [load_image(it.image) for it in items]
        inputs = processor(text=prompts, images=images, **kwargs)
    elif hasattr(processor, "image_processor"):
        inputs = processor(text=prompts, **kwargs)
    else:
        inputs = tokenizer(prompts, **kwargs)
    ids = inputs["input_ids"]
    mask = torch.zeros(ids.shape, dtype=torch.float32)
    for row, (prompt, item) in enumerate(zip(prompts, items, strict=True)):
        tail, count = _text_tail(tokenizer, prompt, item.text, special)
        got = ids[row, ids.shape[1] - len(tail) :].tolist()
        if got != tail:
            raise ValueError(
                f"cannot find the tokens of {item.text[:40]!r} in the model's input; the "
                "processor changes the text after the picture (unsupported processor)"
            )
        start = ids.shape[1] - len(tail)
        mask[row, start : start + count] = 1.0
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs, mask


# --- pooled hidden states ---------------------------------------------------------------------


def decoder_of(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, torch.nn.Module]:
    """(decoder layers, final norm) of a causal LM or of a VLM's language model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "layers"):
        candidates = [
            m
            for m in model.modules()
            if isinstance(getattr(m, "layers", None), torch.nn.ModuleList) and hasattr(m, "norm")
        ]
        if not candidates:
            raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
        decoder = max(candidates, key=lambda m: len(m.layers))
    return decoder.layers, decoder.norm


class LayerPooler:
    """Forward hooks that mean-pool every layer's hidden states over a token mask, as computed.

    Only forwards run on the thread that entered the context are recorded (the app's chats may
    use the same model at the same time). ``pooled[layer]`` collects (batch, hidden) float32 CPU
    tensors; layer 0 is the embeddings, the last one the final norm's output.
    """

    def __init__(self, model: torch.nn.Module):
        self.layers, self.norm = decoder_of(model)
        self.mask: torch.Tensor | None = None
        self.pooled: list[list[torch.Tensor]] = [[] for _ in range(len(self.layers) + 1)]
        self._owner = threading.get_ident()
        self._handles: list[Any] = []

    def _record(self, index: int, hidden: Any) -> None:
        if threading.get_ident() != self._owner or self.mask is None:
            return
        h = hidden[0] if isinstance(hidden, tuple) else hidden  # (batch, seq, hidden)
        m = self.mask.to(h.device)
        pooled = (h.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (batch, hidden)
        self.pooled[index].append(pooled.cpu())

    def __enter__(self) -> LayerPooler:
        def pre(_mod: Any, args: tuple, kwargs: dict) -> None:
            self._record(0, args[0] if args else kwargs["hidden_states"])

        self._handles.append(self.layers[0].register_forward_pre_hook(pre, with_kwargs=True))
        for i, layer in enumerate(self.layers[:-1]):
            self._handles.append(
                layer.register_forward_hook(lambda _m, _a, out, i=i: self._record(i + 1, out))
            )
        last = len(self.layers)
        self._handles.append(
            self.norm.register_forward_hook(lambda _m, _a, out: self._record(last, out))
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def result(self) -> np.ndarray:
        """(layers + 1, items, hidden) float32."""
        return np.stack([torch.cat(chunks).numpy() for chunks in self.pooled])


@torch.no_grad()
def pooled_states(
    model: Any,
    processor: Any,
    items: Sequence[ParallelItem],
    *,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Mean-pooled hidden states of every layer: array (layers + 1, len(items), hidden)."""
    with LayerPooler(model) as pooler:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            inputs, pooler.mask = batch_inputs(model, processor, chunk)
            model(**inputs, use_cache=False, logits_to_keep=1)
            if progress:
                progress(min(start + batch_size, len(items)), len(items))
        pooler.mask = None
        return pooler.result()


# --- metrics ----------------------------------------------------------------------------------


def silhouette(points: np.ndarray, labels: Sequence[str]) -> float:
    """scikit-learn's silhouette score with cosine distance (NaN when undefined)."""
    from sklearn.metrics import silhouette_score

    n_labels = len(set(labels))
    if not 2 <= n_labels <= len(labels) - 1:
        return float("nan")
    return float(silhouette_score(points, list(labels), metric="cosine"))


def retrieval_accuracy(
    points: np.ndarray, groups: Sequence[str], languages: Sequence[str]
) -> float:
    """Mean over ordered language pairs (A, B) of: the share of A's items whose nearest item
    of B (cosine similarity, first on ties) has the same content ``group``."""
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    unit = points / np.maximum(norms, 1e-12)
    by_lang: dict[str, list[int]] = {}
    for i, lang in enumerate(languages):
        by_lang.setdefault(lang, []).append(i)
    scores = []
    for a, rows_a in by_lang.items():
        for b, rows_b in by_lang.items():
            if a == b:
                continue
            groups_b = [groups[j] for j in rows_b]
            queries = [i for i in rows_a if groups[i] in set(groups_b)]
            if not queries:
                continue
            sims = unit[queries] @ unit[rows_b].T  # (queries, B's items)
            hits = [groups_b[j] == groups[i] for i, j in zip(queries, sims.argmax(1), strict=True)]
            scores.append(float(np.mean(hits)))
    return float(np.mean(scores)) if scores else float("nan")


def layer_metrics(states: np.ndarray, items: Sequence[ParallelItem]) -> dict[str, list[float]]:
    """Per layer: silhouette by language, by content, and retrieval accuracy."""
    languages = [it.language for it in items]
    groups = [it.group for it in items]
    out: dict[str, list[float]] = {k: [] for k in METRICS}
    for layer in states:
        out["silhouette_language"].append(silhouette(layer, languages))
        out["silhouette_content"].append(silhouette(layer, groups))
        out["retrieval"].append(retrieval_accuracy(layer, groups, languages))
    return out


@dataclass
class Representations:
    """Pooled states and metrics of several models on one parallel set."""

    items: list[ParallelItem]
    states: dict[str, np.ndarray]  # model name -> (layers + 1, items, hidden)
    metrics: dict[str, dict[str, list[float]]]
    probe: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return list(range(len(next(iter(self.states.values())))))

    def add(self, name: str, states: np.ndarray) -> None:
        self.states[name] = states
        self.metrics[name] = layer_metrics(states, self.items)

    def to_json(self) -> dict[str, Any]:
        languages = list(dict.fromkeys(it.language for it in self.items))
        groups = list(dict.fromkeys(it.group for it in self.items))
        return {
            "layers": self.layers,
            "models": {n: {k: _clean(v) for k, v in m.items()} for n, m in self.metrics.items()},
            "probe": self.probe,
            "items": len(self.items),
            "languages": languages,
            "contents": len(groups),
            "pictures": self.items[0].image is not None,
            "pooling": POOLING,
            "distance": "cosine",
            "retrieval_chance": round(1 / len(groups), 4),
            "notes": self.notes,
        }

    def csv_text(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["model", "layer", *METRICS])
        for name, m in self.metrics.items():
            for layer in self.layers:
                writer.writerow([name, layer, *(_fmt(m[k][layer]) for k in METRICS)])
        return buf.getvalue()


def _clean(values: list[float]) -> list[float | None]:
    return [None if v != v else round(float(v), 6) for v in values]  # NaN -> null in JSON


def _fmt(v: float) -> str:
    return "" if v != v else f"{v:.6f}"


# --- maps and plots ---------------------------------------------------------------------------


def project(points: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """2-D coordinates (n, 2) of ``points`` by t-SNE or PCA (scikit-learn), seeded."""
    if method not in MAP_METHODS:
        raise ValueError(f"map method {method!r} is not one of {', '.join(MAP_METHODS)}")
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(points)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    # exact gradients beat Barnes-Hut below ~1000 points (5 s against 48 s for 192 points on a
    # busy 2-core machine)
    how = "exact" if len(points) <= 1000 else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, method=how)
    return tsne.fit_transform(points)


def curves_figure(rep: Representations):
    """Three panels (language silhouette, content silhouette, retrieval) over layers, one line
    per model in its colour and marker (``dim3.plots.curves_figure``)."""
    from dim3 import plots

    return plots.curves_figure(rep.layers, rep.metrics, METRICS)


def map_figure(rep: Representations, layer: int, method: str = "tsne", seed: int = 0):
    """One 2-D map per model of ``layer``: colour = language, marker = content."""
    from dim3 import plots

    if not 0 <= layer < len(rep.layers):
        raise ValueError(f"layer {layer} does not exist; choose 0..{len(rep.layers) - 1}")
    names = list(rep.states)
    languages = list(dict.fromkeys(it.language for it in rep.items))
    groups = list(dict.fromkeys(it.group for it in rep.items))
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if len(languages) > 10 else "tab10"]
    fig = plots.new_figure(4.2 * len(names) + 1.2, 4.4)
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        xy = project(rep.states[name][layer], method, seed)
        cells: dict[tuple[str, str], list[int]] = {}  # (language, content) -> rows, in one pass
        for i, it in enumerate(rep.items):
            cells.setdefault((it.language, it.group), []).append(i)
        for li, lang in enumerate(languages):
            for gi, group in enumerate(groups):
                rows = cells.get((lang, group))
                if rows:
                    ax.scatter(
                        xy[rows, 0],
                        xy[rows, 1],
                        color=cmap(li % cmap.N),
                        marker=MARKERS[gi % len(MARKERS)],
                        s=22,
                        label=lang if gi == 0 else None,
                    )
        ax.set_title(f"{name}: layer {layer} ({method})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(
        *axes[0][-1].get_legend_handles_labels(),
        loc="outside right center",
        fontsize=8,
        title="language",
        frameon=False,
    )
    return fig


def write_outputs(
    rep: Representations, out: Path, *, layer: int, method: str, seed: int
) -> list[Path]:
    """CSV, JSON, the curves PNG and the map PNG of ``layer`` into folder ``out``."""
    from dim3.plots import save

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / CSV_FILE, out / JSON_FILE, out / CURVES_FILE, out / f"represent_map_{layer}.png"]
    paths[0].write_text(rep.csv_text(), encoding="utf-8")
    data = rep.to_json() | {"map": {"layer": layer, "method": method, "seed": seed}}
    paths[1].write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for fig, path in (
        (curves_figure(rep), paths[2]),
        (map_figure(rep, layer, method, seed), paths[3]),
    ):
        save(fig, path, dpi=100)
    return paths


# --- models -----------------------------------------------------------------------------------


def represent_models(
    models: dict[str, tuple[Any, Any]],
    items: Sequence[ParallelItem],
    *,
    batch_size: int = 16,
    probe: str = "",
    progress: Progress | None = None,
) -> Representations:
    """Pooled states and metrics of already loaded ``{name: (model, processor)}`` (the app's
    original and merged VLMs); nothing is loaded or changed."""
    check_parallel(items, probe or "the parallel set")
    rep = Representations(list(items), {}, {}, probe=probe)
    for name, (model, processor) in models.items():

        def step(done: int, total: int, name: str = name) -> None:
            if progress:
                progress(name, done, total)

        rep.add(name, pooled_states(model, processor, items, batch_size=batch_size, progress=step))
    return rep


def _load_llm(path: Path, device: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        dtype=dtype,
        device_map={"": device} if device != "cpu" else None,
        use_safetensors=True,
    )
    return model.eval(), tokenizer


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _llm_sources(recipe: Any) -> list[tuple[str, Any]]:
    """("base", Source) and one ("multilingual", Source) per multilingual model of ``recipe``."""
    ml = recipe.multilingual
    mls = list(ml) if isinstance(ml, (tuple, list)) else [ml]
    names = (
        ["multilingual"] if len(mls) == 1 else [f"multilingual-{i + 1}" for i in range(len(mls))]
    )
    return [("base", recipe.base), *zip(names, mls, strict=True)]


def represent_recipe(
    recipe: Any,
    items: Sequence[ParallelItem],
    *,
    methods: Sequence[str] = (),
    llms: bool = False,
    batch_size: int = 16,
    probe: str = "",
    progress: Progress | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
) -> Representations:
    """Pooled states and metrics of the original VLM of ``recipe``, of its merge (the recipe's
    method and options) and of each extra method in ``methods`` (default options), and of the
    base and multilingual LLMs when ``llms`` and the items are text only.

    One VLM is loaded (float32 on CPU, bfloat16 on CUDA) and merged in place for each method:
    ``merge_into_model`` recomputes every merged tensor from the checkpoints, so no copy of the
    original is kept. The LLMs are loaded one at a time, before the VLM.
    """
    from dim3.chat import load_vlm
    from dim3.checkpoints import resolve
    from dim3.engine import merge_into_model, resolve_device

    check_parallel(items, probe or "the parallel set")
    device = resolve_device(recipe.device).type
    rep = Representations(list(items), {}, {}, probe=probe)

    def run(name: str, model: Any, processor: Any) -> None:
        def step(done: int, total: int) -> None:
            if progress:
                progress(name, done, total)

        rep.add(name, pooled_states(model, processor, items, batch_size=batch_size, progress=step))

    if llms and items[0].image is not None:
        rep.notes.append("base and multilingual LLMs skipped: this set has pictures")
    elif llms:
        for name, source in _llm_sources(recipe):
            path = resolve(source.ref, source.revision, allowed_roots=allowed_roots, token=token)
            model, tokenizer = _load_llm(path, device)
            run(name, model, tokenizer)
            del model
            _free()
    folder = resolve(
        recipe.multimodal.ref, recipe.multimodal.revision, allowed_roots=allowed_roots, token=token
    )
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, processor = load_vlm(
        folder, dtype=dtype, device_map=None if device == "cpu" else {"": device}
    )
    run("original", model, processor)
    recipes = [recipe] + [
        dataclasses.replace(recipe, method=m, options={}) for m in methods if m != recipe.method
    ]
    for r in recipes:
        merge_into_model(model, r, allowed_roots=allowed_roots, token=token)
        run(r.method, model, processor)
    del model
    _free()
    return rep


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m dim3 represent``: the merge's flags plus the analysis'."""
    from dim3.cli import add_method_arguments, add_source_arguments

    parser.add_argument(
        "--probe",
        default="demo",
        help="parallel set: 'demo' (demo pictures + a question), 'demo-text' (demo scene "
        "descriptions), 'sentences' (everyday sentences, 12 languages) or a JSONL file",
    )
    add_source_arguments(parser, required=False)
    add_method_arguments(parser)
    parser.add_argument(
        "--also", default="", help="more methods to compare, at their defaults (comma-separated)"
    )
    parser.add_argument(
        "--llms", action="store_true", help="also the base and multilingual LLMs (text sets only)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (CSV, JSON, PNG)")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--layer", type=int, default=None, help="layer of the map (default: middle)"
    )
    parser.add_argument("--map", default="tsne", choices=MAP_METHODS, help="2-D map method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the map")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def demo_defaults(args: argparse.Namespace) -> None:
    """Fill ``--base/--multilingual/--multimodal`` with the demo trio when none is given."""
    from dim3.demo import demo_trio
    from dim3.recipe import ROLES

    given = {r: getattr(args, r) for r in ROLES}
    if any(given.values()) and not all(given.values()):
        missing = [f"--{r}" for r in ROLES if not given[r]]
        raise ValueError(
            f"give all three checkpoints or none (for the demo trio); missing {', '.join(missing)}"
        )
    if not any(given.values()):
        for role, path in zip(ROLES, demo_trio(), strict=True):
            setattr(args, role, [str(path)] if role == "multilingual" else str(path))


def run(args: argparse.Namespace) -> int:
    from dim3.cli import fetch, recipe_from_args
    from dim3.evaluate import parse_methods

    items = parallel_items(args.probe)
    demo_defaults(args)
    recipe = recipe_from_args(args)
    fetch(recipe)  # the trio's downloads, sized together first
    methods = parse_methods(args.also) if args.also.strip() else ()
    start = time.perf_counter()
    shown: set[str] = set()

    def progress(name: str, done: int, total: int) -> None:
        if name not in shown:
            shown.add(name)
            print(f"{name} ({time.perf_counter() - start:.0f}s)", flush=True)

    rep = represent_recipe(
        recipe,
        items,
        methods=methods,
        llms=args.llms,
        batch_size=args.batch_size,
        probe=args.probe if args.probe in BUILTIN else str(args.probe),
        progress=progress,
    )
    layer = len(rep.layers) // 2 if args.layer is None else args.layer
    paths = write_outputs(rep, args.out, layer=layer, method=args.map, seed=args.seed)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(paths[1].read_text(encoding="utf-8"), encoding="utf-8")
        paths.append(args.json)
    print(format_table(rep))
    for note in rep.notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def format_table(rep: Representations) -> str:
    """Per model, per layer: the three figures, as fixed-width text."""
    lines = [f"{'model':<18}{'layer':>6}{'sil.lang':>10}{'sil.content':>12}{'retrieval':>10}"]
    for name, m in rep.metrics.items():
        for layer in rep.layers:
            vals = [m[k][layer] for k in METRICS]
            lines.append(
                f"{name:<18}{layer:>6}"
                + "".join(f"{v:>{w}.3f}" for v, w in zip(vals, (10, 12, 10), strict=True))
            )
    return "\n".join(lines)


__all__ = [
    "ProbeError",
    "Representations",
    "batch_inputs",
    "layer_metrics",
    "map_figure",
    "parallel_items",
    "pooled_states",
    "represent_recipe",
    "retrieval_accuracy",
    "silhouette",
]
