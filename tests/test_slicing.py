"""Merging in row slices under a memory budget gives what merging whole tensors gives."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from dim3 import engine
from dim3.methods import METHODS
from dim3.methods._utils import first_by_magnitude
from dim3.slices import ExactSelect, FirstMask, key_value, magnitude_bits, order_keys, row_slices
from tests.test_engine import load_all, recipe_of

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
        got = torch.cat([first(magnitude_bits(x[a:b])) for a, b in cuts])
        assert torch.equal(got, first_by_magnitude(mag, k)), k


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


def test_sliced_merge_into_a_loaded_model_equals_the_folder(tiny_llava_trio, tmp_path):
    recipe = recipe_of(tiny_llava_trio)
    engine.merge_to_folder(recipe, tmp_path / "out", chunk_size="1GiB")
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava_trio.multimodal)
    engine.merge_into_model(model, recipe, chunk_size=4096)
    want = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, want[key], rtol=1e-5, atol=1e-6, msg=key)
