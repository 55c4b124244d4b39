"""Merging in row slices under a memory budget gives what merging whole tensors gives."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import closing
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from dim3 import engine
from dim3.methods import METHODS
from dim3.methods._utils import current_buffers, first_by_magnitude
from dim3.slices import (
    SORT_MAX,
    Buffers,
    ExactSelect,
    FirstMask,
    key_value,
    magnitude_bits,
    order_keys,
    row_slices,
    select_by_sort,
)
from tests.test_engine import load_all, recipe_of
from tests.tiny_models import Trio

# fisher needs Fisher folders: its sliced merge is tested in test_fisher.py
SLICED = [name for name, m in METHODS.items() if m.kind != "matrix" and not m.extra_inputs]


def test_row_slices_cover_the_rows_within_the_budget():
    cuts = row_slices((10, 3), budget=4 * 3 * 4)  # four rows of float32 per slice
    assert cuts == [(0, 4), (4, 8), (8, 10)]
    assert row_slices((10, 3), budget=1, rows=7) == [(a, a + 1) for a in range(7)]
    assert row_slices((5,), budget=1 << 20) == [(0, 5)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_select_matches_first_by_magnitude_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    # bfloat16-rounded values: many exact ties, zeros included, as in real checkpoints' deltas
    x = (torch.randn(5003, generator=g) * 0.01).to(torch.bfloat16).float()
    x[::7] = 0.0
    x[11], x[12] = float("inf"), -float("inf")
    mag = x.abs()
    ks = [0, 1, 2, 700, 2500, 5002, 5003]
    cuts = [(0, 1000), (1000, 1001), (1001, 4000), (4000, 5003)]
    select = ExactSelect(ks, x.numel(), x.device)
    for _ in range(2):
        for a, b in cuts:
            select.observe(magnitude_bits(x[a:b]))
        select.next_pass()
    for k, found in zip(ks, select.result(), strict=True):
        first = FirstMask(k, x.numel(), found)
        want = first_by_magnitude(mag, k)
        got = torch.cat([first(magnitude_bits(x[a:b])) for a, b in cuts])
        assert torch.equal(got, want), k
        # the tiles' form: int32 words (-1 / 0), each piece told how many tied values it takes
        first, words = FirstMask(k, x.numel(), found), []
        for a, b in cuts:
            bits = magnitude_bits(x[a:b])
            temp = torch.empty(b - a, dtype=torch.bool)
            out = torch.empty(b - a, dtype=torch.int32)
            left = first.left
            if first.ordered:
                first.took(first.count(bits, temp))
            words.append(first.words(bits, left, out, temp))
        assert torch.equal(torch.cat(words), -want.to(torch.int32)), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_by_sort_equals_the_two_passes(seed):
    """A vector's selection by a sort (selection_merge's path for at most SORT_MAX values) gives
    ExactSelect's numbers: bfloat16 ties, zeros, ±∞, NaN, every k from none to all, and sizes
    up to the largest it takes."""
    g = torch.Generator().manual_seed(seed)
    for n in (1, 2, 1536, SORT_MAX):
        x = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float()
        x[::7] = 0.0
        x[n // 2 :: 11] = float("nan")
        x[:: n // 2 + 1] = float("inf")
        bits = magnitude_bits(x)
        ks = sorted({0, 1, 2, n // 3, n // 2, n - 1, n, n + 1})
        assert select_by_sort(bits, ks) == _two_pass(bits, ks, [(0, n)]), n


def _two_pass(bits, ks, cuts):
    select = ExactSelect(ks, bits.numel(), bits.device)
    for _ in range(2):
        for a, b in cuts:
            select.observe(bits[a:b])
        select.next_pass()
    return select.result()


def _one_pass(bits, ks, cuts, windows):
    """A first pass with guessed windows, pieces added out of order under their first index;
    the passes without a guess (the histogram's, then the low bits') only if the guesses
    missed. -> (result, known after one pass, ties)."""
    select = ExactSelect(ks, bits.numel(), bits.device)
    select.window(windows)
    for i, (a, b) in enumerate(reversed(cuts)):  # any order: pieces are keyed
        got = select.partial(bits[a:b])
        select.add(got[: select.summed])
        select.keep(a, got[select.summed :])
        if i % 2:
            select.compact()  # gathered into one tensor now and then, as the engine does
    select.next_pass()
    known, ties = select.known, select.ties
    assert known == select.done and select.missed == (not known)
    passes = 1
    while not select.done:
        for a, b in cuts:
            select.observe(bits[a:b])
        select.next_pass()
        passes += 1
    assert passes == (1 if known else 3)
    return select.result(), known, ties


@pytest.mark.parametrize("whole_bins", [False, True])
def test_exact_select_in_one_pass_from_guessed_windows_at_a_real_shape(whole_bins):
    """2.4 M magnitudes of bfloat16 differences (a 1536 x 1536 update: thresholds tied
    thousands of times, zeros, infinities) cut in uneven pieces: windows guessed from a
    65,536-value sample find every k-th value, its share of tied values and each piece's tied
    values in one pass, exactly as the two passes and the sorted values do; windows that miss
    (below, above, too narrow) leave the selection to two more passes, still exact. Windows
    that start at the sample's value (as the engine guesses them) or, as before 2026-12-02,
    at the start of its bin."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1536 * 1536, generator=g).to(torch.bfloat16)
    tuned = (base.float() + 0.01 * torch.randn(base.shape, generator=g)).to(torch.bfloat16)
    x = tuned.float() - base.float()
    x[::97] = 0.0
    x[5], x[6] = float("inf"), -float("inf")
    bits = magnitude_bits(x)
    n = bits.numel()
    ks = [0, round(0.8 * n), n - 1000, n]  # TIES' 20% kept; a few above; everything
    cuts = [(0, 170 * 1536), (170 * 1536, 171 * 1536), (171 * 1536, 1_000_003), (1_000_003, n)]
    ordered = bits.sort().values
    sample = bits[:: n // 65536][:65536].sort().values

    def window(k, spread):
        r = round(k / n * 65536)
        lo = int(sample[max(0, r - spread)])
        if whole_bins:
            lo = lo >> 16 << 16
        return (lo, int(sample[min(65535, r + spread)]) + 1)

    guessed = [None if k in (0, n) else window(k, 600) for k in ks]
    two = _two_pass(bits, ks, cuts)
    got, known, ties = _one_pass(bits, ks, cuts, guessed)
    assert known and got == two
    for k, found, per_piece in zip(ks, got, ties, strict=True):
        if found is None:
            assert k in (0, n) and per_piece == []
            continue
        kth, need, equal = found
        assert kth == int(ordered[k - 1])  # the k-th smallest
        assert need == k - int((ordered < kth).sum()) and equal == int((ordered == kth).sum())
        assert per_piece == [(a, int((bits[a:b] == kth).sum())) for a, b in cuts]
    assert got[1][2] > 1000  # the threshold is tied many times over
    lo, hi = guessed[1]
    kth = got[1][0]
    start = (kth - 1) >> 16 << 16  # a bin's start below the k-th value
    for wrong in [
        (0, lo),
        (((kth >> 16) + 1) << 16, 1 << 31),
        (start, kth),
    ]:  # below, above, short
        missed, known, _ = _one_pass(bits, ks, cuts, [None, wrong, guessed[2], None])
        assert not known and missed == two, wrong


def test_sample_ranks_equal_a_sort_and_measure_how_runs_go_together():
    """A guess's sample (:class:`dim3.engine.SampleRanks`): its r-th smallest value and its
    counts below a value are those of the sorted sample (bfloat16 differences: tied in
    blocks, zeros); its clustering is 1 for values drawn one by one, the runs' length where
    each run is one value, and in between where each run's values share a scale."""
    import numpy as np

    g = torch.Generator().manual_seed(5)
    base = torch.randn(1 << 16, generator=g).to(torch.bfloat16)
    tuned = (base.float() + 0.01 * torch.randn(base.shape, generator=g)).to(torch.bfloat16)
    x = tuned.float() - base.float()
    x[::97] = 0.0
    bits = magnitude_bits(x).numpy()
    at, ordered = engine.SampleRanks(bits), np.sort(bits)
    for r in (0, 1, 97, 676, 32768, 52428, 65534, 65535):
        assert at[r] == ordered[r], r
    for v in (0, 1, int(ordered[40000]), int(ordered[40000]) + 1, 1 << 31):
        assert at.count_below(v) == int((ordered < v).sum()), v
    assert int(np.unique(ordered).size) < 2000  # tied in blocks
    assert 1.0 <= at.clustering(52428, 16) < 1.2  # drawn one by one
    assert at.clustering(52428, 1) == 1.0
    same = engine.SampleRanks(np.repeat(bits[:4096], 16))  # each run one value
    assert same.clustering(52428, 16) == pytest.approx(16.0)
    scales = torch.exp(torch.randn(4096, 1, generator=g))  # each run's values one scale
    scaled = magnitude_bits((torch.randn(4096, 16, generator=g) * scales).reshape(-1)).numpy()
    assert 3 < engine.SampleRanks(scaled).clustering(52428, 16) < 16


@pytest.mark.parametrize("rows_differ", [False, True])
def test_guessed_windows_hold_the_kth_value_and_go_back_to_single_values_for_clustered_runs(
    rows_differ, monkeypatch
):
    """A 2,048 x 1,536 bfloat16 tensor's two updates (3.1 M values, TIES' 20% kept, and a few
    above): each guessed window holds the k-th smallest magnitude of the whole update, exactly
    as a sort finds it. Where every row's updates have a scale of their own (log-normal), runs
    of adjacent values go together: the sample is drawn again one value at a time, and the
    windows keep as small a share of the values as where the rows do not differ."""
    import numpy as np

    g = torch.Generator().manual_seed(11)
    rows, cols = 2048, 1536
    base = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    scale = torch.exp(torch.randn(rows, 1, generator=g)) if rows_differ else torch.ones(rows, 1)
    tuned = [
        (base.float() + 0.01 * scale * torch.randn(rows, cols, generator=g)).to(torch.bfloat16)
        for _ in range(2)
    ]
    n = rows * cols
    ks = [0, round(0.8 * n), n - 1000, n]
    runs: list[int] = []
    sampled = engine._sampled
    monkeypatch.setattr(engine, "_sampled", lambda *a: runs.append(a[-1]) or sampled(*a))
    guessed = engine.guess_windows(base, tuned, n, ks, 64 << 20)
    assert runs == ([engine.RUN, 1] if rows_differ else [engine.RUN])
    assert guessed is not None and len(guessed) == 2
    for t, windows in zip(tuned, guessed, strict=True):
        bits = np.sort(magnitude_bits(t.float() - base.float()).numpy())
        assert windows[0] is None and windows[-1] is None
        for k, (lo, hi) in zip(ks[1:3], windows[1:3], strict=True):
            kth = int(bits[k - 1])
            assert lo <= kth < hi, (k, lo, kth, hi)
            inside = int(np.searchsorted(bits, hi) - np.searchsorted(bits, lo))
            assert inside < 0.03 * n, inside / n  # 1.7% and 2.2%; 3.4% from the runs, widened


@pytest.mark.parametrize(
    ("block", "lo_out", "hi_out"),
    [
        ((30000, 32300), True, None),  # ends 3.6 deviations below q's rank: left out
        ((30000, 32500), False, None),  # ends 2.1 below: kept
        ((33200, 35000), None, True),  # begins 3.4 above: left out
        ((33000, 35000), None, False),  # begins 1.8 above: kept
    ],
)
def test_a_guessed_window_leaves_out_a_tied_block_only_far_from_the_rank(block, lo_out, hi_out):
    """65,536 values, a block of them tied: the window around the median (4.5 deviations of
    a binomial's count, 128 values, and 8 more each side) ends at the block's value; it
    leaves the block out where the block's every value is 3 deviations and 8 values away from
    the median's rank or more, and keeps it where not."""
    import numpy as np

    bits = np.arange(1 << 16, dtype=np.int32) * 4 + 1000
    a, b = block
    bits[a:b] = bits[a]
    tied = int(bits[a])
    np.random.default_rng(0).shuffle(bits)
    at = engine.SampleRanks(bits)
    lo, hi = at.window(0.5, 1)
    if lo_out is not None:
        assert lo == (tied + 1 if lo_out else tied)
        assert hi == 1000 + 4 * (32768 + 584)  # the value 4.5 deviations and 8 above: left out
    if hi_out is not None:
        assert hi == (tied if hi_out else tied + 1)
        assert lo == 1000 + 4 * (32768 - 584) + 1
    assert lo <= int(np.sort(bits)[32768]) < hi


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_select_finds_order_statistics_of_signed_values(seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4001, generator=g)).to(torch.bfloat16).float()  # ties, both signs
    x[::5] = 0.0
    x[1::9] = -0.0
    x[3] = float("inf")
    ks = [1, 2, 800, 2000, 3999, 4000]
    cuts = [(0, 1), (1, 1500), (1500, 4001)]
    select = ExactSelect(ks, x.numel(), x.device)
    for _ in range(2):
        for a, b in cuts:
            select.observe(order_keys(x[a:b]))
        select.next_pass()
    want = x.sort().values
    for k, found in zip(ks, select.result(), strict=True):
        assert key_value(found[0]) == float(want[k - 1]), k
    whole = ExactSelect([x.numel()], x.numel(), x.device)  # k = n: everything, no value needed
    for _ in range(2):
        whole.observe(order_keys(x))
        whole.next_pass()
    assert whole.result() == [None]


@pytest.mark.parametrize("method", SLICED)
@pytest.mark.parametrize("trio_name", ["tiny_llava_trio", "tiny_qwen2vl_trio"])
def test_sliced_merge_equals_whole_merge(method, trio_name, request, tmp_path):
    trio = request.getfixturevalue(trio_name)
    recipe = recipe_of(trio, method=method)
    whole = engine.merge_to_folder(recipe, tmp_path / "whole", chunk_size="1GiB")
    # 4 KiB: a few dozen rows of each matrix per slice, so every big tensor takes several passes
    sliced = engine.merge_to_folder(recipe, tmp_path / "sliced", chunk_size=4096)
    a, b = load_all(whole.out_dir), load_all(sliced.out_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------- tiles

# rules whose steps the engine computes in tiles of rows (any cut of rows gives the same numbers)
# (fisher, which needs Fisher folders: tests/test_fisher.py)
ROW_LOCAL = [
    n
    for n, m in METHODS.items()
    if m.kind in ("elementwise", "columns", "selection") and not m.extra_inputs
]


def assert_tiled_equals_untiled(recipe, chunk_size=engine.DEFAULT_CHUNK, folder=None) -> int:
    """Run the loop twice on ``recipe``: once computing row-local steps in tiles straight into
    output-dtype tensors (``into``), once on whole float32 steps; every piece must be equal bit
    for bit once the untiled one is converted to the output dtype. With ``folder`` (a
    ``merge_to_folder`` output of the recipe) its tensors must be the untiled pieces too.
    Returns how many pieces were computed in tiles."""
    method, cpu = METHODS[recipe.method], torch.device("cpu")
    made: set[int] = set()
    with engine.open_inputs(recipe) as inputs, engine.open_inputs(recipe) as others:
        plan = engine.build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
        dtypes = {e.key: engine.output_dtype(e, recipe.dtype) for e in plan.entries}

        def into(entry, start, shape):
            t = torch.empty(shape, dtype=dtypes[entry.key])
            made.add(t.data_ptr())
            return t

        opts = recipe.method_options()
        tiled = engine.iter_merged(plan, inputs, method, opts, cpu, chunk_size, into=into)
        plain = engine.iter_merged(plan, others, method, opts, cpu, chunk_size)  # own inputs
        files = [safe_open(f, "pt") for f in sorted(folder.glob("*.safetensors"))] if folder else []
        where = {k: f for f in files for k in f.keys()}
        n = 0
        for (e, a, got, _), (e2, a2, want, _) in zip(tiled, plain, strict=True):
            assert (e.key, a) == (e2.key, a2)
            tiled = got.data_ptr() in made
            n += tiled
            want = want.to(dtypes[e.key])
            assert torch.equal(got if tiled else got.to(want.dtype), want), (e.key, a)
            if folder:
                stored = where[e.key].get_slice(e.key)[a : a + want.shape[0]]
                assert torch.equal(stored, want), (e.key, a)
    return n


@pytest.mark.parametrize("method", ROW_LOCAL)
@pytest.mark.parametrize("chunk_size", [512, 4096, engine.DEFAULT_CHUNK])
def test_tiled_steps_equal_the_untiled_loop_bit_for_bit(
    method, chunk_size, request, tmp_path, monkeypatch
):
    """Tiles of a few rows (many per step, shared among the worker threads), sliced steps and
    whole ones, padded vocabulary rows (at 512 bytes, steps of 4 rows: some hold only the VLM's
    own rows) and a tied head: the tiled loop and the folder it writes hold exactly what the
    untiled loop computes."""
    monkeypatch.setattr(engine, "TILE_BYTES", 512)  # 4 rows of the tiny models' 32 columns
    recipe = recipe_of(request.getfixturevalue("tiny_llava_trio"), method=method)
    out = engine.merge_to_folder(recipe, tmp_path / "out", chunk_size=chunk_size).out_dir
    tiled = assert_tiled_equals_untiled(recipe, chunk_size, out)
    with engine.open_inputs(recipe) as inputs:
        plan = engine.build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
    padded = [e for e in plan.entries if e.rows is not None and e.rows < e.shape[0]]
    assert padded and padded[0].shape[0] - padded[0].rows > 4  # VLM-only steps at 512 bytes
    # every matrix in tiles, at 32 MiB those of column and selection rules too (in one
    # statistics step and one apply step each, not merged whole on the loop's thread)
    matrices = [e for e in plan.entries if len(e.shape) == 2 and e.action != "copy"]
    assert tiled >= len(matrices) > 10


def rewritten(trio: Trio, folder: Path, change) -> Trio:
    """A copy of ``trio`` in ``folder`` whose every shard holds ``change(its tensors)`` (a
    sharded model's index maps the names that ``change`` adds to their shard)."""
    roles = {}
    for role in ("base", "multilingual", "multimodal"):
        dst = folder / role
        shutil.copytree(getattr(trio, role), dst)
        index = dst / "model.safetensors.index.json"
        data = json.loads(index.read_text()) if index.exists() else None
        for f in dst.glob("*.safetensors"):
            tensors = change(load_file(f))
            save_file(tensors, f, metadata={"format": "pt"})
            for key in tensors if data is not None else ():
                data["weight_map"].setdefault(key, f.name)
        if data is not None:
            index.write_text(json.dumps(data))
        roles[role] = dst
    return Trio(**roles)


def on_a_grid(trio, folder, step=2.0**-8):
    """A copy of ``trio`` whose every value is a multiple of ``step``: the updates take a few
    distinct magnitudes (each tied thousands of times, as in bfloat16 checkpoints, only more),
    and the differences are exact in float32."""
    return rewritten(
        trio,
        folder,
        lambda ts: {k: t.div(step).round().mul(step).to(t.dtype) for k, t in ts.items()},
    )


def selection_matches_the_definition(method, trio, out) -> int:
    """Every merged matrix of a TIES or Breadcrumbs merge of ``trio`` (folder ``out``) equals the
    pure-Python definition on the whole tensor (tests/test_methods.py). Returns how many of them
    had their TIES threshold (20% kept) tied: the order of the tied values decided."""
    from tests.test_engine import base_name, tokenizer_len
    from tests.test_methods import ref_breadcrumbs, ref_ties

    merged, vlm = load_all(out), load_all(trio.multimodal)
    base, ml = load_all(trio.base), load_all(trio.multilingual)
    ref = ref_ties if method == "ties" else ref_breadcrumbs
    rows = tokenizer_len(trio.base)
    ordered = 0
    for key in merged:
        name = base_name(key)
        if name is None or merged[key].dim() != 2:
            continue
        b, v, m = base[name], vlm[key], ml[name]
        r = min(rows, b.shape[0])
        d = (v[:r] - b[:r]).abs().flatten()
        ordered += int((d == d.kthvalue(d.numel() - round(0.2 * d.numel())).values).sum() > 1)
        want = ref(b[:r], [v[:r], m[:r]]).float()
        torch.testing.assert_close(merged[key][:r], want, rtol=0, atol=1e-7, msg=key)
    return ordered


def second_passes(monkeypatch) -> dict[str, int]:
    """Watch the engine: per selection tensor merged in steps, how many statistics passes ran
    after the first (none when its guessed windows held, two when they missed). The loop asks
    whether a step is skipped as it computes it, the last time it asks (before, whether to
    map the step's rows in)."""
    seen: dict[str, int] = {}
    ran: dict[str, set[str]] = {}
    skips = engine._Merger.skips

    def watch(self, step):
        skipped = skips(self, step)
        if step.stage in ("stats1", "stats2") and step.start == 0:
            key = step.source.key
            ran.setdefault(key, set())
            (ran[key].discard if skipped else ran[key].add)(step.stage)
            seen[key] = len(ran[key])
        return skipped

    monkeypatch.setattr(engine._Merger, "skips", watch)
    return seen


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_selection_windows_that_miss_leave_the_thresholds_to_the_passes_without_them(
    method, tiny_llava_trio, tmp_path, monkeypatch
):
    """The VLM's updates 4 times larger in the lower rows of every matrix than in the upper:
    a guess from the first step's rows misses the thresholds (TIES' always, Breadcrumbs' lower
    one often), and the two passes and the tied-value counts run as without a guess; the
    merge is still the definition's, tiled or not."""
    from safetensors.torch import load_file, save_file

    from tests.test_engine import base_name

    monkeypatch.setattr(engine, "TILE_BYTES", 512)
    trio = on_a_grid(tiny_llava_trio, tmp_path / "grid")
    base = load_all(trio.base)
    for f in trio.multimodal.glob("*.safetensors"):
        tensors = load_file(f)
        for key, t in tensors.items():
            name = base_name(key)
            if name is not None and t.dim() == 2 and t.shape[0] >= 8:
                b = base[name].float()
                r = min(b.shape[0], t.shape[0])
                lower = slice(r // 2, r)
                t[lower] = (b[lower] + 4 * (t[lower].float() - b[lower])).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
    recipe = recipe_of(trio, method=method)
    passes = second_passes(monkeypatch)
    out = engine.merge_to_folder(recipe, tmp_path / "out", chunk_size=4096).out_dir
    # passes after the first: two where a guess missed (the histogram's, the low bits'), one
    # for a tensor with no guess (too many values inside), none where the guess held
    assert passes and any(passes.values()) and set(passes.values()) <= {0, 1, 2}
    assert method != "ties" or 2 in passes.values()  # TIES' guesses missed
    assert all(passes.values()) or method != "ties"  # TIES' one threshold: every guess missed
    assert assert_tiled_equals_untiled(recipe, 4096, out) > 10
    selection_matches_the_definition(method, trio, out)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_selection_thresholds_of_the_updates_are_found_on_threads_of_their_own(
    method, tiny_llava_trio, tmp_path, monkeypatch
):
    """Where the first pass kept values in guessed windows, the first update's thresholds are
    found on the loop's thread and the second's at the same time on a tile thread (each
    joining its values in a buffer of its own), unless the tile threads have the next
    tensor's first pass to compute (then both on the loop's thread); the merge is still the
    definition's."""
    import threading

    from dim3 import slices

    monkeypatch.setattr(engine, "TILE_BYTES", 512)
    # one step staged ahead: no next tensor's pass is ever queued, the tile threads help
    monkeypatch.setattr(engine, "AHEAD", 1)
    trio = on_a_grid(tiny_llava_trio, tmp_path / "grid")
    seen = []  # (select's slot, its thread, whether its first pass had windows, helped)
    helped = [False]  # whether the tensor's thresholds may take a tile thread's help
    next_pass, end = slices.ExactSelect.next_pass, engine._Merger._selection_end

    def watch(self):
        name = threading.current_thread().name
        seen.append((self.slot, name, self.windows is not None, helped[0]))
        next_pass(self)

    def ending(self, step):
        helped[0] = self.helper is not None
        end(self, step)

    monkeypatch.setattr(slices.ExactSelect, "next_pass", watch)
    monkeypatch.setattr(engine._Merger, "_selection_end", ending)
    out = engine.merge_to_folder(recipe_of(trio, method=method), tmp_path / "out").out_dir
    windowed = [(slot, thread, help) for slot, thread, windows, help in seen if windows]
    assert windowed and {slot for slot, _, _ in windowed} == {"0", "1"}
    assert all(t == "MainThread" for slot, t, _ in windowed if slot == "0")
    assert all(help for _, _, help in windowed)
    for slot, thread, help in windowed:
        if slot == "1":
            assert thread.startswith("dim3-tile") if help else thread == "MainThread"
    selection_matches_the_definition(method, trio, out)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_a_selection_queues_the_next_tensors_first_pass_before_finding_its_thresholds(
    method, tiny_llava_trio, tmp_path, monkeypatch
):
    """The tile threads do not wait while the loop finds a tensor's thresholds: the next
    selection tensor's first statistics pass is queued before (its rows staged ahead), for
    every tensor whose next one's first step is within the read thread's reach
    (``engine.AHEAD`` steps); the merge is still the definition's."""
    import time

    trio = on_a_grid(tiny_llava_trio, tmp_path / "grid")
    events: list[tuple[str, str]] = []
    steps: list = []  # in the loop's order (the read thread stages them in order)
    stats_of, end = engine._Merger.stats_of, engine._Merger._selection_end
    stage, work = engine._Source.stage, engine._Tiles._work

    def queued(self, step, state):
        events.append(("queued", step.source.key))
        return stats_of(self, step, state)

    def ending(self, step):
        events.append(("thresholds", step.source.key))
        end(self, step)

    def staging(self, step, slot, populate=True):
        steps.append(step)
        return stage(self, step, slot, populate)

    def slow(self, *args):  # each tile takes long enough for the read thread to stage ahead
        time.sleep(0.02)
        return work(self, *args)

    monkeypatch.setattr(engine._Merger, "stats_of", queued)
    monkeypatch.setattr(engine._Merger, "_selection_end", ending)
    monkeypatch.setattr(engine._Source, "stage", staging)
    monkeypatch.setattr(engine._Tiles, "_work", slow)
    out = engine.merge_to_folder(recipe_of(trio, method=method), tmp_path / "out").out_dir
    firsts = [i for i, s in enumerate(steps) if s.stage == "stats0" and s.start == 0]
    checked = 0
    for a, b in zip(firsts, firsts[1:], strict=False):
        last = max(i for i in range(a, b) if steps[i].stage == "stats0")  # its first pass's end
        if b - last > engine.AHEAD:
            continue  # out of the read thread's reach then
        this, nxt = steps[a].source.key, steps[b].source.key
        ends = events.index(("thresholds", this))
        assert ("queued", nxt) in events[:ends], (this, nxt)
        checked += 1
    assert checked >= len(firsts) // 2, (checked, len(firsts))
    selection_matches_the_definition(method, trio, out)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_selection_tiles_take_tied_values_in_flat_order(
    method, tiny_llava_trio, tmp_path, monkeypatch
):
    """Updates of a few distinct magnitudes, so the k-th largest is tied many times over and
    only the first of the tied values (in flat order, across slices and tiles) are kept: the
    apply pass in 4-row tiles (told how many tied values come before each: counted in a pass
    over the tiles, or by the first statistics pass where its guessed windows held) equals the
    untiled loop, and the merged tensors equal the independent definition on whole tensors."""

    monkeypatch.setattr(engine, "TILE_BYTES", 512)
    trio = on_a_grid(tiny_llava_trio, tmp_path / "grid")
    recipe = recipe_of(trio, method=method)
    passes = second_passes(monkeypatch)
    from_stats = []  # apply steps told the tied values by the first pass
    tied_from_stats = engine._Merger._tied_from_stats

    def watch(self, step, cuts):
        told = tied_from_stats(self, step, cuts)
        from_stats.append(told and any(f.ordered for fs in self.state for f in fs))
        return told

    monkeypatch.setattr(engine._Merger, "_tied_from_stats", watch)
    out = engine.merge_to_folder(recipe, tmp_path / "out", chunk_size=4096).out_dir
    assert passes and not all(passes.values())  # some thresholds were found in one pass
    assert any(from_stats)
    assert assert_tiled_equals_untiled(recipe, 4096, out) > 10
    ordered = selection_matches_the_definition(method, trio, out)
    assert ordered > 5  # the thresholds are tied: the order of the tied values decides


@pytest.mark.parametrize("trio_name", ["tiny_llava_trio", "tiny_qwen2vl_trio"])
def test_dim3_column_sums_gathered_over_tiles_match_the_reference(
    trio_name, request, tmp_path, monkeypatch
):
    """DiM3's column statistics summed tile by tile (4 rows each, in 4 KiB steps) give what
    the independent reference computes from whole tensors (tests/test_engine.py)."""
    from tests.test_engine import base_name, expected_tensor, tokenizer_len

    monkeypatch.setattr(engine, "TILE_BYTES", 512)
    trio = request.getfixturevalue(trio_name)
    engine.merge_to_folder(recipe_of(trio), tmp_path / "out", chunk_size=4096)
    out, vlm = load_all(tmp_path / "out"), load_all(trio.multimodal)
    base, ml = load_all(trio.base), load_all(trio.multilingual)
    merged = [k for k in out if base_name(k) is not None]
    assert merged
    for key in merged:
        want = expected_tensor(key, vlm, base, ml, tokenizer_len(trio.base))
        torch.testing.assert_close(out[key], want, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "method", ["task_arithmetic", "dim3", "dare_task_arithmetic", "ties", "dare_ties"]
)
def test_tiles_written_into_a_loaded_model_equal_the_folder(
    method, tiny_llava_trio, tmp_path, monkeypatch
):
    """An in-memory merge computes its tiles straight into the model's own tensors (4-row
    tiles, 4 KiB steps): every tensor equals the folder merge's, bit for bit."""
    monkeypatch.setattr(engine, "TILE_BYTES", 512)
    recipe = recipe_of(tiny_llava_trio, method=method)
    engine.merge_to_folder(recipe, tmp_path / "out", chunk_size=4096)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_trio.multimodal)
    engine.merge_into_model(model, recipe, chunk_size=4096)
    want = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, want[key]), key


def test_a_thread_done_with_its_tiles_takes_the_last_ones_of_the_longest_run():
    share = engine._Share([[(0, 1), (1, 2)], [(2, 3), (3, 4), (4, 5), (5, 6)]])
    assert share.next(0) == (0, 1) and share.next(0) == (1, 2)  # its own, from the front
    assert share.next(0) == (5, 6)  # then the other run's last
    assert share.next(1) == (2, 3) and share.next(1) == (3, 4) and share.next(1) == (4, 5)
    assert share.next(0) is None and share.next(1) is None


def test_tiles_come_back_in_row_order_when_one_thread_is_slow(monkeypatch):
    """One thread stalls on the first tile of its run (after the other has seen it start): the
    other computes its own tiles and then the stalled run's last ones; the results still come
    back in row order, and every row is merged."""
    import threading
    import time

    monkeypatch.setattr(engine, "TILE_BYTES", 4 * 8 * 2)  # 2 rows of 8 columns a tile
    x = torch.arange(40 * 8, dtype=torch.float32).reshape(40, 8)
    views = [x, x]
    started = threading.Event()  # the second run's first tile (rows 20:22) has begun
    names = {}

    def fn(work, first):
        names[first] = threading.current_thread().name
        if first == 0:  # both threads are at work before the first run goes on
            assert started.wait(30), "the second thread never started"
        if first == 20 and not started.is_set():
            started.set()
            time.sleep(0.5)
        return work[1].sum(dim=1).clone()

    tiles = engine._Tiles(2)
    try:
        got = tiles.map(views, fn)
        out = torch.empty(40, 8)
        tiles.start(views, lambda work, first: work[1] * 2, out).wait()
    finally:
        tiles.close()
    assert torch.equal(torch.cat(got), x.sum(dim=1))
    assert torch.equal(out, x * 2)
    assert names[38] == names[0] != names[20]  # the last tile was taken over


def test_a_step_started_while_the_last_one_computes_runs_on_each_threads_own_buffers(
    monkeypatch,
):
    """The loop queues a step's tiles and goes on (engine._pieces): the next step's tiles begin
    while the last step's still compute, a thread done with one step taking the next. Each
    thread keeps its own buffers whichever step's run it takes (never one that another thread
    is using), and each step's rows come out right."""
    import threading

    monkeypatch.setattr(engine, "TILE_BYTES", 4 * 8 * 2)  # 2 rows of 8 columns a tile
    x = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)  # 8 tiles: 2 runs of 4
    later = threading.Event()  # the second step has begun
    seen: dict[str, object] = {}
    in_use: list[int] = []
    lock = threading.Lock()

    def rule(factor):
        def fn(work, first):
            mine = current_buffers()
            assert seen.setdefault(threading.current_thread().name, mine) is mine
            with lock:
                assert id(mine) not in in_use, "two threads on one thread's buffers"
                in_use.append(id(mine))
            try:
                if factor == 3:
                    later.set()
                elif first == 14:  # the first step's last tile waits for the second step
                    assert later.wait(30), "the second step did not begin"
                return work[1] * factor
            finally:
                with lock:
                    in_use.remove(id(mine))

        return fn

    tiles = engine._Tiles(2)
    a, b = torch.empty(16, 8), torch.empty(16, 8)
    try:
        first = tiles.start([x, x], rule(2), a)
        second = tiles.start([x, x], rule(3), b)
        first.wait()
        second.wait()
    finally:
        tiles.close()
    assert torch.equal(a, x * 2) and torch.equal(b, x * 3)
    assert len(seen) == 2 and len({id(v) for v in seen.values()}) == 2


def test_the_write_pipe_writes_rows_only_once_their_tiles_are_done(monkeypatch):
    """Rows handed to the write pipe while their tiles still compute are written once the tiles
    are done: computed in the pipe's own buffer (``reserve``), the write thread waits for them;
    computed elsewhere, ``put`` waits before it copies them into its buffer."""
    import time

    monkeypatch.setattr(engine, "TILE_BYTES", 4 * 8 * 2)  # 2 rows of 8 columns a tile
    x = torch.arange(8 * 8, dtype=torch.float32).reshape(8, 8)
    written: dict[str, torch.Tensor] = {}

    def write(key, start, rows):
        written[key] = rows.clone()

    def slow(work, first):
        time.sleep(0.2)
        return work[1] * 2

    tiles = engine._Tiles(2)
    cpu = torch.device("cpu")
    try:
        with engine._Pipe(write, Buffers(), engine._Streams(cpu)) as pipe:
            own = pipe.reserve("own", 0, (8, 8), torch.bfloat16)
            pipe.put("own", 0, own, torch.bfloat16, running=tiles.start([x, x], slow, own))
            elsewhere = torch.empty(8, 8, dtype=torch.bfloat16)
            running = tiles.start([x, x], slow, elsewhere)
            pipe.put("elsewhere", 0, elsewhere, torch.bfloat16, running=running)
            pipe.drain()
    finally:
        tiles.close()
    want = (x * 2).to(torch.bfloat16)
    assert torch.equal(written["own"], want) and torch.equal(written["elsewhere"], want)


def test_a_tiles_error_is_raised_by_the_merge_and_leaves_no_folder(
    tiny_llava_trio, tmp_path, monkeypatch
):
    """A step whose tiles fail after the loop has gone on (the write thread waits for them)
    fails the merge with the tile's own error, and nothing is left where the folder would be;
    a merge into a loaded model raises it too."""
    row_rule = engine._Merger.row_rule
    calls = []

    def failing(self, step):
        rule = row_rule(self, step)
        calls.append(step.source.key)
        if len(calls) < 12:
            return rule

        def fn(work, first):
            raise RuntimeError(f"tile of {step.source.key} failed")

        return fn

    monkeypatch.setattr(engine._Merger, "row_rule", failing)
    monkeypatch.setattr(engine, "TILE_BYTES", 512)
    recipe = recipe_of(tiny_llava_trio, method="dim3")
    with pytest.raises(RuntimeError, match="tile of .* failed"):
        engine.merge_to_folder(recipe, tmp_path / "out", chunk_size=512)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    calls.clear()
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_trio.multimodal)
    with pytest.raises(RuntimeError, match="tile of .* failed"):
        engine.merge_into_model(model, recipe, chunk_size=512)


def test_tile_workers_follow_the_compute_threads():
    cpu = torch.device("cpu")
    assert engine.tile_workers(cpu, cores=1) == 1
    assert engine.tile_workers(cpu, cores=2) == 2
    assert engine.tile_workers(cpu, cores=64) == 8
    assert engine.tile_workers(torch.device("cuda"), cores=2) == 0
    # a light rule (task arithmetic's compiled sum) takes one on up to 2 cores, as many above
    assert engine.tile_workers(cpu, cores=2, light=True) == 1
    assert engine.tile_workers(cpu, cores=1, light=True) == 1
    assert engine.tile_workers(cpu, cores=3, light=True) == 2
    assert engine.tile_workers(cpu, cores=64, light=True) == 8
    assert engine.tile_workers(torch.device("cuda"), cores=2, light=True) == 0


@pytest.mark.parametrize("cores", [2, 4])
def test_task_arithmetic_takes_one_tile_thread_on_two_cores_and_merges_the_same_bytes(
    cores, tiny_llava_trio, tmp_path, monkeypatch
):
    """The merge asks for its tile threads by its rule: task arithmetic's compiled sum is
    light (one thread on up to 2 cores), DiM3 is not; the merged bytes are those of the
    other number of threads."""
    made: list[int] = []
    init = engine._Tiles.__init__

    def on_init(self, workers):
        made.append(workers)
        init(self, workers)

    monkeypatch.setattr(engine._Tiles, "__init__", on_init)
    monkeypatch.setattr(engine.os, "cpu_count", lambda: cores)
    for method in ("task_arithmetic", "dim3"):
        engine.merge_to_folder(recipe_of(tiny_llava_trio, method=method), tmp_path / method)
    want = engine.compute_threads(torch.device("cpu"), cores)
    assert made == [1 if cores <= 2 else want, want]
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 6 - cores)  # the other count
    engine.merge_to_folder(recipe_of(tiny_llava_trio, method="task_arithmetic"), tmp_path / "other")
    assert made[-1] == (1 if cores > 2 else engine.compute_threads(torch.device("cpu"), 4))
    shards = sorted(p.name for p in (tmp_path / "other").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "task_arithmetic").glob("*.safetensors"))
    for name in shards:
        one, two = tmp_path / "other" / name, tmp_path / "task_arithmetic" / name
        assert one.read_bytes() == two.read_bytes(), name


def test_task_arithmetic_cuts_its_pieces_to_half_the_budget_and_merges_the_same_bytes(
    tiny_llava_trio, tmp_path, monkeypatch
):
    """Task arithmetic's compiled sum holds no float32 slice, so its merged pieces, and the
    write buffers they fill, are cut to half the budget; copied tensors keep the whole budget,
    and so does task arithmetic whose multilingual weight is not 1 (not the compiled sum). The
    bytes are those of whole-budget pieces."""
    budget = 4096
    prepared: list[int] = []
    prepare = engine._Pipe.prepare

    def spy(self, nbytes):
        prepared.append(nbytes)
        prepare(self, nbytes)

    monkeypatch.setattr(engine._Pipe, "prepare", spy)
    pieces: list[int] = []  # the bytes of each merged piece the loop computes into a buffer
    reserve = engine._Pipe.reserve

    def on_reserve(self, key, start, shape, dtype):
        pieces.append(math.prod(shape) * dtype.itemsize)
        return reserve(self, key, start, shape, dtype)

    monkeypatch.setattr(engine._Pipe, "reserve", on_reserve)
    recipe = recipe_of(tiny_llava_trio, method="task_arithmetic")
    m = METHODS["task_arithmetic"]
    cpu = torch.device("cpu")
    with engine.open_inputs(recipe) as inputs:
        plan = engine.build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
    assert engine._light(m, recipe.method_options(), cpu, 2, 0)
    light = engine._schedule(plan, m, budget, tiled=True, light=True)
    full = engine._schedule(plan, m, budget, tiled=True)

    def biggest(steps, action):  # the largest piece of float32 rows, per tensor
        got: dict[str, int] = {}
        for s in steps:
            if s.source.action == action and s.source.shape:
                row = 4 * math.prod(s.source.shape[1:])
                got[s.source.key] = max(got.get(s.source.key, 0), (s.stop - s.start) * row)
        return got

    halved, whole = biggest(light, "merge"), biggest(full, "merge")
    assert halved.keys() == whole.keys() and halved
    cut = [k for k, n in whole.items() if n > budget // 2]  # the tensors the halving cuts
    assert cut and all(halved[k] <= max(budget // 2, n // 2) for k, n in whole.items())
    assert biggest(light, "copy") == biggest(full, "copy")
    dtypes = {e.key: engine.output_dtype(e, recipe.dtype) for e in plan.entries}
    engine.merge_to_folder(recipe, tmp_path / "half", chunk_size=budget)
    assert prepared[-1] == max(engine._written_bytes(s, dtypes) for s in light) == max(pieces)
    monkeypatch.setattr(engine, "LIGHT_SHARE", 1)  # whole-budget pieces
    pieces.clear()
    engine.merge_to_folder(recipe, tmp_path / "whole", chunk_size=budget)
    assert prepared[-1] == max(engine._written_bytes(s, dtypes) for s in full) > prepared[0]
    assert max(pieces) == prepared[-1]
    shards = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert shards == sorted(p.name for p in (tmp_path / "half").glob("*.safetensors")) != []
    for name in shards:
        one, two = tmp_path / "half" / name, tmp_path / "whole" / name
        assert one.read_bytes() == two.read_bytes(), name
    # not the compiled sum: the whole budget
    monkeypatch.setattr(engine, "LIGHT_SHARE", 2)
    weighted = recipe_of(
        tiny_llava_trio, method="task_arithmetic", options={"multilingual_weight": 0.5}
    )
    assert not engine._light(m, weighted.method_options(), cpu, 2, 0)
    engine.merge_to_folder(weighted, tmp_path / "weighted", chunk_size=budget)
    assert prepared[-1] == prepared[1]


def test_sliced_merge_into_a_loaded_model_equals_the_folder(tiny_llava_trio, tmp_path):
    recipe = recipe_of(tiny_llava_trio)
    engine.merge_to_folder(recipe, tmp_path / "out", chunk_size="1GiB")
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_trio.multimodal)
    engine.merge_into_model(model, recipe, chunk_size=4096)
    want = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, want[key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------- buffers


def test_the_read_thread_stages_a_bounded_number_of_steps_ahead_on_the_cpu(
    tiny_llava_trio, monkeypatch
):
    """On the CPU the read thread stages ``engine.AHEAD`` steps ahead of the loop (views of the
    mapped files, no buffer each: a selection's guess of the next tensors is made while this
    one's statistics pass computes), and no more: while the consumer holds a piece, exactly
    the steps up to the piece's and ``AHEAD`` after it have been staged."""
    import time

    staged: list = []
    stage = engine._Source.stage

    def recording(self, step, slot, populate=True):
        staged.append(step)
        return stage(self, step, slot, populate)

    monkeypatch.setattr(engine._Source, "stage", recording)
    recipe = recipe_of(tiny_llava_trio, method="ties")
    with engine.open_inputs(recipe) as inputs:
        plan = engine.build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
        pieces = engine.iter_merged(
            plan, inputs, METHODS["ties"], recipe.method_options(), torch.device("cpu"), 512
        )
        with closing(pieces):
            entry, start, _, _ = next(pieces)
            j = next(  # the held piece's step: the first of its rows that writes them
                i
                for i, s in enumerate(list(staged))
                if s.out is entry and s.start == start and s.stage in ("copy", "whole", "apply")
            )
            deadline = time.monotonic() + 30
            while len(staged) < j + 1 + engine.AHEAD and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # time enough to stage more, if it would
            assert len(staged) == j + 1 + engine.AHEAD, (len(staged), j)
            assert engine.AHEAD > engine.SLOTS - 1  # more than the CUDA slots allow


def _rows_read(inputs, step) -> list[tuple[tuple[str, str], int, int]]:
    """The input rows ``step`` reads, as ((file, key), start, stop): the VLM's, and (merged
    rows) the base's and each multilingual model's, which stop where the VLM's own rows (the
    tokens the base lacks) begin."""
    e, a, b = step.source, step.start, step.stop
    read = [(inputs.multimodal, e.key, b)]
    if step.stage != "copy":
        shared = max(a, min(b, e.rows if e.rows is not None else e.shape[0]))
        read.append((inputs.base, e.base_key, shared))
        mls = zip(inputs.multilingual, e.multilingual_keys, strict=True)
        read += [(ckpt, key, shared) for ckpt, key in mls]
    return [((str(ckpt.file_of(key)), key), a, stop) for ckpt, key, stop in read]


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_a_steps_rows_are_unmapped_only_once_its_tiles_are_done(
    method, tiny_llava_trio, tmp_path, monkeypatch
):
    """The loop unmaps a step's input rows after it (at the next step, or ``RELEASE_LAG`` steps
    later), and not while the tiles that merge them still run: a selection's skipped statistics
    passes are steps too, so the loop can be far ahead while an apply's tiles (slowed here)
    read its rows, which they would fault in again, to stay mapped until the end (on the
    Qwen2-VL-2B trio, TIES' mapped pages grew by 0.5 GiB so). Checked at every release of a step merged in tiles
    (before, the first MLP matrix's apply was released while its tiles ran), and the merge is
    still the definition's."""
    import time

    trio = on_a_grid(tiny_llava_trio, tmp_path / "grid")
    row_rule, start, work = engine._Merger.row_rule, engine._Tiles._start, engine._Tiles._work
    release = engine._Source.release
    ruled: list = []  # the step whose rule was asked for last (the loop then starts its tiles)
    tiles_of: dict[int, list] = {}  # per step merged in tiles, its tiles' futures
    checked = []

    def ruling(self, step):
        rule = row_rule(self, step)
        ruled[:] = [step, rule]
        return rule

    def starting(self, views, fn, *args, **kwargs):
        futures = start(self, views, fn, *args, **kwargs)
        if ruled and fn is ruled[1]:  # the step's rows merged, not a statistics pass
            tiles_of[id(ruled[0])] = futures
        return futures

    def slow(self, *args):  # the apply's tiles take long enough for the loop to run ahead
        time.sleep(0.01)
        return work(self, *args)

    def releasing(self, step):
        futures = tiles_of.get(id(step))
        if futures is not None:
            assert all(f.done() for f in futures), (step.source.key, step.stage, step.start)
            checked.append(step)
        return release(self, step)

    monkeypatch.setattr(engine._Merger, "row_rule", ruling)
    monkeypatch.setattr(engine._Tiles, "_start", starting)
    monkeypatch.setattr(engine._Tiles, "_work", slow)
    monkeypatch.setattr(engine._Source, "release", releasing)
    recipe = recipe_of(trio, method=method)
    out = engine.merge_to_folder(recipe, tmp_path / "out", chunk_size=4096).out_dir
    assert len(checked) >= 10, len(checked)
    selection_matches_the_definition(method, trio, out)


def test_the_read_thread_maps_rows_in_where_they_are_not_mapped_in(tiny_llava_trio, monkeypatch):
    """The read thread asks the kernel to map a step's rows in (``MappedShards.prefetch``)
    where they are not mapped in already: for the first pass over them, and for a later pass
    where they were unmapped since (``MappedShards.release``, passes far apart). Both calls
    replayed in the order they were made: no prefetch asks for rows mapped in and not unmapped
    since; each step the loop computes (not a later statistics pass a selection skips) has its
    rows mapped in until the loop releases them; every row of every input tensor is mapped in;
    and the tiny budget's long passes are unmapped and mapped in again, TIES' three."""
    from dim3.mapped import MappedShards

    events: list[tuple] = []
    prefetch, unmap, release = MappedShards.prefetch, MappedShards.release, engine._Source.release
    skips, stage, populate = engine._Merger.skips, engine._Source.stage, engine._Source.populate
    skipped: set[tuple[str, str, int]] = set()

    def mapping(self, file, key, dtype, shape, start, stop):
        events.append(("map", (str(file), key), start, stop))
        return prefetch(self, file, key, dtype, shape, start, stop)

    def unmapping(self, file, key, dtype, shape, start, stop):
        events.append(("unmap", (str(file), key), start, stop))
        return unmap(self, file, key, dtype, shape, start, stop)

    def releasing(self, step):
        events.append(("done", step))
        return release(self, step)

    def staging(self, step, slot, populate=True):
        events.append(("stage", step, populate))
        return stage(self, step, slot, populate)

    def populating(self, step):
        events.append(("populate", step))
        return populate(self, step)

    def skipping(self, step):
        if skips(self, step):
            skipped.add((step.source.key, step.stage, step.start))
            return True
        return False

    monkeypatch.setattr(MappedShards, "prefetch", mapping)
    monkeypatch.setattr(MappedShards, "release", unmapping)
    monkeypatch.setattr(engine._Source, "release", releasing)
    monkeypatch.setattr(engine._Merger, "skips", skipping)
    monkeypatch.setattr(engine._Source, "stage", staging)
    monkeypatch.setattr(engine._Source, "populate", populating)
    recipe = recipe_of(tiny_llava_trio, method="ties")
    with engine.open_inputs(recipe) as inputs:
        plan = engine.build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
        method = METHODS["ties"]
        pieces = engine.iter_merged(
            plan, inputs, method, recipe.method_options(), torch.device("cpu"), 512
        )
        sliced = 0
        for entry, start, _, _ in pieces:
            sliced += entry.action == "merge" and start > 0
        assert sliced > 20  # the budget cuts the matrices into slices of a few rows
        wanted = {}
        for e in plan.entries:
            rows = e.shape[0] if e.shape else 1
            wanted[(str(inputs.multimodal.file_of(e.key)), e.key)] = rows
            if e.action == "merge":
                shared = e.rows if e.rows is not None else rows
                wanted[(str(inputs.base.file_of(e.base_key)), e.base_key)] = shared
                for ckpt, key in zip(inputs.multilingual, e.multilingual_keys, strict=True):
                    wanted[(str(ckpt.file_of(key)), key)] = shared
        reads = {id(ev[1]): _rows_read(inputs, ev[1]) for ev in events if ev[0] == "done"}
    assert any(e.rows is not None and e.rows < e.shape[0] for e in plan.entries)  # padded
    mapped: dict[tuple[str, str], set[int]] = {}
    ever: dict[tuple[str, str], set[int]] = {}
    times: dict[tuple[str, str, int], int] = {}  # per row, how often mapped in
    checked = 0
    # the steps the read thread stages far ahead are views only, their rows mapped in
    # MAPPED_AHEAD steps before they are computed: the first steps and each guess's (its
    # sample reads them then) at once
    staged = [(ev[1], ev[2]) for ev in events if ev[0] == "stage"]
    at_once = [i for i, (_, now) in enumerate(staged) if now]
    guesses = [i for i, (st, _) in enumerate(staged) if st.stage == "stats0" and st.start == 0]
    assert at_once == sorted(set(range(engine.MAPPED_AHEAD + 1)) | set(guesses))

    def key(st) -> tuple:
        return (st.source.key, st.out.key, st.stage, st.start)

    views_only = [key(st) for st, now in staged if not now]
    first = {key(st) for st, now in staged if now}  # mapped in as they were staged
    populated = [key(ev[1]) for ev in events if ev[0] == "populate" and key(ev[1]) not in first]
    assert len(views_only) > 20
    # each mapped in later, once, in order; but some of the later statistics passes that a
    # selection skips (known by then for all but a pass's first steps)
    assert populated == [k for k in views_only if k in set(populated)]
    assert all((k[0], k[2], k[3]) in skipped for k in views_only if k not in set(populated))
    assert len(populated) < len(views_only)
    for event in events:
        if event[0] in ("stage", "populate"):
            continue
        if event[0] == "done":
            step = event[1]
            if (step.source.key, step.stage, step.start) in skipped:
                continue
            for where, a, b in reads[id(step)]:
                missing = set(range(a, b)) - mapped.get(where, set())
                assert not missing, (step, where, sorted(missing)[:5], "not mapped in")
            checked += 1
            continue
        kind, where, a, b = event
        rows = set(range(a, b))
        if kind == "map":
            again = rows & mapped.get(where, set())
            assert not again, (where, a, b, sorted(again)[:5], "mapped in already")
            mapped.setdefault(where, set()).update(rows)
            ever.setdefault(where, set()).update(rows)
            for r in rows:
                times[(*where, r)] = times.get((*where, r), 0) + 1
        else:
            mapped.get(where, set()).difference_update(rows)
    assert checked > 20 and skipped  # the guesses held: the later statistics passes skipped
    for where, rows in wanted.items():
        assert ever.get(where) == set(range(rows)), where
    assert max(times.values()) >= 2  # unmapped between passes, mapped in again


def _storing_the_tied_head(trio: Trio, folder: Path) -> Trio:
    """A copy of a trio whose models tie their embeddings yet store the head too (as some
    checkpoints do): the VLM's head is then merged from the embedding's rows, read again."""

    def with_head(tensors: dict) -> dict:
        embed = tensors.get("model.embed_tokens.weight")
        return tensors if embed is None else {**tensors, "lm_head.weight": embed.clone()}

    return rewritten(trio, folder, with_head)


@pytest.mark.parametrize(
    "method,tied", [("ties", False), ("task_arithmetic", True), ("dim3", True), ("ties", True)]
)
def test_the_loop_unmaps_input_rows_after_their_last_read_and_between_far_reads(
    method, tied, tiny_qwen2vl_trio, tmp_path, monkeypatch
):
    """The loop hands the rows of every input tensor it reads to ``MappedShards.release``
    after the last step that reads them (statistics passes read the rows again, and so does a
    head tied to the embedding), and also between two passes over them when each of a pass's
    steps is followed by the next read of its rows more than ``FAR`` steps later (the tiny
    budget's passes over a large matrix). Written rows are released only once their piece has
    been handed to the consumer (the write pipe may still write a copied piece from the
    mapped file), another step's at the next step. Those of the last steps are left to the
    mappings' end."""
    from dim3.mapped import MappedShards

    trio = _storing_the_tied_head(tiny_qwen2vl_trio, tmp_path) if tied else tiny_qwen2vl_trio
    staged: list = []  # every step, as the read thread stages them: the schedule
    released: list = []  # (step, pieces handed to the consumer by then)
    spans: dict[tuple[str, str], list[tuple[int, int]]] = {}
    handed: list[tuple[str, int]] = []
    stage, release, unmap = engine._Source.stage, engine._Source.release, MappedShards.release

    def staging(self, step, slot, populate=True):
        staged.append(step)
        return stage(self, step, slot, populate)

    def releasing(self, step):
        released.append((step, set(handed)))
        return release(self, step)

    def unmapping(self, file, key, dtype, shape, start, stop):
        spans.setdefault((str(file), key), []).append((start, stop))
        return unmap(self, file, key, dtype, shape, start, stop)

    monkeypatch.setattr(engine._Source, "stage", staging)
    monkeypatch.setattr(engine._Source, "release", releasing)
    monkeypatch.setattr(MappedShards, "release", unmapping)
    recipe = recipe_of(trio, method=method)
    with engine.open_inputs(recipe) as inputs:
        plan = engine.build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
        assert any(e.tied_to for e in plan.entries) == tied
        pieces = engine.iter_merged(
            plan, inputs, METHODS[method], recipe.method_options(), torch.device("cpu"), 512
        )
        for entry, start, _, _ in pieces:
            handed.append((entry.key, start))
        wanted: dict[tuple[str, str], list[tuple[int, int]]] = {}
        for step, _ in released:
            for where, a, stop in _rows_read(inputs, step):
                wanted.setdefault(where, []).append((a, stop))
    n = len(staged)

    def next_read(i: int) -> int | None:  # the next step that reads step i's rows again
        step = staged[i]
        return next(
            (
                k
                for k in range(i + 1, n)
                if staged[k].source.key == step.source.key
                and staged[k].start < step.stop
                and step.start < staged[k].stop
            ),
            None,
        )

    passes: list[list[int]] = []  # runs of steps of one source, output and stage
    for i, step in enumerate(staged):
        what = (step.source.key, step.out.key, step.stage)
        if not passes or what != passes[-1][0]:
            passes.append([what])
        passes[-1].append(i)
    want_ids = set()
    for _, *ids in passes:
        after = [next_read(i) for i in ids]
        if all(k is None for k in after):  # the last pass: written or copied rows
            want_ids |= {i for i in ids if staged[i].stage in ("copy", "whole", "apply")}
        elif min(k - i for i, k in zip(ids, after, strict=True) if k is not None) > engine.FAR:
            want_ids |= set(ids)

    # unmapped at the step a step's lag after it: a copy's (its piece is written from the
    # mapped rows), RELEASE_LAG steps later; any other's, the next (its tiles are done by the
    # time the next step is computed: one at a time here). A copy's wait holds back no later
    # step's. So the rows of the steps whose lag reaches past the last step are left to the
    # mappings' end, and those released at one step go in the order computed
    def lag(i: int) -> int:
        return engine.RELEASE_LAG if staged[i].stage == "copy" else 1

    due = sorted((i + lag(i), i) for i in want_ids if i + lag(i) <= n - 1)
    want = [staged[i] for _, i in due]
    assert [step for step, _ in released] == want and len(want) > 20
    assert any(s.stage.startswith("stats") for s in staged) == (method != "task_arithmetic")
    between = [s for s in want if next_read(staged.index(s)) is not None]
    assert between  # the passes over the embedding (and the tied head's reading it again)
    for step, by_then in released:
        if step.stage in ("copy", "whole", "apply"):
            assert (step.out.key, step.start) in by_then, (step, "released before it was handed")
    assert {w: sorted(v) for w, v in spans.items()} == {w: sorted(v) for w, v in wanted.items()}


@pytest.mark.parametrize("method", ["task_arithmetic", "dim3", "ties", "dare_ties"])
def test_the_loop_reuses_its_buffers_in_the_steady_state(method, tiny_llava_trio):
    """Hundreds of slices, a handful of buffers: once every shape has been met (the first half
    of the steps holds every layer's shapes), no step allocates, and every merged piece lives
    in one of a few buffers."""
    recipe = recipe_of(tiny_llava_trio, method=method)
    m = METHODS[method]
    budget = 512  # a row or two per slice
    with engine.open_inputs(recipe) as inputs:
        plan = engine.build_plan(inputs.base, inputs.multilingual, inputs.multimodal)
        buffers = Buffers(engine._limit(plan, budget))
        counts, where = [], set()
        pieces = engine.iter_merged(
            plan, inputs, m, recipe.method_options(), torch.device("cpu"), budget, buffers=buffers
        )
        for entry, _, rows, _ in pieces:
            counts.append(buffers.allocations)
            if entry.action == "merge":
                where.add(rows.untyped_storage().data_ptr())
    steps = len(counts)
    assert steps > 20 * counts[-1], steps  # the budget cuts every matrix into many slices
    assert counts[steps // 2] == counts[-1], "a buffer was allocated after the first half"
    assert counts[-1] <= 16, counts[-1]  # the working set: inputs, a few temporaries, outputs
    assert len(where) <= 4, len(where)


@pytest.mark.parametrize("method", ["ties", "dim3", "task_arithmetic", "tsv"])
def test_the_loop_thread_computes_on_one_thread_where_the_tiles_do_the_work(
    method, tiny_llava_trio, tmp_path, monkeypatch
):
    """Where tiles compute every merged matrix, the loop's thread runs torch on one thread (its
    small ops would otherwise wake OpenMP threads that spin on the tiles' cores) and guesses a
    selection's thresholds on the read thread, ahead of the step; a rule that computes on the
    loop's thread ("matrix": TSV) keeps every compute thread. torch's setting is restored."""
    import threading

    kind = METHODS[method].kind
    threads: list[int] = []
    guessed: list[str] = []
    call, add_stats, guess = engine._Merger.__call__, engine._Merger.add_stats, engine._Merger.guess
    start = engine._Tiles.start

    def on_start(self, *args, **kwargs):
        threads.append(torch.get_num_threads())
        return start(self, *args, **kwargs)

    def on_call(self, step, work):
        threads.append(torch.get_num_threads())
        return call(self, step, work)

    def on_stats(self, step, partials):
        threads.append(torch.get_num_threads())
        return add_stats(self, step, partials)

    def on_guess(self, step, views):
        if step.stage == "stats0" and step.start == 0:
            guessed.append(threading.current_thread().name)
        return guess(self, step, views)

    monkeypatch.setattr(engine._Merger, "__call__", on_call)
    monkeypatch.setattr(engine._Merger, "add_stats", on_stats)
    monkeypatch.setattr(engine._Merger, "guess", on_guess)
    monkeypatch.setattr(engine._Tiles, "start", on_start)
    before = torch.get_num_threads()
    engine.merge_to_folder(recipe_of(tiny_llava_trio, method=method), tmp_path / "out")
    assert torch.get_num_threads() == before
    cpu = torch.device("cpu")
    tiled = kind in ("elementwise", "columns", "selection")
    assert threads and set(threads) == {1 if tiled else engine.compute_threads(cpu)}
    if kind == "selection":  # every matrix's, on the read thread (but the merge's first step's)
        assert len(guessed) > 10
        assert all(name.startswith("dim3-read") for name in guessed[1:]), guessed


def test_buffers_hand_back_the_view_of_a_request_met_before_until_the_buffer_grows():
    buffers = Buffers(limit=1 << 20)
    cpu = torch.device("cpu")
    a = buffers.take("x", (10, 10), torch.float32, cpu)
    assert buffers.take("x", (10, 10), torch.float32, cpu) is a  # no new tensor object
    b = buffers.take("x", (5, 4), torch.bfloat16, cpu)  # another view of the same memory
    assert b is not a and b.data_ptr() == a.data_ptr()
    assert (tuple(b.shape), b.dtype) == ((5, 4), torch.bfloat16)
    c = buffers.take("x", (20, 20), torch.float32, cpu)  # larger: new memory
    again = buffers.take("x", (10, 10), torch.float32, cpu)
    assert again is not a and again.data_ptr() == c.data_ptr() != a.data_ptr()
    assert buffers.take("y", (10, 10), torch.float32, cpu).data_ptr() != c.data_ptr()
    with pytest.warns(UserWarning, match="resized"):  # an out= of another shape: resized
        torch.sum(torch.ones(3, 4), dim=0, out=again)
    assert again.shape == (4,)
    fresh = buffers.take("x", (10, 10), torch.float32, cpu)
    assert fresh.shape == (10, 10) and fresh.data_ptr() == c.data_ptr()


def test_buffers_grow_only_for_a_larger_request_and_keep_their_memory():
    buffers = Buffers(limit=1 << 20)
    cpu = torch.device("cpu")
    a = buffers.take("x", (10, 10), torch.float32, cpu)
    b = buffers.take("x", (5, 4), torch.bfloat16, cpu)  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and buffers.allocations == 1
    c = buffers.take("x", (20, 10), torch.float32, cpu)  # larger: one new buffer
    assert buffers.allocations == 2 and c.shape == (20, 10)
    assert buffers.take("x", (20, 10), torch.float32, cpu).data_ptr() == c.data_ptr()
    big = buffers.take("y", (1 << 19,), torch.float32, cpu)  # above the limit: not kept
    assert big.numel() == 1 << 19 and buffers.allocations == 2
    t = torch.randn(6, 4)
    assert buffers.like("z", t.T).stride() == t.T.stride()  # a transposed buffer for a .T


def test_kept_buffers_fill_once_per_key_and_never_hand_back_stale_or_half_filled_values():
    buffers = Buffers(limit=1 << 20)
    cpu = torch.device("cpu")
    fills = []

    def fill(value):
        def f(t, held):
            if held is None:  # otherwise still filled with what ``held`` says
                fills.append(value)
                t.fill_(value)
            return value

        return f

    a = buffers.kept("r", "k1", (8,), torch.float32, cpu, fill(1.0))
    assert torch.equal(a, torch.full((8,), 1.0)) and fills == [1.0]
    buffers.take("other", (8,), torch.float32, cpu).fill_(9.0)  # another name: no effect
    again = buffers.kept("r", "k1", (8,), torch.float32, cpu, fill(2.0))
    assert torch.equal(again, torch.full((8,), 1.0)) and fills == [1.0]  # kept, not refilled
    assert torch.equal(buffers.kept("r", "k2", (8,), torch.float32, cpu, fill(3.0)), a.fill_(3.0))
    assert fills == [1.0, 3.0]
    buffers.kept("r", "k2", (4,), torch.float32, cpu, fill(4.0))  # another shape: filled
    assert fills[-1] == 4.0

    def broken(t, held):
        t.fill_(5.0)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        buffers.kept("r", "k3", (8,), torch.float32, cpu, broken)
    buffers.kept("r", "k3", (8,), torch.float32, cpu, fill(6.0))  # the failed fill is not kept
    assert fills[-1] == 6.0
    buffers.kept("r", "k3", (64,), torch.float32, cpu, fill(7.0))  # grown: a new buffer, filled
    buffers.kept("r", "k3", (8,), torch.float32, cpu, fill(8.0))  # the 64 were held, not k3's 8
    assert fills[-2:] == [7.0, 8.0]
    for value in (10.0, 11.0):  # above the limit: a fresh tensor, filled every time
        buffers.kept("r", "big", (1 << 19,), torch.float32, cpu, fill(value))
    assert fills[-2:] == [10.0, 11.0]


def test_dare_masks_of_interleaved_tiles_in_reused_buffers_equal_the_whole_masks(monkeypatch):
    """Tiles of rows of two tensors and two models, interleaved, in one set of reused buffers
    (each random block is drawn once per run of tiles inside it and kept between them): every
    tile's mask is the rows of its tensor's whole mask."""
    from dim3.methods import _utils as U

    monkeypatch.setattr(U, "DARE_BLOCK", 96)  # blocks of 3 rows of 32 entries
    shapes = {"a.weight": (20, 32), "b.weight": (11, 32)}
    # consecutive calls differ in one of name, model, seed, rows: each must be a key of its own
    runs = [(n, i, seed) for seed in (3, 4) for i in (0, 1) for n in shapes]
    whole = {(n, i, seed): U.dare_keep_mask(shapes[n], 0.7, seed, n, i) for n, i, seed in runs}
    buffers = Buffers()
    with U.reuse_buffers(buffers):
        for start in range(0, 20, 2):
            for name, i, seed in runs:
                rows, cols = shapes[name]
                if start < rows:
                    n = min(2, rows - start)
                    got = U.dare_keep_mask((n, cols), 0.7, seed, name, i, offset=start)
                    want = whole[name, i, seed][start : start + n]
                    assert torch.equal(got, want), (name, i, seed, start)


@pytest.mark.parametrize("compiled", ["1", "0"])
def test_dare_blocks_are_drawn_once_and_only_as_far_as_the_tiles_reach(compiled, monkeypatch):
    """Tiles of 2 rows over blocks of 3 (some straddle two blocks; the last block is short) in
    one set of reused buffers: each random number the masks use is drawn once, none beyond the
    tensor's last row (whole blocks would draw 7 x 96 = 672), and the masks are the whole
    tensor's; with the compiled generator (dim3/compiled.py) and with torch.rand."""
    from dim3.compiled import DareDraws
    from dim3.methods import _utils as U

    monkeypatch.setenv("DIM3_FUSED", compiled)
    monkeypatch.setattr(U, "DARE_BLOCK", 96)  # blocks of 3 rows of 32 entries
    whole = U.dare_keep_mask((20, 32), 0.6, 9, "w", 1)
    drawn = []
    rand, words = torch.rand, DareDraws.words

    def counted(*args, **kwargs):
        got = rand(*args, **kwargs)
        drawn.append(got.numel())
        return got

    def counted_words(self, p, out):
        drawn.append(out.numel())
        return words(self, p, out)

    monkeypatch.setattr(torch, "rand", counted)
    monkeypatch.setattr(DareDraws, "words", counted_words)
    with U.reuse_buffers(Buffers()):
        for start in range(0, 20, 2):
            got = U.dare_keep_mask((2, 32), 0.6, 9, "w", 1, offset=start)
            assert torch.equal(got, whole[start : start + 2]), start
    assert sum(drawn) == 20 * 32


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960), (40, 8)])
def test_tiles_follow_the_dare_blocks(shape, workers):
    """The tiles cover the rows in order, none above ``TILE_BYTES``; for a DARE rule
    (``Method.row_blocks``) a step of at least as many random blocks (682 rows of 1536, 117 of
    8960) as threads goes to the threads in runs of whole blocks; a step of more than one tile
    is shared, in runs of about equal tiles when there are no blocks."""
    from dim3.methods import _utils as U

    assert METHODS["dare_ties"].row_blocks == METHODS["dare_task_arithmetic"].row_blocks
    assert METHODS["dare_ties"].row_blocks == U.DARE_BLOCK and METHODS["ties"].row_blocks == 0
    tiles = engine._Tiles(workers)
    try:
        for blocks in (0, U.DARE_BLOCK):
            runs = tiles._groups([torch.empty(shape), torch.empty(shape)], blocks)
            flat = [t for run in runs for t in run]
            assert flat[0][0] == 0 and flat[-1][1] == shape[0]
            assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(flat, flat[1:], strict=False))
            assert all(
                4 * (b - a) * shape[1] <= max(engine.TILE_BYTES, 4 * shape[1]) for a, b in flat
            )
            block = max(1, blocks // shape[1])
            if blocks and -(-shape[0] // block) >= workers:
                assert all(run[0][0] % block == 0 for run in runs)
            elif len(runs) > 1:  # about equal: at most one tile apart, the last run shorter
                assert max(map(len, runs)) - min(map(len, runs[:-1])) <= 1
            assert all(run for run in runs) and len(runs) <= workers
            assert len(runs) > 1 or workers == 1 or len(flat) == 1
    finally:
        tiles.close()


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1536, 1536), (8960, 1536), (1536, 8960), (100, 1536)])
def test_tiles_of_runs_are_whole_runs_of_the_small_tiles(shape, workers):
    """DiM3's column sums (``runs``: SUM_TILES tiles of TILE_BYTES // SUM_TILES, which fix
    the sums' bits) take tiles of whole runs of the small tiles: each tile's rows, cut every
    small tile's rows from its start, are the small tiles of the plain cut, in order."""
    tiles = engine._Tiles(workers)
    views = [torch.empty(shape), torch.empty(shape)]
    small = engine.TILE_BYTES // engine.SUM_TILES
    try:
        plain = [t for run in tiles._groups(views, 0, small) for t in run]
        grouped = [t for run in tiles._groups(views, 0, small, engine.SUM_TILES) for t in run]
    finally:
        tiles.close()
    rows = engine._tile_rows(small, shape[1])
    assert all(b - a <= engine.SUM_TILES * rows for a, b in grouped)
    assert len(grouped) == -(-len(plain) // engine.SUM_TILES) or workers > 1
    cut = [(x, min(b, x + rows)) for a, b in grouped for x in range(a, b, rows)]
    assert cut == plain


def test_compute_threads_leave_a_core_to_the_io_threads_above_two():
    cpu = torch.device("cpu")
    assert engine.compute_threads(cpu, cores=1) == 1
    assert engine.compute_threads(cpu, cores=2) == 2
    assert engine.compute_threads(cpu, cores=16) == 15


# ------------------------------------------------ the untiled loop (a GPU's), run on the CPU


def _same_to_rounding(got: Path, want: Path) -> None:
    """Two merged folders hold the same tensors, to float32 rounding (sums in another order)."""
    a, b = load_all(want), load_all(got)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("method", SLICED)
def test_untiled_loop_merges_what_the_tiles_merge(method, tiny_qwen2vl_trio, tmp_path, monkeypatch):
    """With ``DIM3_TILES=0`` a CPU merge computes every step on the loop's thread, the path a
    CUDA merge takes (no tiles off the CPU): CI has no GPU, so this is where that path runs.
    It writes what the tiled merge writes, to float32 rounding (sums added in another order)."""
    tiled = engine.merge_to_folder(
        recipe_of(tiny_qwen2vl_trio, method=method, device="cpu"),
        tmp_path / "tiled",
        chunk_size=4096,
    )
    monkeypatch.setenv("DIM3_TILES", "0")
    assert engine.tile_workers(torch.device("cpu")) == 0
    untiled = engine.merge_to_folder(
        recipe_of(tiny_qwen2vl_trio, method=method, device="cpu"),
        tmp_path / "untiled",
        chunk_size=4096,
    )
    _same_to_rounding(untiled.out_dir, tiled.out_dir)


def test_untiled_merge_into_a_loaded_model_equals_the_folder(
    tiny_llava_trio, tmp_path, monkeypatch
):
    recipe = recipe_of(tiny_llava_trio, device="cpu")
    engine.merge_to_folder(recipe, tmp_path / "out", chunk_size=4096)
    monkeypatch.setenv("DIM3_TILES", "0")
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_trio.multimodal)
    engine.merge_into_model(model, recipe, chunk_size=4096)
    want = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, want[key], rtol=1e-5, atol=1e-6, msg=key)


class _StandIn:
    """A CUDA stream or event for :func:`_cuda_branches_on_the_cpu`: the work it would queue is
    done at once on the CPU, and each call is logged (kind, stream or event)."""

    current = None  # the stream work is queued on (torch.cuda.stream sets it)

    def __init__(self, log: list, name: str = "event"):
        self.log, self.name = log, name

    def wait_event(self, event) -> None:  # a stream's
        self.log.append(("wait_event", self.name, event.name))

    def wait_stream(self, stream) -> None:
        self.log.append(("wait_stream", self.name, stream.name))

    def record(self, stream=None) -> None:  # an event's
        self.log.append(("record", (stream or _StandIn.current).name, self.name))

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.name, None))


def _cuda_branches_on_the_cpu(monkeypatch) -> list:
    """Make a CPU merge take the engine's CUDA branches (``_Streams.cuda``: pinned staging in
    slots with ready and consumed events, copies on a transfer stream, the rule on a compute
    stream, the write pipe's CUDA depth; its device-to-host copy is not taken, the rows being on
    the CPU), with stand-ins for torch's streams and events and
    unpinned host buffers, the CPU's tiles and compiled kernels off as they are on a GPU.
    Returns the log of the stand-ins' calls."""
    import contextlib

    from dim3 import slices

    log: list = []
    default = _StandIn(log, "default")
    _StandIn.current = default

    def streams(self, device: torch.device) -> None:
        self.cuda = True
        self.transfer, self.compute = _StandIn(log, "transfer"), _StandIn(log, "compute")

    @contextlib.contextmanager
    def on(stream):
        before, _StandIn.current = _StandIn.current, stream
        try:
            yield
        finally:
            _StandIn.current = before

    take = slices.Buffers.take
    events = iter(range(1 << 30))
    monkeypatch.setattr(engine._Streams, "__init__", streams)
    monkeypatch.setattr(torch.cuda, "Event", lambda: _StandIn(log, f"event{next(events)}"))
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _StandIn.current)
    monkeypatch.setattr(
        torch.Tensor, "record_stream", lambda t, s: log.append(("record_stream", s.name, None))
    )
    monkeypatch.setattr(  # pinned memory needs a CUDA driver
        slices.Buffers, "take", lambda self, *a, pin=False: take(self, *a, pin=False)
    )
    monkeypatch.setenv("DIM3_TILES", "0")
    monkeypatch.setenv("DIM3_FUSED", "0")
    return log


@pytest.mark.parametrize("method", [*SLICED, "tsv", "iso_c"])
def test_the_cuda_branches_merge_what_the_cpu_merges(
    method, tiny_qwen2vl_trio, tmp_path, monkeypatch
):
    """CI has no GPU, and a GPU merge's own branches once broke on every GPU unseen (a
    misplaced parenthesis). Here they run on the CPU with stand-ins for the streams and events
    (:func:`_cuda_branches_on_the_cpu`): every sliced method and two that merge each tensor
    whole write what the CPU's loop writes, and the staging's events are recorded, waited for
    and synchronized. What this cannot check is the order the GPU runs the queued work in, nor
    the write pipe's device-to-host copy: ``bash .ci/gpu`` does, on a GPU."""
    recipe = recipe_of(tiny_qwen2vl_trio, method=method, device="cpu")
    monkeypatch.setenv("DIM3_TILES", "0")
    cpu = engine.merge_to_folder(recipe, tmp_path / "cpu", chunk_size=4096)
    log = _cuda_branches_on_the_cpu(monkeypatch)
    cuda = engine.merge_to_folder(recipe, tmp_path / "cuda", chunk_size=4096)
    _same_to_rounding(cuda.out_dir, cpu.out_dir)
    kinds = {(kind, stream) for kind, stream, _ in log}
    # staged on the transfer stream (ready recorded, consumed waited for): at least every
    # step that reads rows to merge them but a selection's later statistics passes (skipped
    # where the first found the thresholds)
    steps = engine._schedule(cuda.plan, METHODS[method], 4096)
    staged = sum(step.stage in ("whole", "stats0", "apply") for step in steps)
    assert sum(1 for entry in log if entry[:2] == ("record", "transfer")) >= staged > 0
    assert ("wait_event", "transfer") in kinds, kinds
    # the rule's reads on the compute stream (ready waited for, consumed recorded, the
    # staged rows recorded)
    assert {("wait_event", "compute"), ("record", "compute"), ("record_stream", "compute")} <= kinds
    assert any(kind == "synchronize" for kind, _, _ in log)  # a slot's pinned buffers reused


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", [*SLICED, "tsv", "iso_c"])
def test_cuda_sliced_merge_equals_cpu_merge(method, tiny_qwen2vl_trio, tmp_path):
    """The CUDA path (pinned staging, transfer and compute streams, pinned output buffers)
    writes what the CPU path writes; for TSV and Iso-C too, which merge each tensor whole: their
    embedding is larger than the buffers keep (at this chunk size), so its device buffer in the
    write pipe is a fresh one each time (a0a5b74)."""
    cpu = engine.merge_to_folder(
        recipe_of(tiny_qwen2vl_trio, method=method, device="cpu"), tmp_path / "cpu", chunk_size=4096
    )
    gpu = engine.merge_to_folder(
        recipe_of(tiny_qwen2vl_trio, method=method, device="cuda"),
        tmp_path / "gpu",
        chunk_size=4096,
    )
    _same_to_rounding(gpu.out_dir, cpu.out_dir)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_into_a_loaded_model_equals_the_folder(tiny_llava_trio, tmp_path):
    recipe = recipe_of(tiny_llava_trio, device="cuda")
    engine.merge_to_folder(recipe, tmp_path / "out", chunk_size=4096)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_trio.multimodal).cuda()
    engine.merge_into_model(model, recipe, chunk_size=4096)
    want = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor.cpu(), want[key], rtol=1e-5, atol=1e-6, msg=key)


ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_selects_every_test_that_needs_cuda():
    """``.ci/gpu`` runs ``-k "cuda or gpu"`` over its files: every test in the suite that skips
    without CUDA must be in that selection (a renamed or moved one would silently drop out of
    the GPU run), no test that skips with CUDA may be (the script fails on any skip: this one's
    refusal test was selected, so the script failed on every GPU machine), and those files must
    need neither gradio nor Playwright (a GPU machine's image may lack them)."""
    import ast
    import re
    import subprocess
    import sys

    needs, avoids = set(), set()
    for file in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                for mark in node.decorator_list:
                    if not (isinstance(mark, ast.Call) and mark.args):
                        continue
                    condition = ast.unparse(mark.args[0]).replace(" ", "")
                    if condition == "nottorch.cuda.is_available()":  # skips without CUDA
                        needs.add(f"tests/{file.name}::{node.name}")
                    elif "cuda.is_available" in condition:  # skips with it (or is unclear)
                        avoids.add(f"tests/{file.name}::{node.name}")
    assert len(needs) >= 4 and avoids, (needs, avoids)
    listed = re.search(r"^\s*tests=\((.*)\)", (ROOT / ".ci" / "gpu").read_text(), re.M)
    assert listed is not None
    files = listed.group(1).split()
    modules = ", ".join(f"tests.{Path(f).stem}" for f in files)
    probe = f"import sys; import {modules}; print(sorted({{'gradio', 'playwright'}} & set(sys.modules)))"
    imported = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert imported.returncode == 0 and imported.stdout.strip() == "[]", imported
    argv = [sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider", *files]
    done = subprocess.run(
        [*argv, "-k", "cuda or gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    selected = {line.split("[")[0] for line in done.stdout.splitlines() if "::" in line}
    assert needs <= selected, needs - selected
    assert not avoids & selected, avoids & selected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_the_device_check_refuses_a_cpu_only_machine():
    """``bash .ci/gpu`` where torch sees no GPU: exit status 2 and a message that says so, before
    any test or benchmark runs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "gpu")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA device" in done.stderr and "sees none here" in done.stderr
    assert "passed" not in done.stdout and "I/O floor" not in done.stdout
