"""The compiled TIES kernels (dim3/fused.py) give the very bits of the eager rule.

Compared with ``dim3.methods.ties.merge`` (eager torch, the whole tensor at once) at a real tile
shape (1536 columns, as Qwen2-VL-2B's hidden size; tiles of 1 MiB of float32 as the engine
cuts them, and a ragged last one), on values built to hit every branch: thresholds tied
thousands of times (the tied values split among tiles, flat order deciding), ±0, ±∞ and NaN in
the base and the updates, λ not a float32 value, densities that keep nothing but the one
few values or all of them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from dim3 import compiled, engine, fused, slices
from dim3.methods import ties
from dim3.slices import ExactSelect, FirstMask, magnitude_bits
from tests.test_engine import recipe_of
from tests.test_methods import ref_ties

COLS = 1536
TILE_ROWS = engine.TILE_BYTES // (4 * COLS)  # 682 rows: one tile of the engine's


def test_the_kernels_are_available():
    """numba is a pinned requirement: a fresh install runs the compiled kernels, not the
    eager fallback."""
    assert compiled.available()


def _tiles(rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + TILE_ROWS, rows)) for a in range(0, rows, TILE_ROWS)]


def _selects(base, tuned, density, windows=None):
    """Per update, an ExactSelect over the whole tensor in tiles (two passes, or one with
    ``windows``) and its FirstMask."""
    n = base.numel()
    ks = ties._ks(ties.TiesOptions(density=density), n)
    firsts = []
    for t in tuned:
        bits = magnitude_bits(t - base)
        select = ExactSelect(ks, n, base.device)
        for _ in range(2):
            select.observe(bits)
            select.next_pass()
        (found,) = select.result()
        firsts.append(FirstMask(ks[0], n, found))
    return firsts


def _fused_merge(base, tuned, density, scaling, dtype=torch.float32):
    """The kernel over the tensor's tiles in row order, each told how many of the values tied
    with each threshold it takes (as the engine's :meth:`before_tiles` tells it); the kernel
    reads the tensors in ``dtype`` (bfloat16: as the engine hands it bfloat16 checkpoints)."""
    firsts = _selects(base, tuned, density)
    out = torch.empty_like(base)
    stored = [x.to(dtype) for x in (base, *tuned)]
    for s, x in zip(stored, (base, *tuned), strict=True):  # the same values, NaNs too
        assert torch.equal(s.float().view(torch.int32), x.view(torch.int32))
    for a, b in _tiles(base.shape[0]):
        tied = [
            int((magnitude_bits(t[a:b] - base[a:b]) == f.bits).sum())
            for f, t in zip(firsts, tuned, strict=True)
        ]
        lefts = [(f.left, n) for f, n in zip(firsts, tied, strict=True)]
        rows = [x[a:b] for x in stored]
        fused.apply(rows[0], rows[1:], firsts, lefts, scaling, out[a:b])
        for f, n in zip(firsts, tied, strict=True):
            f.took(n)
    return out


def _trio(kind: str, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, COLS, generator=g) * 0.02
    tuned = [base + torch.randn(rows, COLS, generator=g) * s for s in (1e-3, 2e-3)]
    if kind == "grid":  # few distinct updates: every threshold tied thousands of times
        step = 2.0**-10
        base = (base / step).round() * step
        tuned = [base + ((t - base) / step).round().clamp(-3, 3) * step for t in tuned]
    if kind == "bf16":  # checkpoint values: differences of bfloat16 numbers
        base, tuned = base.bfloat16().float(), [t.bfloat16().float() for t in tuned]
    if kind == "specials":
        flat = [x.view(-1) for x in (base, *tuned)]
        for i, x in enumerate(flat):
            x[i::997] = 0.0
            x[i + 1 :: 1009] = -0.0
            x[i + 2 :: 50021] = float("nan")
            x[i + 3 :: 70001] = float("inf")
            x[i + 4 :: 70003] = -float("inf")
        flat[1][5::13] = flat[0][5::13]  # equal to the base: a zero update
        flat[2][6::17] = -0.0
    return base, tuned


def _same_bits(got, want):
    """Equal bit for bit, except that a NaN is any NaN."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("kind", ["normal", "grid", "bf16", "specials"])
@pytest.mark.parametrize("density,scaling", [(0.2, 1.0), (0.37, 0.3), (0.01, 1.7), (1.0, 1.0)])
def test_fused_apply_equals_the_eager_rule_bit_for_bit(kind, density, scaling):
    rows = 3 * TILE_ROWS + 57  # four tiles, the last one ragged
    base, tuned = _trio(kind, rows, seed=len(kind))
    options = ties.TiesOptions(density=density, scaling=scaling)  # 1.0: nothing trimmed
    want = ties.merge(base, tuned, options)
    got = _fused_merge(base, tuned, options.density, scaling)
    _same_bits(got, want)
    if kind == "bf16":  # the same values stored in bfloat16, read as stored
        _same_bits(_fused_merge(base, tuned, density, scaling, torch.bfloat16), want)
    if kind in ("normal", "bf16") and density == 0.2:  # and the definition, in float64
        torch.testing.assert_close(
            got, ref_ties(base, tuned, 0.2, scaling).float(), rtol=0, atol=1e-7
        )


def test_tied_thresholds_split_among_tiles_in_flat_order():
    """The grid trio's thresholds are tied so often that some tiles take only part of the tied
    values: the kernel's second loop (the tile's share, in flat order) decides them."""
    base, tuned = _trio("grid", 3 * TILE_ROWS + 57, seed=4)
    firsts = _selects(base, tuned, 0.2)
    assert all(0 < f.need < f.equal for f in firsts)  # neither none nor all of them kept
    _same_bits(_fused_merge(base, tuned, 0.2, 1.0), ties.merge(base, tuned, ties.TiesOptions()))


@pytest.mark.parametrize("kind", ["normal", "grid", "specials", "bf16"])
def test_fused_counts_equal_the_eager_partial(kind):
    """One first-pass tile: with windows, the counts below them and the values inside (in flat
    order) are those of :meth:`ExactSelect.partial`; without, the histograms. For a whole
    tile and for one whose size is not a multiple of the kernel's words of 8 flags."""
    whole, whole_tuned = _trio(kind, TILE_ROWS, seed=7)
    for cut in (0, 5):
        n = whole.numel() - cut
        base, tuned = whole.reshape(-1)[:n], [t.reshape(-1)[:n] for t in whole_tuned]
        bits = magnitude_bits(tuned[0] - base).sort().values
        at = [int(bits[int(q * n)]) for q in (0.45, 0.5, 0.55, 0.8)]
        guesses = [(at[0] >> 16 << 16, at[2] + 1), (at[1], at[3] + 1)]  # around k; any start
        for windows in ([guesses[0]], [guesses[1]], [None], None):
            selects = [ExactSelect([n // 2], n, base.device) for _ in tuned]
            scratch = None
            if windows is not None:
                for s in selects:
                    s.window(windows)
                kept = [torch.full((n + 1,), -7, dtype=torch.int32) for _ in tuned]
                marked = torch.full(((n + 7) // 8,), -7, dtype=torch.int32)
                scratch = (*kept, torch.empty(n, dtype=torch.uint8), marked)
            dtype = torch.bfloat16 if kind == "bf16" else torch.float32  # read as stored
            got = fused.counts(base.to(dtype), [t.to(dtype) for t in tuned], selects, scratch)
            for t, s, g in zip(tuned, selects, got, strict=True):
                want = s.partial(magnitude_bits(t - base))
                assert len(g) == len(want)
                for x, y in zip(g, want, strict=True):
                    assert x.dtype == y.dtype and torch.equal(x, y)
            if windows not in (None, [None]):
                assert got[0][1].numel() > n // 20 and int(got[0][0]) > n // 3


@pytest.mark.parametrize("lows", ["mixed", "one"])  # "one": bfloat16 differences' low bits
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kth_in_bin_equals_the_eager_ops_and_a_sort(seed, lows, monkeypatch):
    """The threshold from the values kept in a window (:meth:`ExactSelect._from_windows`): the
    compiled loop, the eager ops and a sort give the same low bits, counts below and equal to
    it, and each piece's values equal to it; for ranks at the bin's ends and past its count,
    pieces of 0 to 30000 values in the bin and its neighbours, half of them tied on 8 values,
    or all with the same low bits."""
    g = torch.Generator().manual_seed(seed)
    h = 0x3C00 + 7 * seed
    pieces = []
    for n in (0, 1, 5000, 0, 17, 30000, 3):
        bins = torch.randint(h - 1, h + 2, (n,), generator=g)
        tied = torch.rand(n, generator=g) < 0.5
        low = torch.where(
            tied,
            torch.randint(0, 8, (n,), generator=g) * 4096,
            torch.randint(0, 1 << 16, (n,), generator=g),
        )
        if lows == "one":
            low = torch.zeros_like(low)
        pieces.append(((bins << 16) | low).to(torch.int32))
    inside = torch.cat(pieces)
    in_bin = inside[(inside >> 16) == h].sort().values
    count = in_bin.numel()
    cpu = torch.device("cpu")
    for rank in (1, 2, count // 3, count // 2, count - 1, count, count + 1):
        got = slices._kth_in_bin(pieces, h, rank, cpu)
        monkeypatch.setenv("DIM3_FUSED", "0")
        eager = slices._kth_in_bin(pieces, h, rank, cpu)
        monkeypatch.delenv("DIM3_FUSED")
        assert got == eager
        if rank > count:
            assert got is None
            continue
        kth = int(in_bin[rank - 1])
        want = (
            kth & 0xFFFF,
            int((in_bin < kth).sum()),
            int((in_bin == kth).sum()),
            [int((p == kth).sum()) for p in pieces],
        )
        assert got == want
        # joined in the engine's buffers, the same memory call after call: the same numbers
        buffers = slices.Buffers()
        for _ in range(2):
            assert slices._kth_in_bin(pieces, h, rank, cpu, buffers) == got
            assert slices._kth_in_bin(pieces[:4], h, rank, cpu, buffers) == slices._kth_in_bin(
                pieces[:4], h, rank, cpu
            )
        assert buffers.allocations == 1  # sized by the first, larger join; reused since
    assert slices._kth_in_bin([], h, 1, cpu) is None
    assert slices._kth_in_bin([], h, 1, cpu, slices.Buffers()) is None


@pytest.mark.parametrize("lows", ["mixed", "one"])  # "one": bfloat16 differences' low bits
@pytest.mark.parametrize("seed", [0, 1])
def test_kth_in_window_equals_the_eager_ops_and_a_sort(seed, lows, monkeypatch):
    """The threshold from the values kept in a window spanning several bins (a first pass that
    counts the values below the window: :meth:`ExactSelect._from_windows`): the compiled loops,
    the eager ops and a sort give the same bits, counts below and equal to it, and each
    piece's values equal to it, for ranks at the window's ends, at its bins' edges and past its
    count; pieces of 0 to 30000 values, a third of them tied on 8 values, or all with the same
    low bits (as bfloat16 weights' differences, where the compiled loop counts no low bits)."""
    g = torch.Generator().manual_seed(seed)
    lo, bins = (0x3C00 + 5 * seed) << 16, 9
    hi = lo + (bins - 1) * (1 << 16) + 12345  # the last bin cut short
    pieces = []
    for n in (0, 1, 5000, 0, 17, 30000, 3):
        v = torch.randint(lo, hi, (n,), generator=g)
        tied = torch.rand(n, generator=g) < 1 / 3
        v = torch.where(tied, lo + torch.randint(0, 8, (n,), generator=g) * 70000, v)
        if lows == "one":
            v = v >> 16 << 16
        pieces.append(v.to(torch.int32))
    inside = torch.cat(pieces).sort().values
    count = inside.numel()
    per_bin = torch.bincount((inside >> 16) - (lo >> 16)).cumsum(0).tolist()
    cpu = torch.device("cpu")
    ranks = {1, 2, count // 3, count - 1, count, count + 1, *per_bin, *(c + 1 for c in per_bin)}
    for rank in sorted(ranks):
        got = slices._kth_in_window(pieces, lo, hi, rank, cpu, slices.Buffers())
        monkeypatch.setenv("DIM3_FUSED", "0")
        eager = slices._kth_in_window(pieces, lo, hi, rank, cpu)
        monkeypatch.delenv("DIM3_FUSED")
        assert got == eager
        if rank > count:
            assert got is None
            continue
        kth = int(inside[rank - 1])
        want = (
            kth,
            int((inside < kth).sum()),
            int((inside == kth).sum()),
            [int((p == kth).sum()) for p in pieces],
        )
        assert got == want, rank
    assert slices._kth_in_window([], lo, hi, 1, cpu) is None


def _in_bfloat16(trio, folder):
    """A copy of ``trio`` stored in bfloat16, as real checkpoints are."""
    from safetensors.torch import load_file, save_file

    roles = {}
    for role in ("base", "multilingual", "multimodal"):
        dst = folder / role
        shutil.copytree(getattr(trio, role), dst)
        for f in dst.glob("*.safetensors"):
            tensors = {k: t.to(torch.bfloat16) for k, t in load_file(f).items()}
            save_file(tensors, f, metadata={"format": "pt"})
        roles[role] = dst
    return type(trio)(**roles)


@pytest.mark.parametrize(
    "method,kernels",
    [
        ("ties", ("apply", "counts")),
        ("dare_ties", ("dare_ties",)),
        ("dim3", ("dim3_apply_into", "dim3_stats_runs")),
        ("task_arithmetic", ("task_arithmetic_into",)),
    ],
)
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_a_merge_runs_the_kernels_and_writes_the_eager_bytes(
    method, kernels, stored, tiny_llava_trio, tmp_path, monkeypatch
):
    """Through the engine, on the grid trio of test_slicing (thresholds tied across tiles),
    stored in float32 or in bfloat16 (the tiles then hand the kernels the rows as stored): the
    folder written with the kernels holds the bytes of the one written without them."""
    from tests.test_slicing import on_a_grid

    monkeypatch.setattr(engine, "TILE_BYTES", 512)
    trio = on_a_grid(tiny_llava_trio, tmp_path / "grid")
    if stored == "bfloat16":
        trio = _in_bfloat16(trio, tmp_path / "bf16")
    recipe = recipe_of(trio, method=method)
    calls: dict[str, int] = {}
    dtypes: set[torch.dtype] = set()
    for name in kernels:
        real = getattr(fused, name)

        def counted(base, *a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            dtypes.add(base.dtype)
            return _real(base, *a, **k)

        monkeypatch.setattr(fused, name, counted)
    with_kernels = engine.merge_to_folder(recipe, tmp_path / "fused").out_dir
    assert all(calls.get(name, 0) > 10 for name in kernels), calls
    assert dtypes == {getattr(torch, stored)}  # bfloat16 rows unconverted
    monkeypatch.setenv("DIM3_FUSED", "0")
    calls.clear()
    eager = engine.merge_to_folder(recipe, tmp_path / "eager").out_dir
    assert calls == {}
    files = sorted(p.name for p in with_kernels.glob("*.safetensors"))
    assert files == sorted(p.name for p in eager.glob("*.safetensors"))
    for name in files:
        assert (with_kernels / name).read_bytes() == (eager / name).read_bytes(), name


def test_dim3_sum_tiles_give_the_sums_of_one_sum_tile_a_tile(
    tiny_llava_trio, tmp_path, monkeypatch
):
    """Through the engine, small tiles (a tile of DiM3's statistics pass holds SUM_TILES sum
    tiles of 2 rows of the 64-column matrices): every step's column sums, merged with the
    compiled sums and with torch summing each sum tile (where the kernel would not take a
    tile), are bit for bit those of the engine without the kernels, whose tiles are one sum
    tile each; so are the folders' bytes."""
    monkeypatch.setattr(engine, "TILE_BYTES", 2048)
    seen: list[int] = []
    sums: list[list[torch.Tensor]] = []
    chain = engine._chain_stats

    def spied(partials):
        seen.extend(len(p) for p in partials if isinstance(p, list | np.ndarray))
        got = chain(partials)
        sums[-1].append(torch.cat([got.base_sq[None], got.tuned_sq, got.dot]))
        return got

    monkeypatch.setattr(engine, "_chain_stats", spied)
    recipe = recipe_of(tiny_llava_trio, method="dim3")
    folders = []
    for name in ("kernels", "torch", "eager"):
        if name == "torch":
            monkeypatch.setattr(fused, "fits_dim3_stats", lambda base, tuned: False)
        if name == "eager":
            monkeypatch.setenv("DIM3_FUSED", "0")
        seen.clear()
        sums.append([])
        folders.append(engine.merge_to_folder(recipe, tmp_path / name).out_dir)
        # tiles of several sum tiles (compiled, then torch's), then one sum tile a tile
        assert (max(seen) == engine.SUM_TILES) if name != "eager" else not seen
    assert len(sums[0]) > 10
    for got in sums[:-1]:
        assert len(got) == len(sums[-1])
        for a, b in zip(got, sums[-1], strict=True):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    files = sorted(p.name for p in folders[-1].glob("*.safetensors"))
    assert files
    for folder in folders[:-1]:
        assert sorted(p.name for p in folder.glob("*.safetensors")) == files
        for name in files:
            assert (folder / name).read_bytes() == (folders[-1] / name).read_bytes(), name


@pytest.mark.parametrize(
    "method,kernel", [("task_arithmetic", "task_arithmetic_into"), ("dim3", "dim3_apply_into")]
)
def test_a_kernel_into_the_output_falls_back_where_a_result_is_nan(
    method, kernel, tiny_llava_trio, tmp_path, monkeypatch
):
    """A bfloat16 trio whose VLM has NaN in one merged matrix, through the engine: the tiles
    write task arithmetic (DiM3's apply pass) straight into the output's bfloat16 rows, and
    where a result is NaN (the kernel declines) convert the eager rule's float32 rows with
    torch; the folder holds the bytes of the one written without the kernels. On one tile
    thread each step is one tile (a call per step), on two the rows are cut in tiles (more
    calls, the same bytes)."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(engine, "TILE_BYTES", 512)
    trio = _in_bfloat16(tiny_llava_trio, tmp_path / "bf16")
    (shard,) = trio.multimodal.glob("*.safetensors")
    tensors = load_file(shard)
    key = next(k for k in sorted(tensors) if "layers.0.mlp.up_proj" in k)
    tensors[key].view(-1)[5::97] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    recipe = recipe_of(trio, method=method)
    monkeypatch.setenv("DIM3_FUSED", "0")
    eager = engine.merge_to_folder(recipe, tmp_path / "eager").out_dir
    monkeypatch.delenv("DIM3_FUSED")
    names = sorted(p.name for p in eager.glob("*.safetensors"))
    real = getattr(fused, kernel)
    calls = {}
    for workers in (1, 2):
        answers: list[bool] = []

        def counted(*a, _answers=answers, **k):
            _answers.append(real(*a, **k))
            return _answers[-1]

        monkeypatch.setattr(fused, kernel, counted)
        monkeypatch.setattr(
            engine, "tile_workers", lambda device, cores=None, light=False, n=workers: n
        )
        out = engine.merge_to_folder(recipe, tmp_path / f"fused{workers}").out_dir
        assert answers.count(False) >= 1 and answers.count(True) > 10, answers
        assert names == sorted(p.name for p in out.glob("*.safetensors"))
        for name in names:
            assert (out / name).read_bytes() == (eager / name).read_bytes(), (workers, name)
        merged = load_file(out / names[0])[key]
        if method == "task_arithmetic":  # the NaN made it through, where they were
            assert torch.equal(merged.isnan(), tensors[key].isnan())
        else:  # a column's NaN spreads over it (its weights and its sums)
            assert merged.isnan().sum() >= tensors[key].isnan().sum() > 0
        calls[workers] = len(answers)
    assert calls[1] < calls[2]


def _dim3_weights(n: int, seed: int) -> torch.Tensor:
    """Two updates' weights as DiM3 gives them (in [0, 1], the calibration value 1.0 and 0.0
    among them), and one value not exact in bfloat16."""
    w = torch.rand(2, n, generator=torch.Generator().manual_seed(seed))
    w[0, ::7], w[1, 3::11], w[0, 5::13] = 1.0, 0.0, 1 / 3
    return w


@pytest.mark.parametrize("kind", ["normal", "grid", "bf16", "specials"])
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("by_row", [False, True])
def test_fused_dim3_apply_equals_the_eager_rule_bit_for_bit(kind, stored, by_row):
    """DiM3's apply kernel against ``dim3.methods.dim3.apply_weights`` on the converted rows,
    per tile (1 MiB tiles of 1536 columns and a ragged last one), weights per column, or per
    row as for a transposed tensor (the engine's embedding); and written straight into the
    output's dtype (``dim3_apply_into``, what the engine's tiles do): into float32 the same
    bits, into bfloat16 those of torch's conversion of them, declined (False) just where a
    value is NaN (torch's NaN bits are its own)."""
    from dim3.methods.dim3 import apply_weights

    base, tuned = _trio(kind, 3 * TILE_ROWS + 17, seed=4)
    dtype = getattr(torch, stored)
    base, tuned = base.to(dtype), [t.to(dtype) for t in tuned]
    w = _dim3_weights(base.shape[0] if by_row else COLS, seed=5)
    assert fused.fits_dim3(base, tuned)
    for a, b in _tiles(base.shape[0]):
        rows = [x[a:b] for x in (base, *tuned)]
        wide = [x.float() for x in rows]
        with fused._one_thread():  # as the engine's tile threads run torch
            if by_row:
                want = apply_weights(wide[0].T, [t.T for t in wide[1:]], w[:, a:b]).T
            else:
                want = apply_weights(wide[0], wide[1:], w)
        weights = w[:, a:b] if by_row else w
        got = fused.dim3_apply(rows[0], rows[1:], weights, by_row, torch.empty(b - a, COLS))
        _same_bits(got, want)
        into = torch.full((b - a, COLS), 7.0)
        assert fused.dim3_apply_into(rows[0], rows[1:], weights, by_row, into)
        _same_bits(into, want)
        into = torch.full((b - a, COLS), 7.0, dtype=torch.bfloat16)
        written = fused.dim3_apply_into(rows[0], rows[1:], weights, by_row, into)
        assert written == (not want.isnan().any())
        if written:
            assert torch.equal(into.view(torch.int16), want.bfloat16().view(torch.int16))


@pytest.mark.parametrize("kind", ["normal", "grid", "bf16", "specials"])
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_fused_dim3_stats_equal_the_eager_sums_bit_for_bit(kind, stored):
    """DiM3's column sums in one pass against ``dim3.methods.dim3.column_stats`` on the
    converted rows: tiles of the engine's statistics pass (1536 columns; 1 MiB tiles, whose
    170 rows take the cascade's level carries, a ragged last one) and single rows up to 1,100
    (every branch of torch's cascade: fewer rows than a level, a level and one, several)."""
    from dim3.methods.dim3 import column_stats

    base, tuned = _trio(kind, 1100, seed=6)
    dtype = getattr(torch, stored)
    base, tuned = base.to(dtype), [t.to(dtype) for t in tuned]
    rows = engine.TILE_BYTES // engine.SUM_TILES // (4 * COLS)
    cuts = [(a, min(a + rows, 1100)) for a in range(0, 1100, rows)]
    cuts += [(0, n) for n in (1, 15, 16, 17, 255, 256, 257, 1100)]
    assert fused.fits_dim3_stats(base, tuned)
    for a, b in cuts:
        part = [x[a:b] for x in (base, *tuned)]
        with fused._one_thread():  # as the engine's tile threads run torch
            want = column_stats(part[0].float(), [t.float() for t in part[1:]])
        scratch = torch.empty(4, 5, COLS)
        got = fused.chain_sums([fused.dim3_stats_runs(part[0], part[1:], b - a, scratch)])
        for field in ("base_sq", "tuned_sq", "dot"):
            _same_bits(getattr(got, field), getattr(want, field))


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
def test_dim3_sums_in_runs_add_up_as_the_sum_tiles_one_after_another(stored):
    """A tile of the statistics pass is SUM_TILES sum tiles (1 MiB each, 170 rows of 1536),
    summed apart in one call (``dim3_stats_runs``), and a step's tiles are added in order
    (``chain_sums``): the very bits of ``column_stats`` of each sum tile, added with
    ``ColumnStats.add`` one after another, as the engine added them when each sum tile was a
    tile of its own. Tiles of whole runs, a ragged last run, a tile of one run."""
    from dim3.methods.dim3 import column_stats

    rows = 2100
    base, tuned = _trio("normal", rows, seed=8)
    dtype = getattr(torch, stored)
    base, tuned = base.to(dtype), [t.to(dtype) for t in tuned]
    run = engine.TILE_BYTES // engine.SUM_TILES // (4 * COLS)
    assert run == 170 and engine.SUM_TILES == 4
    with fused._one_thread():
        want = None
        for a in range(0, rows, run):
            got = column_stats(base[a : a + run].float(), [t[a : a + run].float() for t in tuned])
            want = got if want is None else want.add(got)
    tile = engine.SUM_TILES * run
    for cuts in ([(a, min(rows, a + tile)) for a in range(0, rows, tile)], [(0, run), (run, rows)]):
        scratch = torch.empty(4, 5, COLS)
        parts = [
            fused.dim3_stats_runs(base[a:b], [t[a:b] for t in tuned], run, scratch) for a, b in cuts
        ]
        assert [len(p) for p in parts] == [-(-(b - a) // run) for a, b in cuts]
        got = fused.chain_sums(parts)
        for field in ("base_sq", "tuned_sq", "dot"):
            _same_bits(getattr(got, field), getattr(want, field))


def test_dim3_kernels_take_only_what_they_match():
    """The column sums take widths that are multiples of 64 (torch adds the last columns of a
    row in another order), two updates, rows and columns."""
    base = torch.zeros(4, 96)
    assert not fused.fits_dim3_stats(base, [base, base])
    base = torch.zeros(4, 128)
    assert fused.fits_dim3_stats(base, [base, base])
    assert not fused.fits_dim3_stats(base, [base])
    assert not fused.fits_dim3_stats(base.reshape(-1), [base.reshape(-1)] * 2)
    assert not fused.fits_dim3_stats(base, [base.half(), base])


def test_dim3_apply_matches_torch_with_its_plain_code_too():
    """With torch's vectorized code off (``ATEN_CPU_CAPABILITY=default``: no fused
    multiply-adds in ``addcmul_``, another vector width for ``sum``), the apply kernel that
    rounds twice is the one taken, and both kernels give the eager bits; with torch's x86
    vector code, the one that rounds once."""
    import subprocess
    import sys

    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert fused._columns_kernel().__name__ == "columns2_fma"

    script = (
        "import torch; from dim3 import fused; from tests.test_fused import *\n"
        "k = fused._columns_kernel(); print(torch.backends.cpu.get_cpu_capability(), k.__name__)\n"
        "for kind in ('normal', 'specials'):\n"
        "    for by_row in (False, True):\n"
        "        test_fused_dim3_apply_equals_the_eager_rule_bit_for_bit(kind, 'bfloat16', by_row)\n"
        "    test_fused_dim3_stats_equal_the_eager_sums_bit_for_bit(kind, 'float32')\n"
    )
    from tests.app_server import ROOT

    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "default"}
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["DEFAULT", "columns2"]


@pytest.mark.parametrize("seed", [0, 9, 2**32 + 5, 2**63 - 25])
@pytest.mark.parametrize("drop_rate", [0.0, 0.1, 0.9, 0.99])
def test_dare_draws_are_torch_rand_number_for_number(seed, drop_rate):
    """DARE's compiled keep words come from the very numbers of torch's CPU generator: drawn
    in pieces of every size around the generator's 624-word state (the stream goes on from
    one call to the next), compared with torch.rand's float32 against p."""
    sizes = [1, 623, 624, 625, 5000, 1, 1248, 100_003]
    gen = torch.Generator().manual_seed(seed)
    draws = compiled.DareDraws(seed)
    p = torch.tensor(drop_rate, dtype=torch.float32)
    for size in sizes:
        want = torch.rand(size, generator=gen) >= p
        got = draws.words(drop_rate, torch.empty(size, dtype=torch.int32))
        assert torch.equal(got, -want.to(torch.int32)), size


def test_a_number_equal_to_the_drop_rate_is_kept():
    """torch.rand's number equal to p (as float32) is kept (r ≥ p), as the eager words say."""
    seed = 11
    numbers = torch.rand(1000, generator=torch.Generator().manual_seed(seed))
    p = float(numbers[500])  # a float32 value: p is exactly the 501st number
    got = compiled.DareDraws(seed).words(p, torch.empty(1000, dtype=torch.int32))
    assert got[500] == -1 and torch.equal(got, -(numbers >= numbers[500]).to(torch.int32))


@pytest.mark.parametrize("kind", ["normal", "bf16", "specials"])
@pytest.mark.parametrize("drop_rate,scaling", [(0.9, 1.0), (0.37, 0.3), (0.99, 2.5)])
def test_fused_dare_ties_equals_the_eager_rule_bit_for_bit(kind, drop_rate, scaling, monkeypatch):
    """DARE-TIES over tiles of a real shape inside the engine's reused buffers, some tiles
    straddling two random blocks of 682 rows (each update's keep words then joined in its own
    buffer, both alive at once): the bits of the eager rule (``DIM3_FUSED=0``)."""
    from dim3.methods import dare
    from dim3.methods._utils import reuse_buffers
    from dim3.slices import Buffers

    rows = 1400  # blocks of 682 rows: [0, 682), [682, 1364), [1364, 1400)
    base, tuned = _trio(kind, rows, seed=len(kind) + 1)
    options = dare.DareOptions(drop_rate=drop_rate, scaling=scaling, seed=3)
    cuts = [(0, 170), (170, 600), (600, 800), (800, 1390), (1390, 1400)]

    def merged() -> torch.Tensor:
        with reuse_buffers(Buffers()):
            return torch.cat(
                [
                    dare.merge_ties(base[a:b], [t[a:b] for t in tuned], options, name="w", offset=a)
                    for a, b in cuts
                ]
            )

    got = merged()
    if kind == "bf16":  # the kernel reads bfloat16 as stored
        base, tuned = base.bfloat16(), [t.bfloat16() for t in tuned]
        _same_bits(merged(), got)
    monkeypatch.setenv("DIM3_FUSED", "0")
    _same_bits(got, merged())


@pytest.mark.parametrize("kind", ["normal", "grid", "bf16", "specials"])
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "weights", [{}, {"multimodal_weight": 0.7, "scaling": 1.3}, {"scaling": 0.45}]
)
def test_fused_task_arithmetic_equals_the_eager_rule_bit_for_bit(
    kind, stored, weights, monkeypatch
):
    """Task arithmetic of two updates over tiles of a real shape (one engine tile, a row, a
    whole 1400-row matrix, a vector), as stored (bfloat16 rows unconverted): the bits of the
    eager rule (``DIM3_FUSED=0``) on the same values widened to float32."""
    from dim3.methods import get_method

    method = get_method("task_arithmetic")
    options = method.make_options(weights)
    base, tuned = _trio(kind, 1400, seed=len(kind) + 7)
    dtype = getattr(torch, stored)
    pieces = [(0, TILE_ROWS), (TILE_ROWS, TILE_ROWS + 1), (0, 1400)]
    for a, b in pieces:
        rows = [t[a:b].to(dtype) for t in (base, *tuned)]
        assert fused.fits_sum(rows[0], rows[1:])
        got = method.merge(rows[0], rows[1:], options)
        monkeypatch.setenv("DIM3_FUSED", "0")
        want = method.merge(rows[0].float(), [t.float() for t in rows[1:]], options)
        monkeypatch.delenv("DIM3_FUSED")
        assert got.dtype == torch.float32
        _same_bits(got, want)
    vector = [t[7].to(dtype) for t in (base, *tuned)]  # a norm's weights: one dimension
    got = method.merge(vector[0], vector[1:], options)
    monkeypatch.setenv("DIM3_FUSED", "0")
    _same_bits(got, method.merge(vector[0].float(), [t.float() for t in vector[1:]], options))


def test_task_arithmetic_kernel_takes_only_what_it_matches(monkeypatch):
    """Three updates, a multilingual weight other than 1, a scalar, a strided view or float16
    rows go to the eager rule (same result as with the kernels off); two updates do not."""
    from dim3.methods import get_method

    method = get_method("task_arithmetic")
    base, tuned = _trio("normal", 8, seed=3)
    calls = []
    real = fused.task_arithmetic
    monkeypatch.setattr(fused, "task_arithmetic", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [
        (base, [*tuned, tuned[0] * 2], {}),
        (base, tuned, {"multilingual_weight": 0.5}),
        (base[0, 0], [t[0, 0] for t in tuned], {}),
        (base[:, ::2], [t[:, ::2] for t in tuned], {}),
        (base.half(), [t.half() for t in tuned], {}),
    ]
    for b, ts, opts in cases:
        got = method.merge(b, ts, method.make_options(opts))
        monkeypatch.setenv("DIM3_FUSED", "0")
        want = method.merge(b.float(), [t.float() for t in ts], method.make_options(opts))
        monkeypatch.delenv("DIM3_FUSED")
        _same_bits(got, want)
    assert calls == []
    method.merge(base, tuned, method.make_options({}))
    assert calls == [1]


@pytest.mark.parametrize("kind", ["normal", "grid", "bf16", "specials"])
@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weights", [{}, {"multimodal_weight": 0.7, "scaling": 1.3}])
def test_task_arithmetic_into_writes_what_converting_the_eager_rule_writes(
    kind, stored, out_dtype, weights, monkeypatch
):
    """The rule written straight into an output tensor (what the engine's tiles do for task
    arithmetic, one pass, no float32 buffer) holds the bits of the eager rule's float32 result
    converted by torch (``out.copy_``), on a real tile shape, a whole 1400-row matrix and a
    vector; where a bfloat16 result would be NaN it declines (torch's NaN bits are its own)."""
    from dim3.methods import get_method

    method = get_method("task_arithmetic")
    assert method.into is not None
    options = method.make_options(weights)
    base, tuned = _trio(kind, 1400, seed=len(kind) + 11)
    dtype, out_type = getattr(torch, stored), getattr(torch, out_dtype)
    cases = [[t[a:b].to(dtype) for t in (base, *tuned)] for a, b in ((0, TILE_ROWS), (0, 1400))]
    cases.append([t[9].to(dtype) for t in (base, *tuned)])
    declined = 0
    for rows in cases:
        monkeypatch.setenv("DIM3_FUSED", "0")
        want = method.merge(rows[0].float(), [t.float() for t in rows[1:]], options)
        monkeypatch.delenv("DIM3_FUSED")
        want = torch.empty(want.shape, dtype=out_type).copy_(want)
        out = torch.full(want.shape, 7.0, dtype=out_type)
        if not method.into(rows[0], rows[1:], options, out):
            assert out_type == torch.bfloat16 and want.isnan().any()
            declined += 1
            continue
        if out_type == torch.float32:
            _same_bits(out, want)
        else:
            assert not want.isnan().any()
            assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    # the special values make NaN results: a bfloat16 output declines those cases only
    assert declined == (2 if kind == "specials" and out_dtype == "bfloat16" else 0)


def test_the_bfloat16_kernel_rounds_every_float_as_torch_converts_it():
    """``sum2`` into bfloat16 rounds its float32 results as torch does: on a million random
    bit patterns (every exponent, subnormals, NaN) and on the edges: ties to even both ways,
    the largest floats (rounded to infinity), ±0, ±∞. With both updates equal to the base, the
    result is the base itself (``0 · λ + b``; ±∞ give NaN, -0 gives +0), computed by ``sum2``
    in float32 and converted by torch; the kernel counts the NaN it could not convert."""
    from dim3 import kernels

    g = torch.Generator().manual_seed(5)
    bits = torch.randint(-(2**31), 2**31, (1 << 20,), generator=g, dtype=torch.int64)
    edges = [
        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,
        0x00000001, 0x00008000, 0x00018000, 0x0000FFFF, 0x007FFFFF, 0x00800000, 0x7F800000,
        0x7FC00000, 0x7F800001, 0x00000000,
    ]  # fmt: skip
    edges += [e | 0x80000000 for e in edges]
    bits = torch.cat([bits, torch.tensor(edges, dtype=torch.int64)])
    b = bits.to(torch.int32).view(torch.float32)  # two's complement: the low 32 bits
    f = torch.empty_like(b)
    args = (
        compiled.as_numpy(b),
        compiled.as_numpy(b),
        compiled.as_numpy(b),
        np.float32(0.7),
        np.float32(1.3),
    )
    kernels.sum2(*args, compiled.as_numpy(f))
    got = torch.empty(b.shape, dtype=torch.bfloat16)
    nans = kernels.sum2(*args, compiled.as_numpy(got))
    nan = f.isnan()
    assert nans == int(nan.sum()) > 0
    want = f.to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    # the base itself but for -0, which became +0: the sum was computed, not copied
    moved = f[~nan].view(torch.int32) != b[~nan].view(torch.int32)
    assert moved.any() and (b[~nan].view(torch.int32)[moved] == -(2**31)).all()


def test_task_arithmetic_into_declines_what_it_does_not_match():
    """Three updates, a multilingual weight other than 1, float16 or strided output, float16
    rows, an output of another shape: declined before anything is written (the engine then
    converts the eager rule's result itself); two updates into bfloat16 are written."""
    from dim3.methods import get_method

    method = get_method("task_arithmetic")
    base, tuned = _trio("normal", 8, seed=3)
    plain = method.make_options({})
    sentinel = 3.0
    cases = [
        (base, [*tuned, tuned[0] * 2], plain, torch.full_like(base, sentinel)),
        (base, tuned, method.make_options({"multilingual_weight": 0.5}), base.clone()),
        (base, tuned, plain, torch.full(base.shape, sentinel, dtype=torch.float16)),
        (base, tuned, plain, torch.full((COLS, 8), sentinel).T),
        (base.half(), [t.half() for t in tuned], plain, torch.full_like(base, sentinel)),
        (base, tuned, plain, torch.full((8, COLS - 1), sentinel)),
    ]
    for b, ts, options, out in cases:
        before = out.clone()
        assert not method.into(b, ts, options, out)
        assert torch.equal(out, before)
    out = torch.empty(base.shape, dtype=torch.bfloat16)
    assert method.into(base, tuned, plain, out)
    assert torch.equal(out, method.merge(base, tuned, plain).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.uint8])
def test_kernels_see_a_tensors_own_memory_and_keep_it_alive(dtype):
    # the kernels get tensors as numpy arrays made from their address (compiled.as_numpy): the
    # array must be the tensor's very memory, with a bfloat16 value's bits, and must keep
    # that memory alive once the caller's tensor is gone (a freed tile would be read)
    g = torch.Generator().manual_seed(3)
    whole = (torch.randn(64, 48, generator=g) * 100).to(dtype)
    rows = whole[5:17]  # a view at an offset into its storage
    got = compiled.as_numpy(rows)
    want = rows.view(torch.int16) if dtype == torch.bfloat16 else rows
    assert got.shape == (rows.numel(),)
    assert np.array_equal(got, want.reshape(-1).numpy())
    got[3] = 7  # written through: the kernels write their output this way
    assert want.reshape(-1)[3].item() == 7
    kept = compiled.as_numpy(whole.clone()[10:20])  # the clone is freed once the call returns
    expect = (
        (whole[10:20].view(torch.int16) if dtype == torch.bfloat16 else whole[10:20])
        .reshape(-1)
        .numpy()
        .copy()
    )
    junk = [torch.full((64, 48), 1, dtype=dtype) for _ in range(20)]  # would reuse freed memory
    assert np.array_equal(kept, expect)
    del junk
    # a tensor the address cannot describe takes torch's own way (a copy for a strided one)
    strided = whole.T
    assert np.array_equal(
        compiled.as_numpy(strided),
        (
            strided.contiguous().view(torch.int16)
            if dtype == torch.bfloat16
            else strided.contiguous()
        )
        .reshape(-1)
        .numpy(),
    )


_SETUP_SCRIPT = """
import json, sys, time
from dim3 import compiled, engine
from dim3.demo import DEMO_DIR
from dim3.recipe import Recipe, Source

events = []
roles = [Source(str(DEMO_DIR / r)) for r in ("base", "multilingual", "multimodal")]
started = time.perf_counter()
engine.merge_to_folder(Recipe(*roles, method="dim3", device="cpu"), sys.argv[1], progress=events.append)
print(json.dumps({
    "wall": time.perf_counter() - started,
    "setup": compiled.setup_seconds(),
    "elapsed": [p.elapsed for p in events],
}))
"""


def test_a_merge_leaves_readying_the_kernels_out_of_its_elapsed_time(tmp_path):
    """The first merge of a fresh install compiles the kernels (numba's cache is cold): one-off
    work, which the engine leaves out of the merge's ``Progress.elapsed``, from which the ETA
    and the app's time budget project the whole merge (a projection from the first tensors
    took the compiling for a part of the merge's cost, and the Space refused the demo merge on
    a slow machine). Two processes on a new cache folder: the first compiles, the second loads
    the kernels from the cache, both merging the demo trio with DiM3 on two tile threads. The
    elapsed time never runs backwards (the compiling is counted once while two threads wait
    for numba's lock) and leaves the setup out: the last figure is at most the whole call's
    wall time less the setup."""
    import json
    import os
    import subprocess
    import sys

    from tests.app_server import ROOT

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = []
    for run in ("cold", "warm"):
        done = subprocess.run(
            [sys.executable, "-c", _SETUP_SCRIPT, str(tmp_path / run)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["setup"] > warm["setup"] > 0  # compiled, then loaded from the cache
    assert cold["setup"] > 1.0  # compiling DiM3's kernels: seconds on any machine
    for got in runs:
        elapsed = got["elapsed"]
        assert len(elapsed) > 10
        assert all(b >= a - 1e-6 for a, b in zip(elapsed, elapsed[1:], strict=False)), elapsed
        assert 0 < elapsed[-1] <= got["wall"] - got["setup"] + 1e-3
    # and well short of the whole call: the compiling is most of a cold demo merge
    assert cold["elapsed"][-1] < cold["wall"] - 0.5 * cold["setup"]


def test_the_setup_clock_counts_time_with_any_thread_inside_numbas_lock_once():
    """:class:`dim3.kernels._SetupClock` on a clock of its own: one thread inside numba's
    compiler lock (with a nested acquisition, as a kernel compiling its callees), another
    entering meanwhile (waiting for the lock), and leaving after the first: the seconds are
    those of the union of the stretches, 0 to 7, not their sum (9), which would make a
    merge's elapsed time run backwards; a later stretch adds its own."""
    from concurrent.futures import ThreadPoolExecutor

    from dim3 import kernels

    now = [0.0]
    clock = kernels._SetupClock(clock=lambda: now[0])

    def at(t, call):
        now[0] = t
        call(None)

    with ThreadPoolExecutor(max_workers=1) as other:  # one thread: its depth is its own
        at(0, clock.on_start)
        at(1, clock.on_start)  # nested
        at(2, clock.on_end)
        other.submit(at, 3, clock.on_start).result()
        assert clock.seconds() == 3  # a stretch still going on counts
        at(5, clock.on_end)
        assert clock.seconds() == 5  # the other thread is still inside
        other.submit(at, 7, clock.on_end).result()
        assert clock.seconds() == 7
        now[0] = 9
        assert clock.seconds() == 7  # nobody inside: the clock stands still
        at(10, clock.on_start)
        at(11.5, clock.on_end)
        assert clock.seconds() == 8.5
