"""dim3.models: placement rules, memory checks, loading, freeing and in-memory merging."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from dim3.checkpoints import CheckpointError
from dim3.engine import Recipe, Source, merge_to_folder
from dim3.models import (
    GIB,
    MERGED,
    ORIGINAL,
    ModelManager,
    ModelMemoryError,
    ShowcaseError,
    choose_placement,
    resolve_dtype,
    weight_count,
)

BF16 = torch.bfloat16


def recipe_of(trio, **kw) -> Recipe:
    return Recipe(
        Source(str(trio.base)),
        Source(str(trio.multilingual)),
        Source(str(trio.multimodal)),
        device="cpu",
        **kw,
    )


def test_cpu_placement_is_fp32_and_checks_ram():
    assert resolve_dtype("auto", "cpu") == torch.float32
    p = choose_placement(1_000_000, torch.float32, "cpu", cpu_free=8 * GIB)
    assert p.device_map is None and p.needed >= 4_000_000
    with pytest.raises(
        ModelMemoryError, match=r"needs ~24\.6 GiB of RAM in float32 but only 8\.0 GiB is free"
    ):
        choose_placement(6_000_000_000, torch.float32, "cpu", cpu_free=8 * GIB)


def test_gpu_placement_one_gpu_when_it_fits():
    seven_b = 7_000_000_000  # ~14 GB in bf16
    p = choose_placement(seven_b, BF16, "cuda", gpu_free=[10 * GIB, 40 * GIB])
    assert p.device_map == {"": "cuda:1"}  # the GPU with the most free memory
    assert "cuda:1" in p.describe() and "bfloat16" in p.describe()


def test_gpu_placement_spreads_over_gpus_when_one_is_too_small():
    seven_b = 7_000_000_000
    p = choose_placement(seven_b, BF16, "cuda", gpu_free=[10 * GIB, 10 * GIB])
    assert p.device_map == "auto"
    assert set(p.max_memory) == {0, 1} and all(v < 10 * GIB for v in p.max_memory.values())
    assert "2 GPUs" in p.describe()


def test_gpu_placement_refuses_what_fits_nowhere():
    with pytest.raises(
        ModelMemoryError,
        match=r"needs ~14\.3 GiB of GPU memory in bfloat16 .* 6\.0 GiB \+ 6\.0 GiB free",
    ):
        choose_placement(7_000_000_000, BF16, "cuda", gpu_free=[6 * GIB, 6 * GIB])
    with pytest.raises(ModelMemoryError, match="no GPU"):
        choose_placement(10, BF16, "cuda", gpu_free=[])


def test_weight_count_matches_the_loaded_model(tiny_llava_trio):
    folder = tiny_llava_trio.multimodal
    manager = ModelManager(allowed_roots=[folder.parent])
    loaded = manager.load(ORIGINAL, str(tiny_llava_trio.multimodal), device="cpu")
    assert weight_count(tiny_llava_trio.multimodal) == sum(
        p.numel() for p in loaded.model.parameters()
    )
    assert loaded.placement.dtype == torch.float32 and loaded.model.dtype == torch.float32
    # Labels name the folder relative to its allowed root, never the server's absolute path.
    assert manager.status()[ORIGINAL].startswith(f"{folder.parent.name}/multimodal (CPU")
    assert str(folder) not in manager.status()[ORIGINAL]
    assert manager.status()[MERGED] == "not loaded"


def test_unload_frees_the_model(tiny_llava_trio):
    manager = ModelManager()
    ref = weakref.ref(manager.load(ORIGINAL, str(tiny_llava_trio.multimodal), device="cpu").model)
    assert ref() is not None
    manager.unload(ORIGINAL)
    gc.collect()
    assert ref() is None and manager.get(ORIGINAL) is None


def test_switching_models_frees_the_previous_one(tiny_llava_trio, tiny_llava_new_layout_trio):
    manager = ModelManager()
    first = weakref.ref(manager.load(ORIGINAL, str(tiny_llava_trio.multimodal), device="cpu").model)
    same = manager.load(ORIGINAL, str(tiny_llava_trio.multimodal), device="cpu")
    assert same.model is first()  # the same folder is not loaded twice
    del same
    manager.load(ORIGINAL, str(tiny_llava_new_layout_trio.multimodal), device="cpu")
    gc.collect()
    assert first() is None


def test_local_paths_outside_allowed_roots_are_refused(tiny_llava_trio, tmp_path):
    manager = ModelManager(allowed_roots=[tmp_path])
    with pytest.raises(CheckpointError, match="outside the allowed folders"):
        manager.load(ORIGINAL, str(tiny_llava_trio.multimodal))


def test_default_vlm_loads_on_first_use(tiny_llava_trio):
    manager = ModelManager(default_vlm=str(tiny_llava_trio.multimodal))
    assert manager.get(ORIGINAL) is None
    loaded = manager.ensure_original()
    assert loaded is manager.get(ORIGINAL) and loaded.path == tiny_llava_trio.multimodal.resolve()


def test_merge_in_memory_matches_the_merged_folder(tiny_llava_trio, tmp_path):
    manager = ModelManager()
    recipe = recipe_of(tiny_llava_trio)
    events = []
    merged, result = manager.merge(recipe, progress=events.append)
    assert manager.get(MERGED) is merged and result.plan.summary()["merged"] > 0
    assert events and events[-1].done == events[-1].total == len(result.plan.entries)

    original = manager.get(ORIGINAL)
    assert original is not None and original.model is not merged.model
    before = dict(original.model.named_parameters())
    after = dict(merged.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("language_model" in k or k.startswith("lm_head") for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)

    # The in-memory merge equals the one written to disk and loaded back.
    out = merge_to_folder(recipe, tmp_path / "merged").out_dir
    on_disk = ModelManager().load(MERGED, str(out), device="cpu").model.state_dict()
    for key, value in merged.model.state_dict().items():
        torch.testing.assert_close(value, on_disk[key], msg=key)


def test_failed_merge_keeps_serving_the_models_it_had(tiny_llava_trio, tiny_qwen2vl_trio):
    manager = ModelManager()
    assert manager.merge(recipe_of(tiny_llava_trio))[0] is manager.get(MERGED)
    before = manager.served()
    state = {k: v.clone() for k, v in before.merged.model.state_dict().items()}
    bad = Recipe(
        Source(str(tiny_qwen2vl_trio.base)),
        Source(str(tiny_qwen2vl_trio.multilingual)),
        Source(str(tiny_llava_trio.multimodal)),
        device="cpu",
    )
    with pytest.raises(ValueError):
        manager.merge(bad)
    etc = Recipe(
        Source("/etc"),
        Source(str(tiny_llava_trio.multilingual)),
        Source(str(tiny_llava_trio.multimodal)),
        device="cpu",
    )
    with pytest.raises(CheckpointError):  # the "base /etc"
        manager.merge(etc)
    after = manager.served()
    assert after.merged is before.merged and after.original is before.original
    assert after.info == before.info and after.version == 1
    for key, value in after.merged.model.state_dict().items():
        assert torch.equal(value, state[key]), key  # not half-merged either


def test_aborted_merge_changes_nothing(tiny_llava_trio):
    manager = ModelManager()
    manager.merge(recipe_of(tiny_llava_trio))
    before = manager.served()
    probe = next(before.merged.model.parameters()).clone()

    def abort(progress):
        if progress.done == 3:
            raise KeyboardInterrupt("user cancelled")

    with pytest.raises(KeyboardInterrupt):
        manager.merge(recipe_of(tiny_llava_trio, method="ties"), progress=abort)
    assert manager.served() == before
    assert torch.equal(next(manager.get(MERGED).model.parameters()), probe)


def test_a_merge_swaps_in_only_when_complete_and_says_which_recipe(tiny_llava_trio):
    manager = ModelManager()
    first, _ = manager.merge(recipe_of(tiny_llava_trio))
    seen_during = []

    def watch(progress):
        seen_during.append(manager.get(MERGED) is first)

    second, _ = manager.merge(recipe_of(tiny_llava_trio, method="linear"), progress=watch)
    assert seen_during and all(seen_during)  # the old merge served while the new one was built
    served = manager.served()
    assert served.merged is second and second is not first
    assert served.version == 2 and served.info.recipe.method == "linear"
    assert served.info.label.startswith("linear merge of") and "UTC" in served.info.when()


def test_merge_refused_politely_when_memory_does_not_allow_a_staging_copy(
    tiny_llava_trio, monkeypatch
):
    manager = ModelManager()
    manager.merge(recipe_of(tiny_llava_trio))
    before = manager.served()
    monkeypatch.setattr("dim3.models.free_memory", lambda: ([], 100 * 1024**2))  # below the reserve
    with pytest.raises(ModelMemoryError, match="current models keep serving.*Try again later"):
        manager.merge(recipe_of(tiny_llava_trio, method="linear"))
    assert manager.served() == before
    assert "staging copy" in manager.memory_note()


def test_a_showcase_cannot_be_changed(tiny_llava_trio, tmp_path):
    recipe = recipe_of(tiny_llava_trio, method="task_arithmetic")
    path = tmp_path / "showcase.json"
    path.write_text(json.dumps(recipe.to_dict()))
    manager = ModelManager()
    info = manager.start_showcase(path)
    assert manager.frozen and info.recipe == recipe and manager.get(MERGED) is not None
    served = manager.served()
    for change in (
        lambda: manager.merge(recipe),
        lambda: manager.unload(MERGED),
        lambda: manager.clear(),
        lambda: manager.load(ORIGINAL, str(tiny_llava_trio.multimodal)),
    ):
        with pytest.raises(ShowcaseError, match="showcase"):
            change()
    assert manager.served() == served


def test_a_showcase_serves_a_saved_merged_folder(tiny_llava_trio, tmp_path):
    recipe = recipe_of(tiny_llava_trio)
    out = merge_to_folder(recipe, tmp_path / "saved").out_dir
    manager = ModelManager()
    info = manager.start_showcase(out)
    assert info.recipe == recipe and manager.get(MERGED).path == out
    assert manager.get(ORIGINAL).path == tiny_llava_trio.multimodal.resolve()


def test_unknown_slot_is_refused():
    with pytest.raises(ValueError, match="valid: original, merged"):
        ModelManager().get("third")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_load_is_bf16_and_merges_and_chats_on_the_gpu(tiny_llava_trio):
    from dim3.chat import GenerationParams, stream_reply

    manager = ModelManager()
    recipe = Recipe(
        Source(str(tiny_llava_trio.base)),
        Source(str(tiny_llava_trio.multilingual)),
        Source(str(tiny_llava_trio.multimodal)),
        device="auto",
    )
    merged, _ = manager.merge(recipe)
    for loaded in (manager.get(ORIGINAL), merged):
        assert loaded.placement.device == "cuda"
        assert next(loaded.model.parameters()).device.type == "cuda"
        assert loaded.model.dtype == resolve_dtype("auto", "cuda")
    question = [{"role": "user", "content": "What colour is the shape?"}]
    reply = stream_reply(
        merged.model, merged.processor, question, None, GenerationParams(max_new_tokens=4)
    )
    list(reply)
    assert reply.new_tokens >= 1
    manager.clear()
