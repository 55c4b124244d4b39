"""The registry of merge rules: name -> (function, options class, paper).

A rule is a pure function ``fn(base, tuned, options, *, name="") -> Tensor``:

- ``base`` (Tensor of shape (out, in) or (n,)): the base model's tensor, float32.
- ``tuned`` (list of Tensors shaped like ``base``): the fine-tuned models' tensors, float32, in the
  engine's fixed order ``[multimodal, multilingual_1, ..., multilingual_K]``. Rules without
  per-model weights accept any number N ≥ 1 of them.
- ``options``: a frozen dataclass instance of the method's ``options`` class.
- ``name``: the tensor's name, for rules that need a per-tensor seed (DARE) and for messages.
- ``extra`` (only for a method with ``extra_inputs``): more tensors shaped like ``base``, e.g.
  each model's Fisher information for ``fisher``.

It returns the merged tensor, float32, shaped like ``base``, on ``base``'s device. It does no I/O
and chooses no device. 2-D tensors are (out, in) with columns as the units that rules such as DiM3
rank; the engine transposes token embeddings first, so their columns are tokens.

Options classes are frozen dataclasses validated in ``__post_init__``. Each field carries
``metadata={"help": str, "min": float, "max": float}`` (min/max where they apply), so the CLI and
the app can show and check them without knowing the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dim3.methods import (
    breadcrumbs,
    dare,
    dim3,
    fisher,
    iso,
    linear,
    neuromerging,
    optmerge,
    pcb,
    stf,
    task_arithmetic,
    ties,
    tsv,
    wudi,
)
from dim3.methods._svd import RANDOMIZED_NOTE
from dim3.methods._utils import DARE_BLOCK

RuleFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Method:
    """One merge method: its rule, its options class and where it comes from."""

    name: str
    fn: RuleFn
    options: type
    paper: str
    summary: str
    # How the engine may cut a tensor for this rule (see dim3/engine.py): "elementwise" (any row
    # slice on its own), "columns" (per-column statistics gathered over row slices, then applied
    # slice by slice), "selection" (a per-tensor magnitude threshold found first), "ranked"
    # (per-update order statistics found in stages, each two passes: PCB) or "matrix" (the whole
    # tensor at once: SVD or optimisation).
    kind: str = "elementwise"
    # The pieces the engine drives slice by slice for "columns", "selection" and "ranked" rules.
    parts: Any = None
    # Per-tensor inputs besides the weights that the rule takes as ``extra=[...]``, read by the
    # engine slice by slice like the weights: "" (none) or "fisher" (each model's diagonal Fisher,
    # from the recipe's ``fisher`` folders; see dim3/fisher.py).
    extra_inputs: str = ""
    # Entries per block of whole rows that the rule draws at random as a unit (DARE's masks,
    # :data:`dim3.methods._utils.DARE_BLOCK`; 0: none): the engine cuts the rows among its
    # threads on block boundaries, so that no block is drawn by two threads.
    row_blocks: int = 0
    # The rule written straight into an output tensor in that tensor's dtype, where a compiled
    # pass does it: ``into(base, tuned, options, out)`` returns True once ``out`` holds what
    # ``out.copy_(fn(base, tuned, options))`` would, False (``out`` left meaningless) where it
    # cannot; None: no such pass. The engine's tiles use it to skip a float32 buffer.
    into: Callable[..., bool] | None = None

    def make_options(self, values: dict[str, Any] | None = None) -> Any:
        """Build validated options from a plain dict; unknown keys raise ``ValueError``."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}; "
                f"valid options: {sorted(known)}"
            )
        return self.options(**values)

    def merge(self, base: Tensor, tuned: Sequence[Tensor], options: Any, name: str = "") -> Tensor:
        return self.fn(base, list(tuned), options, name=name)


METHODS: dict[str, Method] = {
    "dim3": Method(
        name="dim3",
        fn=dim3.merge,
        options=dim3.DiM3Options,
        paper="https://arxiv.org/abs/2605.12960",
        summary="Direction- and magnitude-aware column weighting of each residual update.",
        kind="columns",
        parts=dim3.PARTS,
    ),
    "task_arithmetic": Method(
        name="task_arithmetic",
        fn=task_arithmetic.merge,
        options=task_arithmetic.TaskArithmeticOptions,
        into=task_arithmetic.merge_into,
        paper="https://arxiv.org/abs/2212.04089",
        summary="Base plus the weighted sum of both updates, scaled by λ.",
    ),
    "linear": Method(
        name="linear",
        fn=linear.merge,
        options=linear.LinearOptions,
        paper="https://arxiv.org/abs/2203.05482",
        summary="Weighted average of the two tuned models (weights normalised to sum to 1).",
    ),
    "ties": Method(
        name="ties",
        fn=ties.merge,
        options=ties.TiesOptions,
        paper="https://arxiv.org/abs/2306.01708",
        summary="Trim each update to its largest entries, elect a sign, average the agreeing ones.",
        kind="selection",
        parts=ties.PARTS,
    ),
    "dare_task_arithmetic": Method(
        name="dare_task_arithmetic",
        fn=dare.merge_task_arithmetic,
        options=dare.DareOptions,
        paper="https://arxiv.org/abs/2311.03099",
        summary="Randomly drop a fraction p of each update, rescale by 1/(1-p), then add them.",
        row_blocks=DARE_BLOCK,
    ),
    "dare_ties": Method(
        name="dare_ties",
        fn=dare.merge_ties,
        options=dare.DareOptions,
        paper="https://arxiv.org/abs/2311.03099",
        summary="DARE's random drop and rescale, then TIES' sign election and disjoint mean.",
        row_blocks=DARE_BLOCK,
    ),
    "breadcrumbs": Method(
        name="breadcrumbs",
        fn=breadcrumbs.merge,
        options=breadcrumbs.BreadcrumbsOptions,
        paper="https://arxiv.org/abs/2312.06795",
        summary="Drop each update's largest and smallest entries, then add what is left.",
        kind="selection",
        parts=breadcrumbs.PARTS,
    ),
    "pcb": Method(
        name="pcb",
        fn=pcb.merge,
        options=pcb.PcbOptions,
        paper="https://arxiv.org/abs/2410.02396",
        summary="Weigh each update's entries by intra- and inter-model balance, keep the top r.",
        kind="ranked",
        parts=pcb.PARTS,
    ),
    "tsv": Method(
        name="tsv",
        fn=tsv.merge,
        options=tsv.TsvOptions,
        paper="https://arxiv.org/abs/2412.00081",
        summary="Top singular vectors of each update, orthogonalised together (TSV-M).",
        kind="matrix",
    ),
    "iso_c": Method(
        name="iso_c",
        fn=iso.merge_c,
        options=iso.IsoCOptions,
        paper="https://arxiv.org/abs/2502.04959",
        summary="The summed update with all its singular values set to their mean.",
        kind="matrix",
    ),
    "iso_cts": Method(
        name="iso_cts",
        fn=iso.merge_cts,
        options=iso.IsoCTSOptions,
        paper="https://arxiv.org/abs/2502.04959",
        summary="A common subspace plus each update's own directions, with an isotropic spectrum.",
        kind="matrix",
    ),
    "wudi": Method(
        name="wudi",
        fn=wudi.merge,
        options=wudi.WudiOptions,
        paper="https://arxiv.org/abs/2503.08099",
        summary="Adam on the updates' interference loss, from their sum (data-free).",
        kind="matrix",
    ),
    "optmerge": Method(
        name="optmerge",
        fn=optmerge.merge,
        options=optmerge.OptMergeOptions,
        paper="https://arxiv.org/abs/2505.19892",
        summary="SGD on the interference loss of low-rank denoised updates, from their mean.",
        kind="matrix",
    ),
    "fisher": Method(
        name="fisher",
        fn=fisher.merge,
        options=fisher.FisherOptions,
        paper="https://arxiv.org/abs/2111.09832",
        summary="Each weight the models' mean weighted by λ and their diagonal Fisher (needs data).",
        extra_inputs="fisher",
    ),
    "neuromerging": Method(
        name="neuromerging",
        fn=neuromerging.merge,
        options=neuromerging.NeuroMergingOptions,
        paper="https://arxiv.org/abs/2503.05320",
        summary="Per neuron: TIES on the updates' parts along the base row and, per SVD "
        "direction, on the rest.",
    ),
    "stf": Method(
        name="stf",
        fn=stf.merge,
        options=stf.StfOptions,
        paper="https://arxiv.org/abs/2502.10698",
        summary="All updates' singular pairs, each kept at its strength by one linear solve.",
        kind="matrix",
    ),
}


def plan_notes(method: str, options: Any) -> list[str]:
    """What a merge plan should say about ``method`` with ``options``: an approximation asked
    for (``svd=randomized``) and its measured effect."""
    if getattr(options, "svd", None) == "randomized":
        return [RANDOMIZED_NOTE.format(method=method)]
    return []


def get_method(name: str) -> Method:
    """Return the registered method ``name``; an unknown name lists the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown merge method {name!r}; valid methods: {', '.join(sorted(METHODS))}"
        ) from None


def option_fields(method: str) -> list[dataclasses.Field]:
    """The options of ``method`` as dataclass fields (name, default, metadata help/min/max)."""
    return list(dataclasses.fields(get_method(method).options))
