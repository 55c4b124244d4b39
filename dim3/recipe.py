"""Recipes (what to merge, how) and the model card written beside a merged checkpoint.

A :class:`Recipe` is plain data: the base, one or more multilingual fine-tunes of it and the VLM,
with revisions, the method and its options, the output dtype and the device. It validates itself on construction (so bad input fails before any
tensor is read), round-trips through JSON (``dim3_recipe.json`` in every output, which
``python -m dim3 merge --recipe`` replays from any folder: local sources are recorded with their
absolute path and their path relative to the recipe, except in a server's saves), and renders the
model card. It opens no checkpoint; it reads only the sources' own model cards (front matter) for
the card's metadata.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import dim3
from dim3.methods import get_method

RECIPE_FILE = "dim3_recipe.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ROLES = ("base", "multilingual", "multimodal")
FISHER_FILE = "fisher.json"  # what a Fisher folder was estimated from (dim3.fisher writes it)


def multilingual_labels(n: int) -> list[str]:
    """Role labels of ``n`` multilingual models: ``multilingual`` alone, else ``multilingual_1..n``."""
    return ["multilingual"] if n == 1 else [f"multilingual_{i}" for i in range(1, n + 1)]


@dataclass(frozen=True)
class Source:
    """A checkpoint reference: a Hub id (``org/name``) or a local folder, with optional revision."""

    ref: str
    revision: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ref, str) or not self.ref.strip():
            raise ValueError("a checkpoint reference is empty: give a Hub id or a local folder")

    def __str__(self) -> str:
        return f"{self.ref}@{self.revision}" if self.revision else self.ref


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a merge's output.

    ``multilingual`` is a tuple of one or more Sources (a single Source or a list is accepted and
    normalised). Their order is kept and recorded: it is the order of the updates the method sees,
    ``[multimodal, multilingual_1, ..., multilingual_K]``.
    """

    base: Source
    multilingual: tuple[Source, ...]
    multimodal: Source
    method: str = "dim3"
    options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    device: str = "auto"
    # Fisher folders (``python -m dim3 fisher``) by role label, for methods with extra inputs
    # ("fisher"): multimodal and every multilingual label, plus base when its weight is above 0.
    fisher: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ml = self.multilingual
        ml = (ml,) if isinstance(ml, (Source, str)) else tuple(ml)
        ml = tuple(s if isinstance(s, Source) else Source(str(s)) for s in ml)
        if not ml:
            raise ValueError("give at least one multilingual model")
        object.__setattr__(self, "multilingual", ml)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICES)}, cuda:N")
        self.method_options()  # unknown method or bad options fail here
        self._check_fisher()

    def _check_fisher(self) -> None:
        """The Fisher folders name known roles; a Fisher merge has one for every model it needs."""
        if not isinstance(self.fisher, dict):
            raise ValueError(f"fisher must map role labels to folders, got {self.fisher!r}")
        object.__setattr__(self, "fisher", {str(k): str(v) for k, v in self.fisher.items()})
        roles = list(self.sources())
        unknown = sorted(set(self.fisher) - set(roles))
        if unknown:
            raise ValueError(f"Fisher given for unknown role(s) {unknown}; roles: {roles}")
        if get_method(self.method).extra_inputs != "fisher":
            return  # other methods ignore them (a sweep scores references from one recipe)
        needed = [r for r in roles if r != "base"]
        if self.method_options().base_weight > 0:
            needed.insert(0, "base")
        missing = [r for r in needed if not self.fisher.get(r, "").strip()]
        if missing:
            raise ValueError(
                f"method fisher needs a Fisher folder for {', '.join(missing)}: estimate each "
                "with `python -m dim3 fisher --model M --data SOURCE --out F`, then give "
                + " ".join(f"{r}=F" for r in missing)
                + " (CLI: --fisher ROLE=FOLDER ...; recipe: the fisher field)"
            )

    def method_options(self) -> Any:
        """The method's validated options object."""
        return get_method(self.method).make_options(self.options)

    def sources(self) -> dict[str, Source]:
        """Every checkpoint by role label: base, multilingual (or multilingual_1..K), multimodal."""
        ml = dict(zip(multilingual_labels(len(self.multilingual)), self.multilingual, strict=True))
        return {"base": self.base, **ml, "multimodal": self.multimodal}

    def to_dict(self) -> dict[str, Any]:
        return {"dim3_version": dim3.__version__, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """From JSON data; ``multilingual`` may be one source (older recipes) or a list."""
        skip = ("dim3_version", "resolved", "local", "fisher_info")
        data = {k: v for k, v in data.items() if k not in skip}
        try:
            ml = data.pop("multilingual")
            ml = [ml] if isinstance(ml, dict) else ml
            sources = {role: Source(**data.pop(role)) for role in ("base", "multimodal")}
            return cls(**sources, multilingual=tuple(Source(**m) for m in ml), **data)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid DiM3 recipe: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe file; local sources are found wherever the recipe is replayed from.

        A local source is used as written if that folder exists (relative to the working folder),
        else where the recipe recorded it (its absolute path), else relative to the recipe file;
        if it is in none of them, the error names the role and every place looked.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read recipe {path}: {exc}") from None
        recipe = cls.from_dict(data)
        local = data.get("local") if isinstance(data.get("local"), dict) else {}
        found = {
            role: _find_local(role, source, local.get(role) or {}, path.parent)
            for role, source in recipe.sources().items()
        }
        ml = tuple(found[r] for r in multilingual_labels(len(recipe.multilingual)))
        return replace(recipe, base=found["base"], multilingual=ml, multimodal=found["multimodal"])


def _find_local(role: str, source: Source, recorded: dict, recipe_dir: Path) -> Source:
    """``source`` with its local folder found (see :meth:`Recipe.load`); Hub ids unchanged.

    A folder that exists as written is kept as written (so labels stay as the user wrote them);
    otherwise the recorded absolute path, then the path relative to the recipe, is used.
    """
    from dim3.checkpoints import looks_local

    if not looks_local(source.ref) and not recorded:
        return source
    if Path(source.ref).expanduser().is_dir():
        return source
    candidates = [
        Path(p)
        for p in (
            recorded.get("absolute"),
            recorded.get("relative_to_recipe") and recipe_dir / recorded["relative_to_recipe"],
        )
        if p
    ]
    for candidate in candidates:
        if candidate.expanduser().is_dir():
            return replace(source, ref=str(candidate.expanduser().resolve()))
    looked = "; ".join(dict.fromkeys(str(c) for c in [Path(source.ref), *candidates]))
    raise ValueError(
        f"the recipe's {role} folder {source.ref!r} is missing: looked for {looked}. Restore "
        "that folder, or edit the recipe's path to where the checkpoint is now"
    )


def local_paths(recipe: Recipe, recipe_dir: Path) -> dict[str, dict[str, str]]:
    """Where each local source is: its absolute path and its path relative to ``recipe_dir``."""
    from dim3.checkpoints import looks_local

    out = {}
    for role, source in recipe.sources().items():
        if looks_local(source.ref):
            folder = Path(source.ref).expanduser().resolve()
            out[role] = {
                "absolute": str(folder),
                "relative_to_recipe": os.path.relpath(folder, recipe_dir.resolve()),
            }
    return out


def write_recipe(
    folder: Path,
    recipe: Recipe,
    resolved: dict[str, str | None],
    final_dir: Path | None = None,
    *,
    roots: Sequence[str | Path] | None = None,
) -> None:
    """Save the recipe as ``dim3_recipe.json``, plus the Hub commits it resolved to and where its
    local folders are (relative paths are computed from ``final_dir``, where the folder will be
    moved to; default ``folder``). A server's recipe (``roots``: its allowed folders) records
    neither, and names its other server paths (a Fisher folder, a probe file) as the app shows
    them (:func:`dim3.paths.redact_paths`): a visitor may push the folder to the Hub as it is, and
    the server's layout (which a relative path spells out too, up to the common folder) is not
    theirs to publish. Its local sources replay as written, from the app's folder."""
    data = recipe.to_dict() | {
        "resolved": resolved,
        "local": {} if roots is not None else local_paths(recipe, final_dir or folder),
    }
    if _uses_fisher(recipe):  # what each Fisher was estimated from (replay ignores it)
        data["fisher_info"] = describe_fishers(recipe)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if roots is not None:
        from dim3.paths import redact_paths

        text = redact_paths(text, roots)
    (folder / RECIPE_FILE).write_text(text)


def describe_fishers(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """Each Fisher folder's ``fisher.json`` (model, data, N, seed, labels...), by role."""
    out = {}
    for role, ref in recipe.fisher.items():
        try:
            out[role] = json.loads((Path(ref).expanduser() / FISHER_FILE).read_text("utf-8"))
        except (OSError, ValueError):
            out[role] = {"error": f"cannot read {FISHER_FILE}"}
    return out


def _uses_fisher(recipe: Recipe) -> bool:
    return bool(recipe.fisher) and get_method(recipe.method).extra_inputs == "fisher"


def _fisher_rows(recipe: Recipe) -> str:
    """Model-card lines naming each Fisher's model, data, N, seed and labels."""
    if not _uses_fisher(recipe):
        return ""
    rows = [
        f"| {role} | {code_span(ref)} | {code_span(m.get('data'))} | {code_span(m.get('n'))} | "
        f"{code_span(m.get('seed'))} | {code_span(m.get('labels'))} | {code_span(m.get('dtype'))} |"
        for (role, ref), m in zip(
            recipe.fisher.items(), describe_fishers(recipe).values(), strict=True
        )
    ]
    head = (
        "| role | Fisher folder | data | N | seed | labels | dtype |\n|---|---|---|---|---|---|---|"
    )
    return (
        "\nDiagonal Fisher information of each model (estimated with `python -m dim3 fisher`):\n\n"
        + "\n".join([head, *rows])
        + "\n"
    )


def code_span(value: Any) -> str:
    """``value`` as a Markdown code span that stays one table cell whatever it holds: a visitor's
    folder or revision name may carry ``|``, backticks, ``<`` or a line break. Pipes are escaped
    (a table splits on them even inside code), line breaks and other control characters shown as
    ``?``, and the fence is one backtick longer than the longest run inside."""
    text = re.sub(r"[\x00-\x1f\x7f]", "?", str(value)).replace("|", "\\|")
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _hub_ids(recipe: Recipe) -> list[str]:
    from dim3.checkpoints import looks_local

    return list(dict.fromkeys(s.ref for s in recipe.sources().values() if not looks_local(s.ref)))


def _fine_tunes(recipe: Recipe) -> str:
    n = len(recipe.multilingual)
    return "a multilingual fine-tune" if n == 1 else f"{n} multilingual fine-tunes (in this order)"


def card_metadata(folder: Path | None) -> dict[str, Any]:
    """The YAML front matter of a checkpoint's own model card (``README.md``), or {}."""
    if folder is None or not (Path(folder) / "README.md").is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(Path(folder) / "README.md") or {}
    except Exception:  # a card without valid front matter is simply not used  # noqa: BLE001
        return {}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def _yaml_scalar(value: str) -> str:
    """A YAML scalar: plain for Hub ids, language codes and the like, else JSON-quoted."""
    return value if re.fullmatch(r"[A-Za-z0-9][\w./+-]*", value) else json.dumps(value)


def _yaml_list(name: str, values: list[str]) -> list[str]:
    return [f"{name}:"] + [f"- {_yaml_scalar(v)}" for v in values] if values else []


def model_card(
    recipe: Recipe,
    summary: dict[str, int],
    resolved: dict[str, str | None],
    *,
    dtype: str | None = None,
    source_cards: dict[str, dict[str, Any]] | None = None,
) -> str:
    """A Hugging Face model card (README.md): Hub metadata in the front matter, a snippet that
    loads the merge, and the full recipe.

    ``dtype`` is what the output was written in (default: the recipe's dtype); ``source_cards``
    holds each role's own card metadata (:func:`card_metadata`): the card takes its ``language``
    from the multilingual models' and the VLM's cards and its ``license`` from the VLM's.
    """
    method = get_method(recipe.method)
    cards = source_cards or {}
    vlm = cards.get("multimodal", {})
    languages = list(
        dict.fromkeys(
            lang
            for role in [*multilingual_labels(len(recipe.multilingual)), "multimodal"]
            for lang in _as_list(cards.get(role, {}).get("language"))
        )
    )
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    front += _yaml_list("base_model", _hub_ids(recipe))
    front += ["base_model_relation: merge"] if _hub_ids(recipe) else []
    front += _yaml_list("language", languages)
    front += [f"license: {_yaml_scalar(str(vlm['license']))}"] if vlm.get("license") else []
    tags = dict.fromkeys(["merge", "dim3-studio", recipe.method, "multilingual", "vision"])
    front += _yaml_list("tags", list(tags)) + ["---"]
    rows = "\n".join(
        f"| {role} | {code_span(s.ref)} | {code_span(s.revision) if s.revision else 'default'} | "
        f"{code_span(resolved[role]) if resolved.get(role) else 'local'} |"
        for role, s in recipe.sources().items()
    )
    options = json.dumps(recipe.method_options().__dict__, ensure_ascii=False)
    written = dtype or recipe.dtype
    return (
        "\n".join(front)
        + f"""

# Merged VLM ({recipe.method})

This vision-language model was made without training by merging, with DiM3 Studio
(dim3 {dim3.__version__}), the language model of a VLM with {_fine_tunes(recipe)} of the same
base LLM. The vision encoder and projector are the VLM's, unchanged.

Method: **{method.name}**: {method.summary} ([paper]({method.paper}))

| role | checkpoint | revision | resolved commit |
|---|---|---|---|
{rows}

- Options: `{options}`
{_fisher_rows(recipe)}
- Output dtype: `{written}`{" (the VLM's own)" if recipe.dtype == "auto" else ""}
- Tensors: {summary["merged"]} merged, {summary["copied"]} copied, {summary["padded"]} vocabulary
  tensors with VLM-only rows kept as the VLM's.

## Use it

```python
from transformers import AutoModelForImageTextToText, AutoProcessor
from PIL import Image

path = "PATH_OR_HUB_ID_OF_THIS_MODEL"
processor = AutoProcessor.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto", device_map="auto")
messages = [{{"role": "user", "content": [
    {{"type": "image"}}, {{"type": "text", "text": "Welche Farbe hat die Form?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("picture.png")], text=prompt, return_tensors="pt")
output = model.generate(**inputs.to(model.device), max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Reproduce with `python -m dim3 merge --recipe {RECIPE_FILE} --out DIR`.
No evaluation of this merge is claimed here: test it on your own tasks.
"""
    )
