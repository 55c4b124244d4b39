"""The command line: ``python -m dim3 COMMAND ...`` (``python -m dim3 --help`` lists them).

Each subcommand lives in a module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
:data:`SUBCOMMANDS` lists them explicitly. Expected failures (bad options, missing or unrelated
checkpoints, an occupied output folder) exit with status 2 and one clear line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

from dim3.checkpoints import CheckpointError
from dim3.methods import METHODS, option_fields
from dim3.recipe import DEVICES, DTYPES, ROLES, Recipe, Source

# name -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("dim3.cli", "merge three checkpoints into a new VLM checkpoint"),
    "plan": ("dim3.cli", "check three checkpoints and print the merge plan; writes nothing"),
    "diagnose": ("dim3.diagnostics", "per-layer residual geometry of three checkpoints: CSV, PNG"),
    "eval": (
        "dim3.evaluate",
        "scores of the original VLM and each merge on a probe set or a multilingual benchmark",
    ),
    "represent": ("dim3.represent", "per-layer cross-lingual structure of hidden states: CSV, PNG"),
    "sweep": ("dim3.sweep", "a grid of one method's options, tuned and reported on probe halves"),
    "fisher": ("dim3.fisher", "a model's diagonal Fisher on N examples, for --method fisher"),
}


def add_source_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--base/--multilingual/--multimodal`` and their ``--revision-*``.

    ``--multilingual`` (and ``--revision-multilingual``) may be given several times: language
    experts, all fine-tuned from the base, merged in the order given.
    """
    for role, what in zip(
        ROLES,
        (
            "the base LLM",
            "a multilingual fine-tune of the base (repeat for several experts)",
            "the VLM tuned from the base",
        ),
        strict=True,
    ):
        several = role == "multilingual"
        parser.add_argument(
            f"--{role}",
            required=required,
            action="append" if several else "store",
            help=f"{what}: Hub id or folder",
        )
        parser.add_argument(
            f"--revision-{role}",
            default=None,
            action="append" if several else "store",
            help=f"Hub revision of --{role}" + (" (repeat, in the same order)" if several else ""),
        )


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="dim3", choices=sorted(METHODS))
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, repeatable (each method's options: docs/methods.md)",
    )
    add_dim3_arguments(parser)
    parser.add_argument(
        "--fisher",
        nargs="+",
        default=[],
        metavar="ROLE=FOLDER",
        help="Fisher folders (python -m dim3 fisher) for --method fisher: multimodal=F and "
        "multilingual=F (multilingual_1=F ... for several), base=F when its weight is above 0",
    )


def parse_fisher(values: Sequence[str]) -> dict[str, str]:
    """``["base=F0", "multimodal=F2"]`` -> ``{"base": "F0", "multimodal": "F2"}``."""
    out: dict[str, str] = {}
    for text in values or ():
        role, sep, folder = (part.strip() for part in text.partition("="))
        if not sep or not role or not folder:
            raise ValueError(f"--fisher {text!r} is not ROLE=FOLDER (e.g. multimodal=fisher/vlm)")
        if role in out:
            raise ValueError(f"--fisher gives {role} twice; give one folder per role")
        out[role] = folder
    return out


def add_dim3_arguments(parser: argparse.ArgumentParser, prefix: str = "DiM3") -> None:
    """``--above-average-ratio`` and ``--calibration``, from the DiM3 options' metadata."""
    for f in option_fields("dim3"):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=float,
            default=None,
            help=f"{prefix}: {f.metadata.get('help', '')} (default {f.default})",
        )


def dim3_options_from_args(args: argparse.Namespace) -> dict[str, float]:
    """The DiM3 options given on the command line (unset ones left to their defaults)."""
    return {
        f.name: getattr(args, f.name)
        for f in option_fields("dim3")
        if getattr(args, f.name, None) is not None
    }


def sources_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--base/--multilingual/--multimodal`` with their ``--revision-*`` as Recipe keywords:
    a Source for base and multimodal, a tuple of Sources for multilingual."""
    refs, revisions = args.multilingual or [], args.revision_multilingual or []
    refs = [refs] if isinstance(refs, str) else refs
    revisions = [revisions] if isinstance(revisions, str) else revisions
    if len(revisions) > len(refs):
        raise ValueError(
            f"{len(revisions)} --revision-multilingual for {len(refs)} --multilingual: give one "
            "revision per multilingual model, in the same order (or none)"
        )
    revisions = revisions + [None] * (len(refs) - len(revisions))
    return {
        "base": Source(args.base, args.revision_base),
        "multilingual": tuple(Source(r, v) for r, v in zip(refs, revisions, strict=True)),
        "multimodal": Source(args.multimodal, args.revision_multimodal),
    }


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, number, bool, list of numbers or string)."""
    if "=" not in text:
        raise ValueError(f"--option {text!r} is not KEY=VALUE")
    key, raw = (part.strip() for part in text.split("=", 1))
    for parse in (int, float):
        try:
            return key, parse(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    if "," in raw:
        return key, [float(x) for x in raw.split(",")]
    return key, raw


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    options = dict(parse_option(o) for o in args.option)
    dim3_options = dim3_options_from_args(args)
    if dim3_options and args.method != "dim3":
        flag = "--" + next(iter(dim3_options)).replace("_", "-")
        raise ValueError(f"{flag} is a DiM3 option; use --option")
    options.update(dim3_options)
    return Recipe(
        **sources_from_args(args),
        method=args.method,
        options=options,
        dtype=getattr(args, "dtype", "auto"),
        device=getattr(args, "device", "auto"),
        fisher=parse_fisher(getattr(args, "fisher", [])),
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``merge`` and ``plan`` (``plan`` ignores the output ones)."""
    add_source_arguments(parser, required=False)
    add_method_arguments(parser)
    parser.add_argument("--recipe", help="replay a dim3_recipe.json instead of the options")
    parser.add_argument("--out", help="output folder (merge)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="output dtype")
    parser.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)}, cuda:N")
    parser.add_argument("--shard-size", default="5GB", help="max shard size, e.g. 5GB")
    parser.add_argument(
        "--chunk-size",
        default=None,
        help="memory budget per slice: tensors larger than this in float32 are merged in row "
        "slices (default 32MiB; results agree to float rounding)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _recipe(args: argparse.Namespace) -> Recipe:
    if args.recipe:
        recipe = Recipe.load(args.recipe)
        _check_fishers(recipe, args.recipe)
        return recipe
    missing = [f"--{r}" for r in ROLES if not getattr(args, r)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give --recipe FILE)")
    return recipe_from_args(args)


def _check_fishers(recipe: Recipe, path: str) -> None:
    """A ``fisher`` recipe replayed where its Fisher folders are not (a recipe saved on another
    machine, or in the app, whose folders it names as the app's): refuse it naming each missing
    folder with the command that estimates it again, from what the recipe records of it
    (``fisher_info``: each folder's ``fisher.json`` as it was merged)."""
    import json
    import shlex
    from pathlib import Path

    from dim3.methods import get_method

    if get_method(recipe.method).extra_inputs != "fisher":
        return
    missing = {r: ref for r, ref in recipe.fisher.items() if not Path(ref).expanduser().is_dir()}
    if not missing:
        return
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8")).get("fisher_info") or {}
    except (OSError, ValueError, AttributeError):
        info = {}
    fixes = []
    for role, ref in missing.items():
        meta = info.get(role) if isinstance(info.get(role), dict) else {}
        model, commit = str(meta.get("model") or ""), meta.get("commit")
        if not model or "data" not in meta:
            how = "python -m dim3 fisher --model M --data SOURCE --out " + shlex.quote(ref)
        else:
            argv = ["--model", model]
            if commit and model.endswith(f"@{commit}"):
                argv = ["--model", model[: -len(commit) - 1], "--revision", str(commit)]
            argv += ["--data", str(meta["data"]), "--n", str(meta.get("n", 64))]
            argv += ["--seed", str(meta.get("seed", 0)), "--labels", str(meta.get("labels"))]
            argv += ["--dtype", str(meta.get("dtype", "float32"))]
            if meta.get("labels") == "sampled":
                argv += ["--max-new-tokens", str(meta.get("max_new_tokens", 8))]
            how = shlex.join(["python", "-m", "dim3", "fisher", *argv, "--out", ref])
        fixes.append(f"{role} ({ref}): `{how}`")
    raise ValueError(
        "the recipe's Fisher folders are not here; estimate each again as the recipe records "
        "it (fisher_info), or write where they are into its fisher field: " + "; ".join(fixes)
    )


def run(args: argparse.Namespace) -> int:
    from dim3 import engine

    recipe = _recipe(args)
    if args.command == "plan":
        print(engine.plan(recipe).describe(recipe.dtype))
        return 0
    if not args.out:
        raise ValueError("merge needs --out DIR")
    from tqdm.auto import tqdm

    bars: list[tqdm] = []  # created at the first tensor, so early errors print one clean line
    downloads = DownloadBar()  # one bar for the Hub downloads, all checkpoints together
    shown_at = [0.0]  # when a slow rule's step was last drawn

    def progress(p: engine.Progress) -> None:
        if downloads(p):
            return
        if not bars:
            downloads.close()  # done: the merge has begun
            bars.append(tqdm(total=p.total, unit="tensor", desc="merging"))
        step = f" step {p.step}/{p.steps}" if p.steps else ""
        show = bool(p.steps) and time.monotonic() - shown_at[0] >= 0.5  # a step line twice a second
        if show:
            shown_at[0] = time.monotonic()
        bars[0].set_postfix_str(p.key[-48:] + step, refresh=show)
        bars[0].update(p.done - bars[0].n)

    try:
        result = engine.merge_to_folder(
            recipe,
            args.out,
            overwrite=args.overwrite,
            shard_size=args.shard_size,
            progress=progress,
            **({"chunk_size": args.chunk_size} if args.chunk_size else {}),
        )
    finally:
        downloads.close()
        for bar in bars:
            bar.close()
    print(result.plan.describe(recipe.dtype))
    print(f"Wrote {result.out_dir} in {result.seconds:.1f} s")
    return 0


class DownloadBar:
    """A command's one "downloading" bar for a job's Hub downloads, all checkpoints together:
    called with each :class:`dim3.engine.Progress`, it draws those of phase "download" and says
    whether it did; made at the first (nothing is drawn where all is cached)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, p: Any) -> bool:
        if p.phase != "download":
            return False
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=p.bytes_total, unit="B", unit_scale=True, desc="downloading")
        self.bar.update(p.bytes_done - self.bar.n)
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fetch(recipe: Recipe) -> int:
    """Download ``recipe``'s Hub checkpoints not yet cached, sized together before the first
    byte (:func:`dim3.engine.fetch_inputs`), with one bar: what ``eval``, ``sweep``,
    ``represent`` and ``diagnose`` do before they load a model, so that a trio that does not fit
    is refused at once, not after its VLM (loaded first) has downloaded. Returns the bytes
    downloaded."""
    from dim3 import engine

    bar = DownloadBar()
    try:
        return engine.fetch_inputs(recipe, progress=bar)
    finally:
        bar.close()


DESCRIPTION = (
    "DiM3 Studio: merge a base LLM, multilingual fine-tunes of it and a VLM built on it into a VLM "
    "that keeps its vision and gains the languages; then check, evaluate and analyse the result."
)


def build_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in SUBCOMMANDS) + 2
    commands = "\n".join(f"  {name:<{width}}{text}" for name, (_, text) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="python -m dim3",
        description=textwrap.fill(DESCRIPTION, 80),
        epilog=f"commands:\n{commands}\n\n'python -m dim3 COMMAND --help' shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return module.run(args)
    except (ValueError, CheckpointError, FileExistsError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
