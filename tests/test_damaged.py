"""Damaged downloads and leftovers: one line naming the file and the cause, exit 2, nothing written.

Each case damages a copy of a tiny real trio the way real downloads go wrong (a shard cut short, a
corrupt or lying header, an index naming a missing shard, a shard from another conversion) and runs
the real CLI in-process. Leftover temporary folders of killed merges are made the way the writer
names them and must be removed by the next merge to that destination, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dim3 import engine
from dim3.checkpoints import Checkpoint, CheckpointError
from dim3.cli import main
from dim3.recipe import Recipe, Source
from dim3.writer import remove_stale_in_folder, remove_stale_temporaries

pytestmark = pytest.mark.slow
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def sharded_copy(src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """``src`` (a single-file checkpoint) as two bf16 shards with an index, like a Hub download."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    keys = sorted(tensors)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    for name, part in zip(SHARDS, halves, strict=True):
        save_file({k: tensors[k].to(dtype) for k in part}, dst / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in zip(SHARDS, halves, strict=True) for k in part}
    total = sum(t.numel() * dtype.itemsize for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((dst / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture
def trio(tiny_llava_trio, tmp_path) -> dict[str, Path]:
    """A copy of the tiny LLaVA trio whose base is sharded in bf16; outputs go to ``out``."""
    return {
        "base": sharded_copy(tiny_llava_trio.base, tmp_path / "in" / "base"),
        "multilingual": tiny_llava_trio.multilingual,
        "multimodal": tiny_llava_trio.multimodal,
        "out": tmp_path / "dest" / "merged",
    }


def run_cli(trio: dict[str, Path], capsys) -> tuple[int, str]:
    args = [f"--{r}={trio[r]}" for r in ("base", "multilingual", "multimodal")]
    code = main(["merge", *args, "--out", str(trio["out"])])
    err = capsys.readouterr().err
    return code, err


def assert_refused(trio, capsys, *needles: str) -> str:
    """The merge exits 2 with one stderr line holding ``needles``; nothing is written."""
    code, err = run_cli(trio, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    dest = trio["out"].parent
    assert not dest.exists() or list(dest.iterdir()) == []
    return lines[0]


def shard(trio, i: int) -> Path:
    return trio["base"] / SHARDS[i]


def test_truncated_shard(trio, capsys):
    path = shard(trio, 1)
    os.truncate(path, path.stat().st_size - 1000)
    assert_refused(trio, capsys, str(path), "truncated", "interrupted", "re-download")


def test_shard_cut_inside_its_header(trio, capsys):
    path = shard(trio, 0)
    os.truncate(path, 20)
    assert_refused(trio, capsys, str(path), "truncated", "re-download")


def test_corrupt_shard_start(trio, capsys):
    path = shard(trio, 0)
    data = bytearray(path.read_bytes())
    data[:8] = b"\x89PNG\r\n\x1a\n"  # something else was saved under the shard's name
    path.write_bytes(bytes(data))
    assert_refused(trio, capsys, str(path), "does not start with a safetensors header")


def test_corrupt_header_json(trio, capsys):
    path = shard(trio, 1)
    data = bytearray(path.read_bytes())
    data[8:12] = b"\x00\xff{["
    path.write_bytes(bytes(data))
    assert_refused(trio, capsys, str(path), "corrupt header", "re-download")


def test_header_nested_deeper_than_the_parser_goes(trio, capsys):
    """A header of 100,000 nested lists (what no writer makes): a corrupt header, not a
    RecursionError."""
    path = shard(trio, 1)
    header = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert_refused(trio, capsys, str(path), "corrupt header", "re-download")


def test_header_that_lies_about_a_tensor_size(trio, capsys):
    """Same file size, but one tensor's shape claims more bytes than its offsets span."""
    path = shard(trio, 0)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[key]["shape"][0] += 1
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n :])
    line = assert_refused(trio, capsys, str(path), key, "offsets span", "re-download")
    assert "corrupt header" in line


def test_shard_longer_than_its_header(trio, capsys):
    path = shard(trio, 1)
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)
    assert_refused(trio, capsys, str(path), "4096 bytes longer than its header")


def test_index_naming_a_missing_shard(trio, capsys):
    shard(trio, 1).unlink()
    assert_refused(trio, capsys, str(shard(trio, 1)), "is missing", "model.safetensors.index.json")


WHERE = {
    "../elsewhere.safetensors": "leads out of the checkpoint's folder",
    "/abs/elsewhere.safetensors": "not a relative file name",
    ".hidden/elsewhere.safetensors": "not a file of the index's own folder",
}


@pytest.mark.parametrize("where", sorted(WHERE))
def test_index_naming_a_shard_outside_its_folder(trio, capsys, where):
    """Even where that file exists (the command line allows any folder): an index names the
    shards beside it, so a checkpoint's files are its own folder's."""
    index_path = trio["base"] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(k for k, v in index["weight_map"].items() if v == SHARDS[1])
    target = trio["base"].parent / "elsewhere.safetensors"
    target.write_bytes(shard(trio, 1).read_bytes())
    (trio["base"] / ".hidden").mkdir()
    (trio["base"] / ".hidden" / "elsewhere.safetensors").symlink_to(target)  # no check enters
    index["weight_map"][key] = str(target) if where.startswith("/") else where
    index_path.write_text(json.dumps(index))
    line = assert_refused(trio, capsys, repr(key), "an index names shards beside it")
    assert WHERE[where] in line


def test_index_naming_a_tensor_its_shard_lacks(trio, capsys):
    index_path = trio["base"] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(k for k, v in index["weight_map"].items() if v == SHARDS[1])
    index["weight_map"][key] = SHARDS[0]
    index_path.write_text(json.dumps(index))
    assert_refused(trio, capsys, str(shard(trio, 0)), repr(key), "different versions")


def test_shard_of_another_dtype(trio, capsys):
    """Shard 2 replaced by a float32 conversion of itself: same names and shapes, other dtype."""
    path = shard(trio, 1)
    tensors = load_file(path)
    save_file({k: v.float() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    assert_refused(trio, capsys, str(path), "holds F32 tensors", "hold BF16", "re-download")


def test_mixed_dtypes_that_the_index_announces_are_accepted(trio):
    """Llama-2-7b-hf keeps float32 buffers in a float16 checkpoint: mixed dtypes alone are fine."""
    index_path = trio["base"] / "model.safetensors.index.json"
    path = shard(trio, 1)
    tensors = load_file(path)
    save_file({k: v.float() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] = sum(
        t.numel() * t.element_size() for p in (shard(trio, 0), path) for t in load_file(p).values()
    )
    index_path.write_text(json.dumps(index))
    with Checkpoint(trio["base"]) as ckpt:
        assert {ckpt.dtype(k) for k in ckpt.keys()} == {torch.bfloat16, torch.float32}


def test_damage_after_opening_is_translated_at_read_time(trio):
    """A shard replaced after the checkpoint was opened: the read names the file and the cause."""
    with Checkpoint(trio["base"]) as ckpt:
        key = next(k for k in ckpt.keys() if ckpt.file_of(k) == shard(trio, 1))
        path = shard(trio, 1)
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data[: len(data) // 2])  # a new, shorter file under the same name
        with pytest.raises(CheckpointError, match="re-download") as info:
            ckpt.get(key)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- leftovers of killed merges


def dead_pid() -> int:
    """A pid no process has (pid_max is at most 2**22 on Linux)."""
    return 2**22 + 12345


def make_dir(path: Path, payload: str = "partial") -> Path:
    path.mkdir(parents=True)
    (path / "model-00001-of-00002.safetensors").write_text(payload)
    return path


def test_stale_temporaries_are_removed_by_the_next_merge_and_nothing_else(
    tiny_llava_trio, tmp_path
):
    dest = tmp_path / "dest"
    out = dest / "merged"
    stale = [
        make_dir(dest / f".merged.dim3-tmp-{dead_pid()}-abcd_123"),  # killed merge
        make_dir(dest / ".merged.dim3-tmp-k2j4h5g6"),  # from before pids were recorded
    ]
    elsewhere = tmp_path / "elsewhere"
    make_dir(elsewhere)
    kept = [
        make_dir(dest / f".merged.dim3-tmp-{os.getpid()}-zzzzzzzz"),  # a live merge's folder
        make_dir(dest / ".other.dim3-tmp-k2j4h5g6"),  # another destination's
        make_dir(dest / "merged.dim3-tmp-k2j4h5g6"),  # not ours: no leading dot
        make_dir(dest / ".merged.dim3-tmp-my-own-notes"),  # not our pattern
        make_dir(dest / f".merged.dim3-old-{dead_pid()}-0123abcd"),  # no output yet: keep
    ]
    link = dest / ".merged.dim3-tmp-qqqqqqqq"
    link.symlink_to(elsewhere, target_is_directory=True)
    file = dest / ".merged.dim3-tmp-ffffffff"
    file.write_text("a file, not our folder")
    t = tiny_llava_trio
    recipe = Recipe(Source(str(t.base)), Source(str(t.multilingual)), Source(str(t.multimodal)))

    engine.merge_to_folder(recipe, out)

    assert (out / "model.safetensors").is_file()
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in kept) and link.is_symlink() and file.is_file()
    assert (elsewhere / "model-00001-of-00002.safetensors").read_text() == "partial"
    # now that the output exists again, a replaced output's leftover goes too
    assert remove_stale_temporaries(out) == [kept[-1].resolve()]


def test_app_output_folder_cleanup(tmp_path):
    folder = tmp_path / "outputs"
    gone = [
        make_dir(folder / f".a.dim3-tmp-{dead_pid()}-aaaaaaaa"),
        make_dir(folder / f".b b.dim3-tmp-{dead_pid()}-bbbbbbbb"),
    ]
    (folder / "a").mkdir()
    kept = [
        make_dir(folder / f".c.dim3-old-{dead_pid()}-cccccccc"),  # c does not exist: keep
        make_dir(folder / f".d.dim3-tmp-{os.getpid()}-dddddddd"),
        make_dir(folder / ".e.dim3-tmpfoo"),
        make_dir(folder / "f"),
    ]
    removed = remove_stale_in_folder(folder)
    assert sorted(removed) == sorted(p.resolve() for p in gone)
    assert all(p.is_dir() for p in kept) and (folder / "a").is_dir()
    assert remove_stale_in_folder(tmp_path / "absent") == []
