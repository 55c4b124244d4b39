"""What a dataset may make the benchmark reader hold, on crafted files in the Hub sets' schema.

Each file is a real parquet file (pyarrow), ``datasets`` Arrow or WebDataset folder, read by the
real reader (``dim3.benchmarks.sources.load_items``). Large values are written as views of one
buffer (or through a dictionary), so the files are a few KB and the test holds little; what the
reader holds is measured: Arrow's allocations (a proxy of its memory pool, made the default while
the reader runs) plus Python's (tracemalloc).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import random
import re
import struct
import tarfile
import tempfile
import time
import tracemalloc
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dim3.benchmarks import BENCHMARKS
from dim3.benchmarks.sources import (
    CHECK_ROWS,
    MAX_PICTURE_BYTES,
    MAX_ROW_GROUP_BYTES,
    MAX_TEXT_FILE_BYTES,
    MAX_WHOLE_JSON_BYTES,
    MIB,
    item_bytes,
    load_items,
    max_line_bytes,
    reservoir,
)
from dim3.limits import BudgetExceeded, JobBudget
from tests.benchmark_data import BUILDERS, picture

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_POOLS: list[pa.MemoryPool] = []  # every proxy pool lives as long as the process (Arrow's rule)


@contextmanager
def measured():
    """``{"arrow", "python", "peak"}``: the most bytes Arrow and Python held during the block."""
    previous = pa.default_memory_pool()
    _POOLS.append(pa.proxy_memory_pool(previous))
    pa.set_memory_pool(_POOLS[-1])
    tracemalloc.start()
    result: dict[str, int] = {}
    try:
        yield result
    finally:
        result["python"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        pa.set_memory_pool(previous)
        result["arrow"] = _POOLS[-1].max_memory()
        result["peak"] = result["arrow"] + result["python"]


def repeated(value: bytes, n: int) -> pa.Array:
    """``n`` rows of ``value`` as binary views of one buffer: ``len(value)`` bytes held, however
    many rows (written to parquet as ordinary binary values)."""
    views = np.zeros((n, 4), dtype=np.int32)
    views[:, 0] = len(value)
    views[:, 1] = np.frombuffer(value[:4].ljust(4, b"\0"), dtype=np.int32)[0]
    return pa.Array.from_buffers(
        pa.binary_view(), n, [None, pa.py_buffer(views.tobytes()), pa.py_buffer(value)]
    )


def padded(extra: int) -> bytes:
    """A valid 64x64 PNG followed by ``extra`` zero bytes (Pillow reads it; it is that big)."""
    return picture("red") + b"\0" * extra


def images(values: pa.Array) -> pa.StructArray:
    return pa.StructArray.from_arrays(
        [values, pa.nulls(len(values), pa.string())], ["bytes", "path"]
    )


def write(folder: Path, table: pa.Table, split: str = "de", **options) -> Path:
    """``folder/data/<split>-00000-of-00001.parquet``, zstd, read back as plain Arrow types."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    path = folder / "data" / f"{split}-00000-of-00001.parquet"
    options = {"compression": "zstd", "compression_level": 1, "store_schema": False} | options
    pq.write_table(table, path, **options)
    return path


def xgqa_table(n: int, image: pa.Array | None = None, **extra: pa.Array) -> pa.Table:
    """``n`` rows in the xGQA schema (neulab/PangeaBench-xgqa: image, question, answer)."""
    pictures = image if image is not None else images(pa.array([picture("red")] * n))
    columns = {"image": pictures, "question": ["What colour is it?"] * n, "answer": ["red"] * n}
    return pa.table(columns | extra)


def m3exam_table(folder: Path) -> pa.Table:
    """Two English rows of the M3Exam copy in its real schema (``tests.benchmark_data``)."""
    return pq.read_table(next(BUILDERS["m3exam"](folder, ("english",), 2).rglob("*.parquet")))


def same(items, others) -> bool:
    """The same questions, prompts, answers and (encoded) pictures, in the same order."""

    def key(it):
        return it.id, it.language, it.question, it.answers, it.options, repr(it.image)

    return [key(it) for it in items] == [key(it) for it in others]


# --- the reader reads what a whole read would, and nothing more ------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_bounded_reader_gives_the_items_of_a_whole_read(tmp_path, name):
    """The local copies in each set's real schema (``datasets`` writer, dictionary pages), also
    rewritten in row groups of 7: the sample is the one a whole read of every column gives."""
    bench = BENCHMARKS[name]
    folder = BUILDERS[name](tmp_path / name, n=30)
    for file in sorted((folder / "data").glob("*.parquet")):
        lang = file.name.split("-")[0]
        rows = pq.read_table(file).to_pylist()
        whole = [bench.to_item(row, lang, i) for i, row in enumerate(rows)]
        whole = [it for it in whole if it is not None]
        for limit, seed in ((4, 0), (9, 5), (100, 1)):
            expected = reservoir(whole, limit, random.Random(f"{seed}:{lang}"))
            assert same(load_items(name, str(folder), [lang], limit, seed), expected)
        write(tmp_path / "groups", pq.read_table(file), lang, row_group_size=7)
        assert same(load_items(name, str(tmp_path / "groups"), [lang], None), whole)


def test_columns_the_benchmark_does_not_read_are_left_unread(tmp_path):
    """A 64 MiB unused column (4 cells of 16 MiB, a few KB compressed) is not read: the reader
    holds a few MB, where reading every column took the column twice (Arrow and Python)."""
    junk = repeated(b"A" * (16 * MIB), 4)
    write(tmp_path / "junk", xgqa_table(4, junk=junk))
    write(tmp_path / "plain", xgqa_table(4))
    with measured() as held:
        items = load_items("xgqa", str(tmp_path / "junk"), ["de"], limit=4)
    assert held["peak"] < 8 * MIB, held
    assert same(items, load_items("xgqa", str(tmp_path / "plain"), ["de"], limit=4))


def test_a_row_group_past_the_limit_is_refused_from_its_metadata(tmp_path):
    """26 pictures of 20 MiB in one row group (520 MiB uncompressed, 17 KB on disk): refused
    before any of it is read, naming the file (not its folder), the row group, size and limit."""
    big = repeated(padded(20 * MIB - 200), 26)
    write(tmp_path, xgqa_table(26, images(big)), use_dictionary=False)
    with measured() as held, pytest.raises(ValueError) as error:
        load_items("xgqa", str(tmp_path), ["de"], limit=2)
    message = str(error.value)
    assert message.startswith("de-00000-of-00001.parquet: row group 0 (26 rows) takes 520.0 MiB")
    assert f"more than the {MAX_ROW_GROUP_BYTES // MIB}.0 MiB read at once" in message
    assert "columns read (question, answer, image)" in message and str(tmp_path) not in message
    assert held["peak"] < 4 * MIB, held


# --- cells: pictures and texts ------------------------------------------------------------------


def test_a_picture_past_the_limit_is_refused_before_it_is_converted(tmp_path):
    """A picture of 17 MiB (a PNG padded with zeros) is refused naming the field and row, in
    both forms the sets store (bytes, M3Exam's base64 text); one of 15 MiB, far larger than
    the sets' photos, is read."""
    rows = [picture("red"), padded(15 * MIB), padded(17 * MIB)]
    write(tmp_path / "xgqa", xgqa_table(3, images(pa.array(rows))), row_group_size=1)
    with measured() as held, pytest.raises(ValueError) as error:
        load_items("xgqa", str(tmp_path / "xgqa"), ["de"], limit=3)
    assert str(error.value) == (
        "de-00000-of-00001.parquet: the picture in field 'image' of row 2 is 17.0 MiB encoded, "
        f"more than the {MAX_PICTURE_BYTES // MIB}.0 MiB a picture may have; give a dataset "
        "with smaller pictures"
    )
    assert held["python"] < 20 * MIB, held  # the 15 MiB one, not the 17 MiB one
    assert len(load_items("xgqa", str(tmp_path / "xgqa"), ["de"], limit=2, scan=2)) == 2

    exam = m3exam_table(tmp_path / "m3")
    text = base64.b64encode(padded(17 * MIB)).decode()
    exam = exam.set_column(exam.schema.get_field_index("image_0"), "image_0", pa.array([text] * 2))
    write(tmp_path / "exam", exam, "english")
    with pytest.raises(ValueError, match=r"picture in field 'image_0' of row 0 is 17.0 MiB"):
        load_items("m3exam", str(tmp_path / "exam"), ["english"], limit=2)


def test_a_value_repeated_through_the_files_dictionary_is_held_once(tmp_path):
    """A row group's metadata counts a dictionary value once, whatever the rows that use it: 64
    rows of one 8 MiB picture (3 KB on disk) are read as a dictionary, each row converted alone
    (a whole read held 64 copies twice, 1 GiB); a MaXM answer list of 200,000 references to a
    1 KiB text (200 MB once expanded) is refused from its computed size, never expanded."""
    write(
        tmp_path / "xgqa",
        xgqa_table(64, images(pa.array([padded(8 * MIB)] * 64))),
        dictionary_pagesize_limit=64 * MIB,
    )
    with measured() as held:
        items = load_items("xgqa", str(tmp_path / "xgqa"), ["de"], limit=2)
    assert len(items) == 2 and len(items[0].image["bytes"]) == 8 * MIB + len(picture("red"))
    assert held["peak"] < 64 * MIB, held

    refs = pa.DictionaryArray.from_arrays(pa.array(np.zeros(200_000, np.int32)), ["x" * 1024])
    answers = pa.ListArray.from_arrays(pa.array([0, 200_000], pa.int32()), refs)
    maxm = pa.table(
        {"image": images(pa.array([picture("red")])), "question": ["?"], "answers": answers}
    )
    write(tmp_path / "maxm", maxm, "fr")
    with measured() as held, pytest.raises(ValueError) as error:
        load_items("maxm", str(tmp_path / "maxm"), ["fr"], limit=2)
    assert str(error.value).startswith(
        "fr-00000-of-00001.parquet: field 'answers' of row 0 holds 204,800,000 bytes, more than "
        "the 65,536 a text of a MaXM question may have"
    )
    assert held["peak"] < 16 * MIB, held


def test_a_text_cell_past_the_limit_is_refused(tmp_path):
    """A question of 100,000 characters is refused as a cell, before any item is made of it."""
    table = xgqa_table(2).set_column(1, "question", pa.array(["Which colour?", "q" * 100_000]))
    write(tmp_path, table)
    with pytest.raises(ValueError, match=r"field 'question' of row 1 holds 100,000 bytes"):
        load_items("xgqa", str(tmp_path), ["de"], limit=2)


# --- what a sample keeps ------------------------------------------------------------------------


def test_a_sample_past_its_budget_is_refused_while_it_is_drawn(tmp_path):
    """40 distinct pictures of 1 MiB: a sample of 30 with an 8 MiB budget is refused once its
    kept items pass it (holding about that, not 30 MiB), saying what to do; the budget draws
    nothing: under it, the sample is the one drawn without it."""
    pictures = [padded(MIB) + bytes([i]) for i in range(40)]
    write(tmp_path, xgqa_table(40, images(pa.array(pictures))), row_group_size=5)
    with measured() as held, pytest.raises(ValueError) as error:
        load_items("xgqa", str(tmp_path), ["de"], limit=30, max_bytes=8 * MIB)
    assert str(error.value).startswith(
        "the sample's 8 questions so far (up to 30 per language) hold 8.0 MiB of pictures and "
        "text, more than the 8.0 MiB a sample may hold; ask for fewer questions per language"
    )
    assert held["python"] < 16 * MIB, held
    free = load_items("xgqa", str(tmp_path), ["de"], limit=30, max_bytes=None)
    assert same(load_items("xgqa", str(tmp_path), ["de"], limit=30, max_bytes=64 * MIB), free)
    assert sum(item_bytes(it) for it in free) > 30 * MIB


def test_draw_pools_are_kept_by_bytes(tmp_path):
    """ "Draw a question" keeps pools together under its byte limit, least recently used out; a
    pool larger than that is served but not kept; one past POOL_BYTES is refused."""
    from dim3.ui.draw import POOL_BYTES, Pools

    sets = {}
    for name, size in (("a", 200_000), ("b", 0), ("c", 200_000), ("large", 700_000)):
        cells = [padded(size) + bytes([i % 256]) for i in range(64)]
        sets[name] = str(tmp_path / name)
        write(tmp_path / name, xgqa_table(64, images(pa.array(cells))))
    pools = Pools(cache_bytes=20 * MIB)
    first = {name: pools.get("xgqa", sets[name], "de") for name in ("a", "b")}
    assert 12 * MIB < pools.held < 13 * MIB  # 64 pictures of 0.2 MB, and 64 small ones
    first["c"] = pools.get("xgqa", sets["c"], "de")  # with a and b past 20 MiB: a goes
    assert 12 * MIB < pools.held < 13 * MIB
    assert all(pools.get("xgqa", sets[k], "de") is first[k] for k in "bc")
    large = pools.get("xgqa", sets["large"], "de")  # 43 MiB: served, not kept, nothing goes
    assert len(large) == 64 and pools.get("xgqa", sets["large"], "de") is not large
    assert all(pools.get("xgqa", sets[k], "de") is first[k] for k in "bc")
    assert pools.get("xgqa", sets["a"], "de") is not first["a"]

    huge = padded(POOL_BYTES // 60)  # 64 rows of one picture (a dictionary): over POOL_BYTES
    write(
        tmp_path / "huge",
        xgqa_table(64, images(pa.array([huge] * 64))),
        dictionary_pagesize_limit=64 * MIB,
    )
    with pytest.raises(ValueError, match=r"more than the 256.0 MiB a sample may hold"):
        Pools().get("xgqa", str(tmp_path / "huge"), "de")


# --- formats read through `datasets`: only the fields read, nothing decoded ----------------------


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (Pillow refuses to open one past twice its
    bomb limit; decoding it would fail)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    head = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 + 3 * width))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_webdataset_column_the_benchmark_does_not_read_is_not_decoded(tmp_path):
    """The attack's layout: WebDataset samples whose ``png`` entry (typed Image by `datasets`)
    claims 30,000 x 30,000 pixels. The column is left out before any row is read, so nothing
    decodes it (decoding it raised Pillow's DecompressionBombError) nor holds it."""
    (tmp_path / "data").mkdir()
    bomb = header_only_png(30_000, 30_000) + b"\0" * 100_000  # and past a text's 64 KiB
    with tarfile.open(tmp_path / "data" / "de-00000-of-00001.tar", "w") as tar:
        for i in range(3):
            entries = (("png", bomb), ("image", picture("red")), ("question", b"Which colour?"))
            for ext, data in (*entries, ("answer", b"red")):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    items = load_items("xgqa", str(tmp_path), ["de"], limit=3)
    assert len(items) == 3 and all(item.image == picture("red") for item in items)


def test_a_webdataset_member_past_what_a_sample_may_hold_is_refused_from_its_header(tmp_path):
    """`datasets` reads every member of a WebDataset sample whole, the unread ones too: a 30 MiB
    member (past the 22.9 MiB an xGQA sample may take) is refused from the tar's headers,
    before `datasets` opens the file, holding next to nothing (300 MiB took a process from 15 to
    751 MiB before); a tar whose members are within bounds still reads."""
    (tmp_path / "data").mkdir()
    tar_path = tmp_path / "data" / "de-00000-of-00001.tar"

    def write(extra: bytes) -> None:
        with tarfile.open(tar_path, "w") as tar:
            for i in range(2):
                entries = (("image", picture("red")), ("question", b"Which colour?"))
                for ext, data in (*entries, ("answer", b"red"), ("bin", extra)):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    write(b"\0" * (30 * 2**20))
    with measured() as held, pytest.raises(ValueError) as error:
        load_items("xgqa", str(tmp_path), ["de"], limit=2)
    assert "member '00000.bin' is 30.0 MiB, more than the 22.9 MiB one xGQA sample" in str(
        error.value
    )
    assert held["peak"] < 4 * 2**20, held
    write(b"\0" * 1000)
    assert len(load_items("xgqa", str(tmp_path), ["de"], limit=2)) == 2


def write_arrow(folder: Path, table: pa.Table, split: str, **options) -> None:
    """A `datasets` Arrow folder: ``folder/data/<split>-00000-of-00001.arrow`` (a stream;
    ``options``: pyarrow's IPC write options, e.g. ``compression``)."""
    (folder / "data").mkdir(parents=True)
    with pa.OSFile(str(folder / "data" / f"{split}-00000-of-00001.arrow"), "wb") as f:
        ipc = pa.ipc.IpcWriteOptions(**options)
        with pa.ipc.new_stream(f, table.schema, options=ipc) as writer:
            writer.write_table(table)


def arrow_file(folder: Path, table: pa.Table, split: str = "de", **options) -> Path:
    """``folder/data/<split>-00000-of-00001.arrow`` in the IPC file format (not a stream)."""
    (folder / "data").mkdir(parents=True)
    path = folder / "data" / f"{split}-00000-of-00001.arrow"
    with pa.ipc.new_file(str(path), table.schema, options=pa.ipc.IpcWriteOptions(**options)) as w:
        w.write_table(table)
    return path


def test_arrow_files_are_read_a_bounded_batch_at_a_time(tmp_path):
    """`datasets` reads an Arrow file a record batch at a time, each whole, every column, and
    converts it. Before any batch is read, from the messages' metadata and the schema: a batch
    past the limit, a compressed one (a 0.1 MB file that is 520 MiB to read), and a type whose
    values are not bounded by their bytes (a dictionary, a view, run-end encoding) are refused,
    naming the file; an Arrow stream or file of plain types in the schema is read as before."""
    plain = xgqa_table(3)
    write_arrow(tmp_path / "stream", plain, "de")
    arrow_file(tmp_path / "file", plain)
    for kind in ("stream", "file"):
        items = load_items("xgqa", str(tmp_path / kind), ["de"], limit=3)
        assert [item.question.split("?")[0] for item in items] == ["What colour is it"] * 3, kind

    rows, size = 26, 20 * MIB  # one batch of 520 MiB: its pages never touched (zeros)
    offsets = pa.py_buffer((np.arange(rows + 1, dtype=np.int32) * size).tobytes())
    zeros = pa.Array.from_buffers(
        pa.binary(), rows, [None, offsets, pa.allocate_buffer(rows * size)]
    )
    big = xgqa_table(rows, images(zeros))
    path = tmp_path / "big" / "data" / "de-00000-of-00001.arrow"
    write_arrow(tmp_path / "big", big, "de")
    try:
        with measured() as held, pytest.raises(ValueError) as error:
            load_items("xgqa", str(tmp_path / "big"), ["de"], limit=2)
        message = str(error.value)
        assert message.startswith("de-00000-of-00001.arrow: its batch 1 is 520.0 MiB, more than"), (
            message
        )
        assert (
            f"the {MAX_ROW_GROUP_BYTES // MIB}.0 MiB read at once" in message
            and str(tmp_path) not in message
        )
        assert held["peak"] < 4 * MIB, held
    finally:
        path.unlink()  # not left in the temporary folders

    write_arrow(tmp_path / "zstd", plain, "de", compression="zstd")  # a stream
    arrow_file(tmp_path / "lz4", plain, compression="lz4")  # the file format
    for folder in (tmp_path / "zstd", tmp_path / "lz4"):
        with pytest.raises(
            ValueError, match=r"^de-00000-of-00001\.arrow: its batches are compressed"
        ):
            load_items("xgqa", str(folder), ["de"], limit=2)

    question = plain.schema.get_field_index("question")
    for kind, column in (
        ("dictionary-encoded", plain["question"].dictionary_encode()),
        ("a string view", plain["question"].cast(pa.string_view())),
        ("run-end encoded", pa.RunEndEncodedArray.from_arrays([3], ["What colour is it?"])),
    ):
        folder = tmp_path / kind.replace(" ", "-")
        write_arrow(folder, plain.set_column(question, "question", column), "de")
        with pytest.raises(ValueError) as error:
            load_items("xgqa", str(folder), ["de"], limit=2)
        assert str(error.value).startswith(
            f"de-00000-of-00001.arrow: its field 'question' is {kind}"
        ), error.value

    # the file format past 64 MiB: `datasets` would read up to 1.2 GiB of it as a stream first
    path = arrow_file(tmp_path / "large", xgqa_table(4, images(zeros[:4])))
    try:
        with measured() as held, pytest.raises(ValueError) as error:
            load_items("xgqa", str(tmp_path / "large"), ["de"], limit=2)
        assert str(error.value).startswith(
            "de-00000-of-00001.arrow is 80.0 MiB in the Arrow file format"
        ), error.value
        assert held["peak"] < 4 * MIB, held
    finally:
        path.unlink()

    broken = tmp_path / "broken" / "data" / "de-00000-of-00001.arrow"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(
        (tmp_path / "stream" / "data" / "de-00000-of-00001.arrow").read_bytes()[:300]
    )
    with pytest.raises(ValueError, match="is not an Arrow file that can be read"):
        load_items("xgqa", str(tmp_path / "broken"), ["de"], limit=2)


def test_pictures_in_any_field_read_through_datasets_stay_encoded(tmp_path):
    """A `datasets` Arrow folder in the M3Exam schema whose image_0 is an Image feature (not the
    Hub's base64 text), with an extra Image column: the item's picture stays encoded (a
    ``{"bytes", "path"}`` dict, sized from its header later), the extra column is not read."""
    import datasets

    from dim3.benchmarks import picture_pixels

    rows = m3exam_table(tmp_path / "hub").to_pylist()
    for row in rows:
        row["image_0"] = {"bytes": header_only_png(9_000, 9_000), "path": None}
        row["image_1"] = "None"
        row["poster"] = {"bytes": header_only_png(30_000, 30_000), "path": None}
    spec = {k: v for k, v in datasets.Dataset.from_list(rows[:1]).features.items()}
    spec |= {"image_0": datasets.Image(), "poster": datasets.Image()}
    table = datasets.Dataset.from_list(rows, features=datasets.Features(spec)).data.table
    write_arrow(tmp_path / "arrow", table, "english")
    items = load_items("m3exam", str(tmp_path / "arrow"), ["english"], limit=2)
    assert len(items) == 2 and all(isinstance(item.image, dict) for item in items)
    assert picture_pixels(items[0].image) == 81_000_000


# --- rows of the wrong shape --------------------------------------------------------------------


SCHEMA = "the xGQA schema (neulab/PangeaBench-xgqa) has the fields question_id, id, question"


@pytest.mark.parametrize(
    ("question", "says"),
    [
        (pa.array([["a", "b"]]), "its field 'question' holds a list that cannot be read"),
        (pa.array([None], pa.string()), "its field 'question' is null and cannot be read"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(tmp_path, question, says):
    write(tmp_path, xgqa_table(1).set_column(1, "question", question))
    with pytest.raises(ValueError) as error:
        load_items("xgqa", str(tmp_path), ["de"], limit=1)
    message = str(error.value)
    assert f"split 'de' row 0: {says} (AttributeError: " in message and SCHEMA in message


def test_other_unreadable_rows_are_named(tmp_path):
    """MaRVL turns that are not turns, an M3Exam subject that is not one, a `datasets` folder
    without the fields, a file that is not parquet: each names the row and field (or the file)."""
    turns = pa.array([["The shape is red", "true"]])  # text, not {"from", "value"} turns
    marvl = {"image": images(pa.array([picture("red")])), "conversations": turns, "id": ["0"]}
    write(tmp_path / "marvl", pa.table(marvl), "id")
    with pytest.raises(
        ValueError,
        match=r"row 0: its field 'conversations' holds a list that "
        r"cannot be read \(TypeError: .*MaRVL schema .* has the fields id, conversations, image",
    ):
        load_items("marvl", str(tmp_path / "marvl"), ["id"], limit=1)
    exam = m3exam_table(tmp_path / "m3")
    exam = exam.set_column(
        exam.schema.get_field_index("subject_category"), "subject_category", pa.array(["art"] * 2)
    )
    write(tmp_path / "exam", exam, "english")
    with pytest.raises(
        ValueError,
        match=r"row 0: its field 'subject_category' holds a str that "
        r"cannot be read \(ValueError: ",
    ):
        load_items("m3exam", str(tmp_path / "exam"), ["english"], limit=1)
    write_arrow(tmp_path / "other", pa.table({"caption": ["a red shape"]}), "de")
    with pytest.raises(ValueError, match=r"row 0 has no field 'question'; it is not in the xGQA"):
        load_items("xgqa", str(tmp_path / "other"), ["de"], limit=1)
    (tmp_path / "broken" / "data").mkdir(parents=True)
    (tmp_path / "broken" / "data" / "de-00000-of-00001.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(ValueError, match=r"^de-00000-of-00001.parquet is not a parquet file"):
        load_items("xgqa", str(tmp_path / "broken"), ["de"], limit=1)


# --- files a dataset folder holds: links out of the allowed folders -------------------------------


def jsonl_folder(
    folder: Path, rows: list[dict] | str | None, split: str = "de", name: str = ""
) -> Path:
    """A Hub layout with a README config: ``folder/<name or split.jsonl>`` is the split's file
    (``rows`` as JSON Lines, or text written as it is)."""
    name = name or f"{split}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(
        f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: {split}\n"
        f"    path: {name}\n---\n"
    )
    if rows is not None:
        text = rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows)
        (folder / name).write_text(text)
    return folder


SECRET = "TOP-SECRET line from outside the allowed folders"


def secret_row(n: int = 0) -> dict:
    return {"question_id": str(n), "question": SECRET, "answer": "x", "image": None}


@pytest.mark.parametrize("linked", ["de.jsonl", "README.md", "data/de-00000-of-00001.parquet"])
def test_a_link_out_of_the_allowed_folders_is_refused_before_it_is_read(tmp_path, linked):
    """The attack's layout: a dataset folder under the allowed folder whose split file (or the
    README `datasets` configures itself from, or a parquet file of the Hub layout) is a symbolic
    link to a file outside. Refused, naming the file as the folder holds it, before `datasets`
    or pyarrow opens it: the file's text is in no item and no message."""
    outside = tmp_path / "outside"
    outside.mkdir()
    allowed = tmp_path / "allowed"
    folder = allowed / "ds"
    if linked.endswith(".parquet"):
        write(outside, xgqa_table(2, question=pa.array([SECRET] * 2)))
        (folder / "data").mkdir(parents=True)
        target = outside / "data" / "de-00000-of-00001.parquet"
    else:
        jsonl_folder(outside, [secret_row()])
        jsonl_folder(folder, [secret_row()] if linked == "README.md" else None)
        target = outside / linked
        (folder / linked).unlink(missing_ok=True)
    (folder / linked).symlink_to(target)
    with pytest.raises(ValueError) as error:
        load_items("xgqa", str(folder), ["de"], limit=2, allowed_roots=[allowed])
    message = str(error.value)
    assert f"{folder}: {linked!r} leads outside the folders this server may read" in message
    assert "copy the file itself into the dataset's folder" in message
    assert "SECRET" not in message and str(outside) not in message
    # the command line (no allowed folders) still follows links, as a local user's own
    assert load_items("xgqa", str(folder), ["de"], limit=2)[0].question.startswith(SECRET)


def test_links_that_stay_in_the_allowed_folders_are_read(tmp_path):
    """A Hub-cache snapshot (its files are links into the repository's ``blobs``) and a link to
    another allowed file: read as before when the folders they lead into are allowed."""
    repo = tmp_path / "hub" / "datasets--neulab--PangeaBench-xgqa"
    blob = write(repo / "blobs" / "tmp", xgqa_table(3))
    (repo / "blobs" / "5f1e0a").write_bytes(blob.read_bytes())
    snapshot = repo / "snapshots" / "0123abcd"
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "de-00000-of-00001.parquet").symlink_to("../../../blobs/5f1e0a")
    items = load_items("xgqa", str(snapshot), ["de"], limit=3, allowed_roots=[tmp_path / "hub"])
    assert [it.answers for it in items] == [("red",)] * 3
    with pytest.raises(ValueError, match=r"'data/de-00000-of-00001.parquet' leads outside"):
        load_items("xgqa", str(snapshot), ["de"], limit=3, allowed_roots=[snapshot])
    elsewhere = jsonl_folder(tmp_path / "other", [secret_row(1)])
    folder = jsonl_folder(tmp_path / "ds", None)
    (folder / "de.jsonl").symlink_to(elsewhere / "de.jsonl")
    items = load_items("xgqa", str(folder), ["de"], limit=1, allowed_roots=[tmp_path])
    assert items[0].id == "1"


def test_the_app_refuses_a_dataset_that_links_out_of_its_folders(app_server, tmp_path):
    """The finding as the tester made it: Evaluate on a folder under the app's allowed folders
    whose split file links to a file outside them. The status names the link; the file's text
    reaches no prediction and no message."""
    gradio_client = pytest.importorskip("gradio_client")
    url, _ = app_server
    with tempfile.TemporaryDirectory(prefix="dim3-outside-") as outside:  # not an allowed root
        jsonl_folder(Path(outside), [secret_row()])
        folder = jsonl_folder(tmp_path / "ds_link", None)
        (folder / "de.jsonl").symlink_to(Path(outside) / "de.jsonl")
        status, *_ = gradio_client.Client(url, verbose=False).predict(
            methods=[],
            source="xgqa",
            languages=["de"],
            probe=str(folder),
            questions_per_language=2,
            api_name="/evaluate",
        )
    shown = status.replace("\\", "")  # as Markdown shows it
    assert shown.startswith("❌") and "'de.jsonl' leads outside the folders" in shown, status
    assert "SECRET" not in shown


# --- JSON Lines and CSV files: bounded before `datasets` parses them ------------------------------


def test_a_line_past_what_a_row_may_hold_is_refused_without_being_read_whole(tmp_path):
    """The attack's file, at 30 MiB: a JSON Lines row whose question alone is past what every
    xGQA field may hold. Refused from a scan of the file (one MiB at a time), naming the line;
    `datasets` read the whole line before the 64 KiB check could refuse its cell."""
    limit = max_line_bytes(BENCHMARKS["xgqa"])
    assert 21 * MIB < limit < 24 * MIB  # one picture as base64 text and the texts, escaped
    folder = jsonl_folder(tmp_path / "ds", [secret_row(0), secret_row(1)])
    with open(folder / "de.jsonl", "a") as f:
        f.write('{"question_id": "2", "question": "' + "a" * (30 * MIB) + '", "answer": "x"}\n')
    with measured() as held, pytest.raises(ValueError) as error:
        load_items("xgqa", str(folder), ["de"], limit=2)
    shown = f"{limit / MIB:.1f} MiB"
    assert re.match(
        rf"de.jsonl: line 3 is [\d.]+ MiB or more, more than the {shown} one row of a xGQA "
        r"question may take \(each field it reads at its limit: a picture 16.0 MiB encoded, a "
        r"text 65,536 bytes\); give a dataset in the xGQA schema",
        str(error.value),
    ), error.value
    assert held["peak"] < 8 * MIB, held


def test_json_and_csv_files_past_their_size_are_refused_from_their_size(tmp_path):
    """A JSON Lines file past MAX_TEXT_FILE_BYTES (sparse: its size, not its bytes, is read), a
    JSON array past MAX_WHOLE_JSON_BYTES (`datasets` reads and converts one whole), and
    compressed files (decompressed on the fly, past any size read here)."""
    big = jsonl_folder(tmp_path / "big", [secret_row()])
    with open(big / "de.jsonl", "r+b") as f:
        f.truncate(MAX_TEXT_FILE_BYTES + MIB)
    with pytest.raises(ValueError) as error:
        load_items("xgqa", str(big), ["de"], limit=2)
    assert str(error.value).startswith(
        "de.jsonl is 257.0 MiB, more than the 256.0 MiB a JSON or CSV data file may be"
    ), error.value
    row = json.dumps(secret_row()) + ",\n"
    whole = "[\n" + row * (MAX_WHOLE_JSON_BYTES // len(row) + 1) + json.dumps(secret_row()) + "]"
    jsonl_folder(tmp_path / "array", whole, name="de.json")
    with pytest.raises(ValueError, match=r"^de.json is 32.0 MiB of one JSON value, more than"):
        load_items("xgqa", str(tmp_path / "array"), ["de"], limit=2)
    packed = jsonl_folder(tmp_path / "gz", None, name="de.jsonl.gz")
    (packed / "de.jsonl.gz").write_bytes(gzip.compress(json.dumps(secret_row()).encode()))
    with pytest.raises(
        ValueError, match=r"^de.jsonl.gz is gzip-compressed; a data file is read un"
    ):
        load_items("xgqa", str(packed), ["de"], limit=2)
    # named plainly, but a link to a gzip file whose name `datasets` knows no extension of (a
    # Hub-cache blob's): it would decompress it on the fly
    hidden = jsonl_folder(tmp_path / "blob", None)
    (hidden / "5f1e0a").write_bytes(gzip.compress(json.dumps(secret_row()).encode()))
    (hidden / "de.jsonl").symlink_to(hidden / "5f1e0a")
    with pytest.raises(ValueError, match=r"^de.jsonl is gzip-compressed; a data file is read un"):
        load_items("xgqa", str(hidden), ["de"], limit=2, allowed_roots=[tmp_path])


def test_a_csv_file_that_does_not_parse_is_named_with_what_was_expected(tmp_path):
    """pandas' own words ("Error tokenizing data. C error: ...") become the dataset's: the split,
    its file, the rows read and the schema expected."""
    rows = "question_id,question,answer\n0,What colour?,red\n1,What shape?,square,extra,cells\n"
    folder = jsonl_folder(tmp_path / "csv", rows, name="de.csv")
    with pytest.raises(ValueError) as error:
        load_items("xgqa", str(folder), ["de"], limit=2)
    message = str(error.value)
    assert message.startswith(
        f"{folder} split 'de': de.csv cannot be read as CSV (a header row with the field "
        "names, then one question a row) after 0 rows (ParserError: Error tokenizing data."
    ), message
    assert message.endswith(
        f"give a split in the xGQA schema ({BENCHMARKS['xgqa'].dataset}: "
        "the fields question_id, id, question, answer, image)"
    ), message
    good = jsonl_folder(tmp_path / "good", rows.rsplit("\n", 2)[0] + "\n", name="de.csv")
    assert [it.answers for it in load_items("xgqa", str(good), ["de"], limit=2)] == [("red",)]


# --- the job's time budget while a split is read --------------------------------------------------


def long_split(folder: Path, rows: int) -> Path:
    line = '{"question_id": "%d", "question": "q", "answer": "a", "image": null}\n'
    return jsonl_folder(folder, "".join(line % i for i in range(rows)))


def test_reading_a_split_stops_with_the_job_budget(tmp_path):
    """A 100,000-row JSON Lines split takes seconds to stream past; a job budget of 50 ms (the
    app's JobBudget, its real clock) stops the read with the budget's own message, after a few
    thousand rows (``check`` is called every CHECK_ROWS rows)."""
    folder = long_split(tmp_path / "rows", 100_000)
    budget = JobBudget(0.05, "evaluation", "ask fewer questions per language")
    calls = []

    def check() -> None:
        calls.append(budget.elapsed)
        budget.check()

    with pytest.raises(BudgetExceeded, match=r"^the evaluation was stopped after .*\$DIM3_JOB_B"):
        load_items("xgqa", str(folder), ["de"], limit=4, check=check)
    assert 1 < len(calls) < 100_000 // CHECK_ROWS, calls


def test_the_app_stops_an_evaluation_whose_dataset_outlasts_the_budget(tmp_path):
    """The finding in the app: with DIM3_JOB_BUDGET=1, an Evaluate on a 1,000,000-row split
    (72 MB; some 20 s to stream past) ends with the budget's message within seconds, not once
    the split is read (a 12M-row split held the heavy slot 198 s against a 120 s budget)."""
    gradio_client = pytest.importorskip("gradio_client")
    from tests.app_server import ROOT, running_app

    folder = long_split(tmp_path / "rows", 1_000_000)
    (tmp_path / "app").mkdir()
    with running_app(tmp_path / "app", [ROOT / "assets", tmp_path], DIM3_JOB_BUDGET="1") as url:
        started = time.monotonic()
        status, *_ = gradio_client.Client(url, verbose=False).predict(
            methods=[],
            source="xgqa",
            languages=["de"],
            probe=str(folder),
            questions_per_language=2,
            api_name="/evaluate",
        )
        took = time.monotonic() - started
    assert status.startswith("❌ the evaluation was stopped after"), status
    assert took < 10, took
