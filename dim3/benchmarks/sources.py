"""Sources of evaluation items: a benchmark's dataset (Hub id or local folder) or a probe file.

:func:`load_items` returns a fixed, seeded subset of each language's questions as
:class:`~dim3.benchmarks.Item` objects, whatever the source:

- a benchmark (``xgqa``, ``maxm``, ``marvl``, ``m3exam``): the ``datasets`` library resolves the
  dataset (Hub id or local folder) into its files, one split per language; no dataset script is
  ever run. A parquet split (all the reference sets) is **streamed** ``STREAM_BATCH`` rows at a
  time, one row group in memory, only the columns the benchmark reads (``Benchmark.fields``);
  other formats stream through ``datasets``, with the same columns and nothing decoded. Nothing
  is cached in full; pictures stay encoded while the split streams past; a reservoir sample
  (``random.Random(f"{seed}:{lang}")``, Algorithm R over the rows in file order) keeps ``limit``
  items per language, returned in file order. Only those items' encoded pictures are held; they
  are decoded one batch at a time when asked (``dim3.evaluate``).
- what a dataset may make the reader hold is bounded, each refused with a message that names it
  (the file's name, the row group or row, the size and the limit): a row group's columns read
  (``MAX_ROW_GROUP_BYTES``), one picture (``MAX_PICTURE_BYTES``), one text cell
  (``MAX_TEXT_BYTES``) and all that a sample keeps (``MAX_SAMPLE_BYTES``, or ``max_bytes``).
  A JSON (Lines) or CSV file, which `datasets` parses before any cell can be sized, is bounded
  before it is handed over: its size (``MAX_TEXT_FILE_BYTES``; a JSON array, read whole,
  ``MAX_WHOLE_JSON_BYTES``) and its longest line (:func:`max_line_bytes`), scanned a chunk at a
  time. Formats other than ``READ_BUILDERS`` are refused.
- the files: with ``allowed_roots`` (a server), a local folder's top-level files (what `datasets`
  configures itself from) and each data file of the split read are resolved, symbolic links
  followed, and checked against them (:func:`dim3.paths.allowed_file`) before anything opens
  them; `datasets` is given the checked paths. A Hub-cache snapshot (links into its ``blobs``)
  passes when the cache lies under the roots.
- the time: ``check`` (the app's job budget) is called every ``CHECK_ROWS`` rows read and every
  ``CHECK_BYTES`` scanned, and stops the read by raising.
- ``probe``: the demo probe (``dataset`` empty or ``demo``) or a JSONL probe file
  (:func:`dim3.probes.load_probe`), sampled the same way.

A local folder must lie under ``allowed_roots`` when given (the app passes its folders). This
module knows files and datasets; it knows nothing about models or Gradio.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from dim3.benchmarks import M3EXAM_IMAGE_FIELDS, PROBE, Benchmark, Item, get_benchmark

DEFAULT_LIMIT = 200
DEFAULT_SEED = 0
STREAM_BATCH = 64  # rows read at a time while a split streams past
MIB = 2**20
# What one row group's columns read may take once read (their uncompressed size in the file's
# metadata, plus VALUE_BYTES per value for offsets, dictionary indices and nulls). The `datasets`
# library writes row groups of at most 100 MB (older versions: 100 rows of pictures, some
# 160 MB for MaRVL's largest photos, 1.6 MB each on average); a 40 KB file whose unused column
# held 1.2 GB of text took 3.5 GB to read whole.
MAX_ROW_GROUP_BYTES = 512 * MIB
VALUE_BYTES = 8
# One picture's encoded bytes. The reference sets' pictures are photos of a few hundred KB
# (MaRVL's largest split averages 450 KB, its English photos 1.6 MB; a 12 MP phone JPEG is
# 3-5 MB); a picture past 16 MiB would have more pixels than the 40 MP a picture may have
# unless padded, as the attack's 32x32 PNG followed by 20 MB of zeros was.
MAX_PICTURE_BYTES = 16 * MIB
# One text cell (a question, an answer list, M3Exam's background passages), in bytes as read.
# A prompt is at most 8,000 characters (dim3.limits.MAX_QUESTION_CHARS, 32 KB of UTF-8).
MAX_TEXT_BYTES = 64 * 2**10
# What a whole sample (every language's kept items: encoded pictures and texts) may hold. All five
# MaRVL splits, pictures included, are 1.4 GB; the app's largest sample (480 questions in each
# language) about 0.6 GB. A sample of 480 padded 20 MB pictures per language would be 9.6 GB.
MAX_SAMPLE_BYTES = 2 * 2**30
# A batch whose cells hold more than this is converted to Python a row at a time.
CONVERT_BYTES = 64 * MIB
# The columns in which the reference sets keep pictures (besides ``Benchmark.image_field``):
# M3Exam's base64 text. Every other column the reader converts is text (MAX_TEXT_BYTES).
PICTURE_FIELDS = frozenset({"image", *M3EXAM_IMAGE_FIELDS})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# The `datasets` builders a split is read with: parquet by this module; JSON (Lines), CSV and
# TSV by `datasets` once each file is bounded (TEXT_BUILDERS); Arrow streams, WebDataset tars
# and `datasets`' own cache (an offline Hub id) by `datasets`, cell by cell. Any other format
# (XML, HDF5, plain text, folders of pictures...) is refused before a file is opened.
TEXT_BUILDERS = frozenset({"json", "csv"})
READ_BUILDERS = frozenset({"parquet", "arrow", "webdataset", "cache", *TEXT_BUILDERS})
# The names a text data file may have: uncompressed (`datasets` would decompress a .gz or .zip
# on the fly, past any size read here).
TEXT_SUFFIXES = (".json", ".jsonl", ".ndjson", ".csv", ".tsv")
# A JSON (Lines) or CSV data file is parsed by `datasets` before any cell can be sized: JSON
# Lines 10 MB at a time plus the line it ends in (held whole), CSV 10,000 rows at a time, so
# each file is bounded before it is handed over: its size, and its longest line
# (:func:`max_line_bytes`), read SCAN_CHUNK at a time, no line held whole. A JSONL row whose
# question was 400 MB made a server 3.2 GB larger before the 64 KiB text check could refuse it.
MAX_TEXT_FILE_BYTES = 256 * MIB
# A JSON file that is one array (or an object read by its `field`) is read and converted whole,
# some three times its size in memory; larger splits belong in JSON Lines (one row a line).
MAX_WHOLE_JSON_BYTES = 32 * MIB
# Room in a row for its keys, quotes, separators and fields the benchmark does not read.
LINE_SLACK = 64 * 2**10
# A JSON string may spell a character as \u00XX (6 bytes for 1): a text cell's bytes as written.
JSON_ESCAPE = 6
SCAN_CHUNK = MIB  # bytes of a data file read at a time while its lines are measured
# The job's time (``check``) is looked at every CHECK_ROWS rows read and every CHECK_BYTES scanned:
# a 12M-row JSONL split took 198 s to stream past, against a 120 s budget.
CHECK_ROWS = 1024
CHECK_BYTES = 16 * MIB


def reservoir(
    rows: Iterable[Item], k: int, rng: random.Random, budget: SampleBudget | None = None
) -> list[Item]:
    """``k`` items drawn uniformly from ``rows`` in one pass (Algorithm R), in input order.

    Item ``i`` (0-based) replaces a random kept one with probability ``k / (i + 1)``; memory is
    ``k`` items whatever the length of ``rows``. ``budget`` counts the bytes the kept items
    hold (and refuses past its limit); it draws nothing, so the sample is the same with it.
    """
    budget = budget or SampleBudget(None)
    kept: list[tuple[int, Item]] = []
    for i, item in enumerate(rows):
        if i < k:
            budget.keep(item)
            kept.append((i, item))
        else:
            j = rng.randint(0, i)
            if j < k:
                budget.keep(item, instead_of=kept[j][1])
                kept[j] = (i, item)
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])]


def item_bytes(item: Item) -> int:
    """About what ``item`` holds: its encoded picture's bytes and its texts' characters."""
    picture = item.image
    if isinstance(picture, Mapping):
        picture = picture.get("bytes")
    held = len(picture) if isinstance(picture, (bytes, bytearray, str)) else 0
    texts = (item.id, item.question, item.context, *item.answers, *item.options)
    return held + sum(len(text) for text in texts)


class SampleBudget:
    """The bytes a sample's kept items hold (:func:`item_bytes`), refused past ``limit``."""

    def __init__(self, limit: int | None, per_language: int | None = None) -> None:
        self.limit, self.per_language, self.held, self.kept = limit, per_language, 0, 0

    def keep(self, item: Item, instead_of: Item | None = None) -> None:
        """Count ``item`` as kept (in place of ``instead_of``, which the sample drops)."""
        self.held += item_bytes(item) - (item_bytes(instead_of) if instead_of else 0)
        self.kept += instead_of is None
        if self.limit is not None and self.held > self.limit:
            n = self.per_language
            asked = f"up to {n} per language" if n else "every question of each language"
            raise ValueError(
                f"the sample's {self.kept} questions so far ({asked}) hold "
                f"{_mib(self.held)} of pictures and text, more than the {_mib(self.limit)} a "
                f"sample may hold; ask for fewer questions per language or fewer languages, or "
                f"give a dataset with smaller pictures"
            )


def load_items(
    benchmark: str | Benchmark,
    dataset: str | None = None,
    languages: Sequence[str] = (),
    limit: int | None = DEFAULT_LIMIT,
    seed: int = DEFAULT_SEED,
    *,
    allowed_roots: Sequence[str | Path] | None = None,
    token: str | None = None,
    scan: int | None = None,
    max_bytes: int | None = MAX_SAMPLE_BYTES,
    check: Callable[[], None] | None = None,
) -> list[Item]:
    """Up to ``limit`` seeded items per language (``None``: all), languages in the order given.

    ``dataset``: a Hub id or a local folder (default: the benchmark's Hub id); for ``probe``,
    ``demo`` (default) or a JSONL file. Raises ``ValueError`` naming the problem and the fix (an
    unknown benchmark or language, a missing split or field, a folder outside the allowed ones).
    ``scan`` reads only the first ``scan`` usable questions of each split (a quick draw).
    ``max_bytes``: what all the kept items may hold (:func:`item_bytes`; ``None``: no limit).
    ``check``: called every ``CHECK_ROWS`` rows read (and while a data file is scanned); it
    raises to stop the read (the app passes its job budget's ``check``).
    """
    bench = benchmark if isinstance(benchmark, Benchmark) else get_benchmark(benchmark)
    if limit is not None and limit < 1:
        raise ValueError(f"the sample size must be at least 1 per language, got {limit}")
    if bench is PROBE:
        return _probe_items(dataset, languages, limit, seed, allowed_roots)
    langs = bench.check_languages(languages)
    ref = _dataset_ref(bench, dataset, allowed_roots)
    if not any(lang.strip() for lang in languages):  # all of the benchmark's the dataset has
        langs = _present(bench, ref, token)
    items: list[Item] = []
    budget = SampleBudget(max_bytes, limit)
    for lang in langs:
        if check is not None:
            check()
        rows = _rows(bench, ref, lang, token, allowed_roots, check)
        if scan is not None:
            rows = itertools.islice(rows, scan)
        if limit is None:
            for item in rows:
                budget.keep(item)
                items.append(item)
        else:
            items.extend(reservoir(rows, limit, _rng(seed, lang), budget))
    if not items:
        raise ValueError(f"{ref} has no usable {bench.title} questions in {', '.join(langs)}")
    return items


def _dataset_ref(
    bench: Benchmark, dataset: str | None, allowed_roots: Sequence[str | Path] | None
) -> str:
    """A local folder (resolved, checked against ``allowed_roots``) or a Hub dataset id."""
    from dim3.paths import OutsideRootsError, allowed_file

    ref = (dataset or "").strip() or bench.dataset
    folder = Path(ref).expanduser()
    local = ref.startswith((".", "/", "~"))
    if allowed_roots is not None:  # checked first: nothing is said about folders outside
        if local:
            folder = allowed_file(ref, allowed_roots, what="the dataset folder")
        else:  # a bare name is a local folder only if it is one under the allowed folders
            try:
                folder = allowed_file(ref, allowed_roots, what="the dataset folder")
                local = folder.is_dir()
            except OutsideRootsError:
                local = False
    else:
        local = local or folder.exists()
    if local:
        if not folder.is_dir():
            raise ValueError(
                f"dataset folder {ref} does not exist; give a folder with the {bench.title} "
                f"parquet files (e.g. data/<language>-00000-of-00001.parquet) or a Hub id "
                f"such as {bench.dataset}"
            )
        folder = folder.resolve()
        if allowed_roots is not None:  # what `datasets` reads first (README.md, its configs)
            for entry in sorted(folder.iterdir()):
                _allowed(entry, folder, str(folder), allowed_roots)
        return str(folder)
    if not _HUB_ID.match(ref):
        raise ValueError(
            f"{ref!r} is neither a local folder nor a Hub dataset id (owner/name such as "
            f"{bench.dataset})"
        )
    return ref


def _allowed(path: str | Path, folder: Path | None, ref: str, roots: Sequence[str | Path]) -> Path:
    """``path``, a file of the dataset ``ref`` (a folder), resolved (symbolic links followed) and
    checked against ``roots`` with :func:`dim3.paths.allowed_file`, the check of every file a
    visitor names; the refusal names the file as the folder holds it, not where it leads."""
    from dim3.paths import OutsideRootsError, allowed_file

    try:
        return allowed_file(path, roots, what="the dataset's file")
    except OutsideRootsError:
        raise ValueError(
            f"{ref}: {_shown(str(path), folder)!r} leads outside the folders this server may read "
            "(a symbolic link, or a path out of the dataset's folder); copy the file itself into "
            "the dataset's folder"
        ) from None


def _shown(url: str, folder: Path | None) -> str:
    """A data file as messages name it: relative to the dataset's folder, else its name."""
    if folder is not None and "://" not in url:
        path = Path(os.path.abspath(url))
        if path.is_relative_to(folder):
            return str(path.relative_to(folder))
    return PurePosixPath(url).name


def _builder(ref: str, token: str | None) -> Any:
    """`datasets`' builder for ``ref``: its format and data files, no data file opened."""
    import datasets

    try:
        return datasets.load_dataset_builder(ref, token=token)
    except FileNotFoundError as exc:
        raise ValueError(
            f"cannot find the dataset {ref} ({exc}); give a local folder, or a Hub id with "
            "network access (and HF_TOKEN for gated sets)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the Hub's many errors become one clear message
        raise ValueError(f"cannot open the dataset {ref}: {type(exc).__name__}: {exc}") from None


def _present(bench: Benchmark, ref: str, token: str | None) -> tuple[str, ...]:
    """The benchmark's languages ``ref`` has a split for, from its data files' names (none is
    opened: `datasets` would read a JSON file's first rows to learn its columns)."""
    import datasets

    files = _builder(ref, token).config.data_files
    try:
        splits = [str(split) for split in files] if files else None
        splits = splits or datasets.get_dataset_split_names(ref, token=token)
    except Exception as exc:  # noqa: BLE001 - reported with the dataset's name
        raise ValueError(f"cannot open the dataset {ref}: {type(exc).__name__}: {exc}") from None
    langs = tuple(lang for lang in bench.languages if lang in splits)
    if not langs:
        raise ValueError(
            f"{ref} has none of the {bench.title} language splits ({', '.join(bench.languages)}); "
            f"its splits: {', '.join(splits)}"
        )
    return langs


def _rows(
    bench: Benchmark,
    ref: str,
    lang: str,
    token: str | None,
    roots: Sequence[str | Path] | None = None,
    check: Callable[[], None] | None = None,
) -> Iterator[Item]:
    """The split ``lang`` of ``ref``, streamed, as items (rows ``to_item`` skips are left out).

    Its data files are checked before any is opened: against ``roots`` (a local dataset's, with
    symbolic links followed), in a format this module reads (READ_BUILDERS), and, for a text
    format, bounded (:func:`_check_text_file`). `datasets` is then given the checked files."""
    builder = _builder(ref, token)
    files = dict(builder.config.data_files or {})
    if files and lang not in files:
        raise ValueError(
            f"{ref} has no split {lang!r} ({bench.title} keeps one split per language: "
            f"{', '.join(bench.languages)}); its splits: {', '.join(map(str, files))}"
        )
    urls = [str(url) for url in files.get(lang, ())]
    folder = Path(ref) if ref.startswith("/") else None
    names = [PurePosixPath(url).name for url in urls]  # never a server path
    paths = _checked_paths(ref, urls, folder, roots)
    if builder.name == "parquet":
        return _to_items(bench, _parquet_rows(bench, paths, token, names), lang, ref, check)
    if builder.name not in READ_BUILDERS:
        raise ValueError(
            f"{ref} split {lang!r} is in {builder.name} files ({', '.join(names)}); a "
            f"{bench.title} split is read from parquet (the Hub's layout: "
            f"data/{lang}-00000-of-00001.parquet), JSON Lines, CSV, Arrow or WebDataset files"
        )
    whole = getattr(builder.config, "field", None) is not None
    for path, name in zip(paths, names, strict=True):
        _refuse_compressed(path, name, token)
        if builder.name in TEXT_BUILDERS:
            _check_text_file(bench, path, name, token, whole, check)
        elif builder.name == "webdataset":
            _check_tar_file(bench, path, name, token, check)
        elif builder.name == "arrow":
            _check_arrow_file(path, name, token, check)
    if urls:  # `datasets` reads the files checked, not its own listing again
        from datasets.data_files import DataFilesList

        metadata = files[lang].origin_metadata
        builder.config.data_files[lang] = DataFilesList(paths, metadata)
    try:
        stream = builder.as_streaming_dataset(split=lang)
    except Exception as exc:  # noqa: BLE001 - a file `datasets` cannot parse, named
        raise ValueError(_unparsed(bench, builder.name, ref, lang, names, 0, exc)) from None
    if stream.features and bench.fields:  # known before any row is read
        stream = stream.select_columns([f for f in bench.fields if f in stream.features])
    if stream.features:  # (unknown: `datasets` decodes nothing)
        stream = stream.decode(False)  # every picture, in any column, stays encoded
    rows = _checked(bench, stream, ref, lang, names, builder.name)
    return _to_items(bench, rows, lang, ref, check)


def _checked_paths(
    ref: str, urls: Sequence[str], folder: Path | None, roots: Sequence[str | Path] | None
) -> list[str]:
    """``urls`` as `datasets` may open them: with ``roots`` (a server), a local dataset's files
    resolved and under ``roots`` (a link out of them refused, a URL refused: a local dataset is
    read from its folder), a Hub dataset's local files (`datasets`' cache) under the caches."""
    if roots is None:
        return list(urls)
    if folder is None:  # a Hub id: its files are URLs, or in `datasets`' or the Hub's cache
        from datasets import config
        from huggingface_hub import constants

        roots = [config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE]
    paths = []
    for url in urls:
        if "://" in url:
            if folder is not None:
                raise ValueError(
                    f"{ref}: its configuration names the data file {url!r}, which is not a file "
                    "of the folder; a local dataset is read from its own folder"
                )
            paths.append(url)
        else:
            paths.append(str(_allowed(url, folder, ref, roots)))
    return paths


def _open(url: str, token: str | None) -> tuple[Any, str]:
    """The fsspec file system and path of a data file (a local path or an ``hf://`` URL)."""
    import fsspec

    options = {"token": token} if url.startswith("hf://") and token else {}
    return fsspec.core.url_to_fs(url, **options)


def _refuse_compressed(url: str, name: str, token: str | None) -> None:
    """``ValueError`` for a data file whose first bytes say it is compressed: `datasets`
    decompresses such a file on the fly when its name has no extension it knows (the target of
    a link, a Hub-cache blob, has none), past any size read here."""
    from datasets.utils.file_utils import (
        MAGIC_NUMBER_MAX_LENGTH,
        MAGIC_NUMBER_TO_COMPRESSION_PROTOCOL,
        MAGIC_NUMBER_TO_UNSUPPORTED_COMPRESSION_PROTOCOL,
    )

    fs, path = _open(url, token)
    with fs.open(path, "rb") as f:
        head = f.read(MAGIC_NUMBER_MAX_LENGTH)
    magics = MAGIC_NUMBER_TO_COMPRESSION_PROTOCOL | MAGIC_NUMBER_TO_UNSUPPORTED_COMPRESSION_PROTOCOL
    for magic, kind in magics.items():
        if head.startswith(magic):
            raise ValueError(
                f"{name} is {kind}-compressed; a data file is read uncompressed (its size is "
                "what bounds it): give the split's files uncompressed, or as parquet"
            )


def max_line_bytes(bench: Benchmark) -> int:
    """The longest line a JSON Lines or CSV file of ``bench`` may have: one row holding every
    field the benchmark reads at its limit (a picture as base64 text, 4/3 of MAX_PICTURE_BYTES;
    a text MAX_TEXT_BYTES, JSON_ESCAPE bytes a character as written), plus LINE_SLACK."""
    pictures = sum(f in PICTURE_FIELDS or f == bench.image_field for f in bench.fields)
    texts = len(bench.fields) - pictures
    picture = -(-MAX_PICTURE_BYTES * 4 // 3)
    return pictures * picture + texts * JSON_ESCAPE * MAX_TEXT_BYTES + LINE_SLACK


def _check_text_file(
    bench: Benchmark,
    url: str,
    name: str,
    token: str | None,
    whole: bool,
    check: Callable[[], None] | None,
) -> None:
    """``ValueError`` for a JSON (Lines) or CSV data file `datasets` could not parse within
    bounds: not named as one (TEXT_SUFFIXES: a .gz is decompressed), past MAX_TEXT_FILE_BYTES, a JSON array (or a file read by a ``field``:
    ``whole``) past MAX_WHOLE_JSON_BYTES, or a line past :func:`max_line_bytes`. The file is
    read SCAN_CHUNK bytes at a time; no line is held."""
    if not name.lower().endswith(TEXT_SUFFIXES):
        raise ValueError(
            f"{name}: a JSON or CSV data file is read uncompressed (named *"
            f"{', *'.join(TEXT_SUFFIXES)}); decompress it, or write the split as parquet"
        )
    fs, path = _open(url, token)
    size = int(fs.size(path))
    if size > MAX_TEXT_FILE_BYTES:
        raise ValueError(
            f"{name} is {_mib(size)}, more than the {_mib(MAX_TEXT_FILE_BYTES)} a JSON or CSV "
            "data file may be (`datasets` parses it before any value can be sized); split it "
            "into smaller files, or write it as parquet (the Hub's layout)"
        )
    with fs.open(path, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
        if (whole or head.startswith(b"[")) and size > MAX_WHOLE_JSON_BYTES:
            raise ValueError(
                f"{name} is {_mib(size)} of one JSON value, more than the "
                f"{_mib(MAX_WHOLE_JSON_BYTES)} `datasets` may read whole; write it as JSON Lines "
                "(one row a line) or parquet"
            )
        f.seek(0)
        long = _long_line(f, max_line_bytes(bench), check)
    if long is not None:
        line, length = long
        raise ValueError(
            f"{name}: line {line:,} is {_mib(length)} or more, more than the "
            f"{_mib(max_line_bytes(bench))} one row of a {bench.title} question may take (each "
            f"field it reads at its limit: a picture {_mib(MAX_PICTURE_BYTES)} encoded, a text "
            f"{MAX_TEXT_BYTES:,} bytes); give a dataset in the {bench.title} schema "
            f"({bench.dataset}), one question a line"
        )


def _check_tar_file(
    bench: Benchmark, url: str, name: str, token: str | None, check: Callable[[], None] | None
) -> None:
    """``ValueError`` for a WebDataset tar with a member larger than one row of ``bench`` may
    hold (:func:`max_line_bytes`): `datasets` reads every member of a sample whole, the fields
    the benchmark leaves unread too, before any cell can be sized (a 300 MiB member took a
    process to 751 MiB, by hand). Only the members' headers are read; their data is skipped."""
    import tarfile

    limit = max_line_bytes(bench)
    fs, path = _open(url, token)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        count = 0
        while (member := tar.next()) is not None:
            tar.members.clear()  # the headers seen: not kept (a tar may hold millions)
            count += 1
            if check is not None and count % CHECK_ROWS == 0:
                check()
            if member.size > limit:
                shown = member.name if len(member.name) <= 60 else member.name[:59] + "…"
                raise ValueError(
                    f"{name}: its member {shown!r} is {_mib(member.size)}, more than the "
                    f"{_mib(limit)} one {bench.title} sample may take (each field "
                    f"it reads at its limit: a picture {_mib(MAX_PICTURE_BYTES)}, a text "
                    f"{MAX_TEXT_BYTES:,} bytes), and `datasets` reads a sample's members whole; "
                    "leave what the benchmark does not read out of the tar, or write it as parquet"
                )


def _check_arrow_file(
    url: str, name: str, token: str | None, check: Callable[[], None] | None
) -> None:
    """``ValueError`` for an Arrow file (IPC stream or file format) that `datasets` could not
    read a batch at a time within ``MAX_ROW_GROUP_BYTES``: it reads each record batch whole,
    every column, so no batch's body may be larger, and none may be compressed (a body of a
    few kB can stand for gigabytes once decompressed). Only the messages' metadata is read
    (:func:`_arrow_message`): for a stream each message's in turn, its body skipped; for the
    file format the footer's blocks, the batches `datasets` reads."""
    fs, path = _open(url, token)
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        file_format = f.read(6) == ARROW_MAGIC  # else a stream
        if file_format and size > MAX_ARROW_FILE_FORMAT:
            raise ValueError(
                f"{name} is {_mib(size)} in the Arrow file format, which `datasets` first tries "
                "to read as a stream, reading up to 1.2 GiB of it at once before it gives up; "
                f"past {_mib(MAX_ARROW_FILE_FORMAT)} give it as an Arrow stream (what the "
                "`datasets` library writes) or as parquet"
            )
        try:
            for count, (body, compressed) in enumerate(_arrow_bodies(f, size, file_format), 1):
                if check is not None and count % CHECK_ROWS == 0:
                    check()
                if compressed:
                    raise ValueError(
                        f"{name}: its batches are compressed (LZ4 or Zstandard), which `datasets` "
                        "decompresses whole before any cell can be sized; write it uncompressed "
                        "(the `datasets` library's own Arrow files are) or as parquet"
                    )
                if body > MAX_ROW_GROUP_BYTES:
                    raise ValueError(
                        f"{name}: its batch {count} is {_mib(body)}, more than the "
                        f"{_mib(MAX_ROW_GROUP_BYTES)} read at once (`datasets` reads a batch whole, "
                        "every column); write it in smaller batches (the `datasets` library "
                        "writes 1,000 rows a batch, 100 of pictures) or as parquet"
                    )
        except (struct.error, IndexError, _ArrowFramingError) as exc:
            raise ValueError(f"{name} is not an Arrow file that can be read: {exc}") from None
        f.seek(0)
        schema = _arrow_schema(f, name, file_format)
    for field in schema:
        if (kind := _expanding_type(field.type)) is not None:
            raise ValueError(
                f"{name}: its field {field.name!r} is {kind}, whose values a few bytes on disk "
                "can make gigabytes once `datasets` converts them (a batch is converted whole); "
                "write it with plain types (the `datasets` library's own Arrow files have them) "
                "or as parquet"
            )


def _arrow_schema(f: Any, name: str, file_format: bool) -> Any:
    """The schema of the Arrow file ``f`` (at its start), no batch read."""
    import pyarrow as pa

    try:
        return (pa.ipc.open_file(f) if file_format else pa.ipc.open_stream(f)).schema
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{name} is not an Arrow file that can be read: {exc}") from None


def _expanding_type(kind: Any) -> str | None:
    """What in the Arrow type ``kind`` (nested types searched) has a logical size its bytes on
    disk do not bound: a dictionary (one value, any number of rows), a view type (views share
    their values), run-end encoding (one value for a run of any length); None for none."""
    import pyarrow.types as t

    checks = (
        (t.is_dictionary, "dictionary-encoded"),
        (t.is_binary_view, "a binary view"),
        (t.is_string_view, "a string view"),
        (t.is_list_view, "a list view"),
        (t.is_large_list_view, "a list view"),
        (t.is_run_end_encoded, "run-end encoded"),
    )
    for check, says in checks:
        if check(kind):
            return says
    for i in range(kind.num_fields):
        if (inner := _expanding_type(kind.field(i).type)) is not None:
            return inner
    return None


class _ArrowFramingError(Exception):
    """An Arrow file whose framing (lengths, magic, footer) does not hold together."""


ARROW_MAGIC = b"ARROW1"
ARROW_CONTINUATION = b"\xff\xff\xff\xff"
MAX_ARROW_METADATA = 64 * MIB  # one message's flatbuffer (a schema with `datasets`' features)
# `datasets` opens an Arrow file as a stream first; the file format's magic then reads as a
# metadata length of 1,330,795,073 bytes, and pyarrow reads that much of the file (all of a
# 300 MiB file, by hand) before it fails and `datasets` opens it as a file.
MAX_ARROW_FILE_FORMAT = 64 * MIB


def _arrow_bodies(f: Any, size: int, file_format: bool) -> Iterator[tuple[int, bool]]:
    """(body length, compressed) of each dictionary and record batch `datasets` would read from
    the Arrow file ``f`` of ``size`` bytes (a stream, or the file format), from metadata only
    (format: arrow.apache.org/docs/format/Columnar.html, "Serialization and Interprocess
    Communication")."""
    if file_format:  # batches where the footer's blocks say
        f.seek(size - 10)
        tail = f.read(10)
        if tail[4:] != ARROW_MAGIC:
            raise _ArrowFramingError("it begins as the Arrow file format but does not end as one")
        length = struct.unpack("<i", tail[:4])[0]
        if not 0 < length <= min(size - 18, MAX_ARROW_METADATA):
            raise _ArrowFramingError(f"its footer's length ({length:,}) does not fit the file")
        f.seek(size - 10 - length)
        footer = f.read(length)
        table = _fb_root(footer)
        for index in (2, 3):  # dictionaries, recordBatches: vectors of Block structs
            for at in _fb_structs(footer, table, index, 24):
                offset, meta_length, body = struct.unpack_from("<qi4xq", footer, at)
                if not (0 <= offset < size and 0 < meta_length <= MAX_ARROW_METADATA):
                    raise _ArrowFramingError(f"a block at {offset:,} does not fit the file")
                f.seek(offset)
                message = _arrow_message(f, size)
                if message is None:
                    raise _ArrowFramingError(f"the block at {offset:,} holds no message")
                yield max(body, message[0]), message[1]
        return
    f.seek(0)  # a stream: message after message, each body skipped
    while (message := _arrow_message(f, size)) is not None:
        body, compressed, batch = message
        if batch:  # (a schema message has no body)
            yield body, compressed
        f.seek(body, os.SEEK_CUR)


def _arrow_message(f: Any, size: int) -> tuple[int, bool, bool] | None:
    """The message at ``f``'s position: (body length, compressed, a batch), its metadata read and
    the file left at its body; None at the end of a stream."""
    prefix = f.read(4)
    if len(prefix) < 4:
        return None  # a stream may end without its end marker
    if prefix == ARROW_CONTINUATION:
        prefix = f.read(4)
        if len(prefix) < 4:
            raise _ArrowFramingError("it ends inside a message's length")
    length = struct.unpack("<i", prefix)[0]
    if length == 0:
        return None  # the end-of-stream marker
    if not 0 < length <= MAX_ARROW_METADATA:
        raise _ArrowFramingError(f"a message's metadata length ({length:,}) is not one")
    meta = f.read(length)
    if len(meta) < length:
        raise _ArrowFramingError("it ends inside a message's metadata")
    message = _fb_root(meta)
    kind = _fb_scalar(meta, message, 1, "<B", 0)  # header_type: 2 dictionary, 3 record batch
    body = _fb_scalar(meta, message, 3, "<q", 0)  # bodyLength
    if body < 0 or body > size:
        raise _ArrowFramingError(f"a message's body length ({body:,}) does not fit the file")
    header = _fb_table(meta, message, 2)
    if kind == 2 and header is not None:
        header = _fb_table(meta, header, 1)  # DictionaryBatch.data: its RecordBatch
    compressed = kind in (2, 3) and header is not None and _fb_field(meta, header, 3) is not None
    return body, compressed, kind in (2, 3)


def _fb_root(buf: bytes) -> int:
    """A flatbuffer's root table's position."""
    return struct.unpack_from("<I", buf, 0)[0]


def _fb_field(buf: bytes, table: int, index: int) -> int | None:
    """The position of field ``index`` of the flatbuffer table at ``table``, or None if absent."""
    vtable = table - struct.unpack_from("<i", buf, table)[0] if table >= 0 else -1
    if vtable < 0:  # (unpack_from would read a negative position from the end)
        raise _ArrowFramingError("its metadata points outside itself")
    entry = 4 + 2 * index
    if entry + 2 > struct.unpack_from("<H", buf, vtable)[0]:
        return None
    offset = struct.unpack_from("<H", buf, vtable + entry)[0]
    return table + offset if offset else None


def _fb_scalar(buf: bytes, table: int, index: int, fmt: str, default: int) -> int:
    at = _fb_field(buf, table, index)
    return default if at is None else struct.unpack_from(fmt, buf, at)[0]


def _fb_table(buf: bytes, table: int, index: int) -> int | None:
    """The table field ``index`` of ``table`` points to, or None."""
    at = _fb_field(buf, table, index)
    return None if at is None else at + struct.unpack_from("<I", buf, at)[0]


def _fb_structs(buf: bytes, table: int, index: int, width: int) -> Iterator[int]:
    """The positions of the structs (``width`` bytes each) of the vector field ``index``."""
    at = _fb_field(buf, table, index)
    if at is None:
        return
    vector = at + struct.unpack_from("<I", buf, at)[0]
    count = struct.unpack_from("<I", buf, vector)[0]
    if vector + 4 + count * width > len(buf):
        raise _ArrowFramingError("its footer lists more blocks than it holds")
    for i in range(count):
        yield vector + 4 + i * width


def _long_line(f: Any, limit: int, check: Callable[[], None] | None) -> tuple[int, int] | None:
    """The first line of ``f`` (a binary file) longer than ``limit`` bytes: (its number, 1-based;
    its length so far), or None. A line within one chunk is shorter than the chunk, so only the
    bytes since the last newline are counted across chunks."""
    chunk_size = min(SCAN_CHUNK, limit)
    line, since, read = 1, 0, 0  # the current line's number and bytes so far; bytes read
    while chunk := f.read(chunk_size):
        read += len(chunk)
        if check is not None and read % CHECK_BYTES < len(chunk):
            check()
        first = chunk.find(b"\n")
        if first < 0:
            since += len(chunk)
            if since > limit:
                return line, since
            continue
        if since + first > limit:
            return line, since + first
        line += chunk.count(b"\n")
        since = len(chunk) - chunk.rfind(b"\n") - 1
    return None


def _checked(
    bench: Benchmark,
    rows: Iterable[dict[str, Any]],
    ref: str,
    lang: str = "",
    names: Sequence[str] = (),
    kind: str = "",
) -> Iterator[dict[str, Any]]:
    """``rows`` (read by `datasets`), each cell checked before an item keeps it; a file
    `datasets` cannot parse is named with what was expected (:func:`_unparsed`)."""
    iterator = iter(rows)
    index = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - pandas', pyarrow's and json's many errors
            raise ValueError(_unparsed(bench, kind, ref, lang, names, index, exc)) from None
        for field, value in row.items():
            _check_cell(bench, field, _value_bytes(value), isinstance(value, str), ref, index)
        yield row
        index += 1


FORMATS = {
    "json": "JSON Lines (one JSON object a line)",
    "csv": "CSV (a header row with the field names, then one question a row)",
}


def _unparsed(
    bench: Benchmark,
    kind: str,
    ref: str,
    lang: str,
    names: Sequence[str],
    index: int,
    exc: Exception,
) -> str:
    """A data file `datasets` could not parse: the dataset, the split's files, the row reached,
    the parser's own first line, and what was expected."""
    detail = (str(exc).strip().splitlines() or [""])[0][:300]
    files = ", ".join(names) or "its data files"
    return (
        f"{ref} split {lang!r}: {files} cannot be read as {FORMATS.get(kind, kind)} after "
        f"{index:,} rows ({type(exc).__name__}: {detail}); give a split in the {bench.title} "
        f"schema ({bench.dataset}: the fields {', '.join(bench.fields)})"
    )


def _parquet_rows(
    bench: Benchmark, urls: Sequence[str], token: str | None, names: Sequence[str] = ()
) -> Iterator[dict[str, Any]]:
    """The rows of parquet files (local paths or ``hf://`` URLs), the benchmark's fields only.

    Each row group is sized from the file's metadata before it is read
    (:func:`_check_row_group`); its text and binary columns are read as dictionaries, so a value
    repeated in many rows is held once; each cell is sized before it is converted to Python
    (:func:`_cell_sizes`). ``pre_buffer=False``: pyarrow's default reads a whole file object into
    memory first; without it only the row group being read is (pictures still encoded)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, url in enumerate(urls):
        # as the dataset names it (a link's name, not its target's), never a server path
        name = names[i] if i < len(names) else PurePosixPath(str(url)).name
        options = {"token": token} if str(url).startswith("hf://") and token else {}
        with fsspec.open(str(url), "rb", **options) as f:
            try:
                meta = pq.ParquetFile(f).metadata
                names = meta.schema.to_arrow_schema().names
            except (OSError, pa.ArrowException) as exc:
                raise ValueError(f"{name} is not a parquet file that can be read: {exc}") from None
            columns = [c for c in bench.fields if c in names] if bench.fields else names
            leaves = [
                meta.schema.column(j).path
                for j in range(meta.num_columns)
                if meta.schema.column(j).path.split(".")[0] in columns
                and meta.schema.column(j).physical_type == "BYTE_ARRAY"
            ]
            parquet = pq.ParquetFile(f, pre_buffer=False, metadata=meta, read_dictionary=leaves)
            first = 0  # the row group's first row in the file
            for group in range(meta.num_row_groups):
                _check_row_group(meta.row_group(group), columns, name, group)
                batches = parquet.iter_batches(STREAM_BATCH, row_groups=[group], columns=columns)
                for batch in batches:
                    yield from _batch_rows(bench, batch, name, first)
                    first += batch.num_rows


def _check_row_group(group: Any, columns: Sequence[str], name: str, index: int) -> None:
    """``ValueError`` when the columns read of a row group would take more than
    ``MAX_ROW_GROUP_BYTES`` (from the file's metadata: nothing is read)."""
    size = 0
    for j in range(group.num_columns):
        chunk = group.column(j)
        if chunk.path_in_schema.split(".")[0] in columns:
            size += chunk.total_uncompressed_size + VALUE_BYTES * chunk.num_values
    if size > MAX_ROW_GROUP_BYTES:
        raise ValueError(
            f"{name}: row group {index} ({group.num_rows:,} rows) takes {_mib(size)} "
            f"uncompressed in the columns read ({', '.join(columns)}), more than the "
            f"{_mib(MAX_ROW_GROUP_BYTES)} read at once; write the file with smaller row groups "
            "(the `datasets` library writes at most 100 MB each)"
        )


def _batch_rows(bench: Benchmark, batch: Any, name: str, first: int) -> Iterator[dict[str, Any]]:
    """The rows of an Arrow batch as dicts, each cell sized (and refused) before conversion."""
    import numpy as np
    import pyarrow as pa

    total = np.zeros(batch.num_rows, dtype=np.int64)
    for field, column in zip(batch.schema.names, batch.columns, strict=True):
        sizes = _cell_sizes(column)
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if len(sizes):
            worst = int(np.argmax(sizes))
            _check_cell(bench, field, int(sizes[worst]), text, name, first + worst)
        total += sizes
    if total.sum() <= CONVERT_BYTES:
        yield from batch.to_pylist()
    else:  # a row at a time: what Python holds at once is one row of checked cells
        for i in range(batch.num_rows):
            yield batch.slice(i, 1).to_pylist()[0]


def _cell_sizes(column: Any) -> Any:
    """The bytes each row's value of an Arrow array holds once converted (strings and bytes at
    their length, a dictionary value at its value's, lists and structs summed), as a numpy
    int64 array; computed from lengths and offsets, nothing converted."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_dictionary(kind):
        lengths = pa.array(_cell_sizes(column.dictionary))
        return pc.take(lengths, column.indices).fill_null(0).to_numpy(zero_copy_only=False)
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string)
    if any(is_kind(kind) for is_kind in (*binary, pa.types.is_large_string)):
        lengths = pc.binary_length(column).fill_null(0)
        return lengths.to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_struct(kind):
        sizes = np.zeros(len(column), dtype=np.int64)
        for child in column.flatten():
            sizes += _cell_sizes(child)
        return sizes
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and not pa.types.is_map(kind):
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        values = _cell_sizes(column.flatten())
        return np.bincount(parents, weights=values, minlength=len(column)).astype(np.int64)
    if pa.types.is_fixed_size_list(kind):
        values = _cell_sizes(column.flatten())
        return values.reshape(len(column), kind.list_size).sum(axis=1) if len(column) else values
    try:
        width = max(kind.bit_width // 8, 1)
    except ValueError:  # any other type: every row counted at the whole array's size
        width = column.nbytes
    return np.full(len(column), width, dtype=np.int64)


def _value_bytes(value: Any) -> int:
    """What a Python value read from a dataset holds, as :func:`_cell_sizes` counts it."""
    if isinstance(value, str):  # its UTF-8 length, not copied where it is long anyway
        return len(value) if value.isascii() or len(value) > MAX_TEXT_BYTES else len(value.encode())
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_value_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_value_bytes(v) for v in value)
    return 8


def _check_cell(bench: Benchmark, field: str, size: int, text: bool, where: str, row: int) -> None:
    """``ValueError`` when one cell is larger than its kind may be: a picture (its encoded bytes;
    base64 text is 4/3 of them) ``MAX_PICTURE_BYTES``, any other cell ``MAX_TEXT_BYTES``."""
    if field in PICTURE_FIELDS or field == bench.image_field:
        encoded = size * 3 // 4 if text else size
        if encoded > MAX_PICTURE_BYTES:
            raise ValueError(
                f"{where}: the picture in field {field!r} of row {row} is {_mib(encoded)} "
                f"encoded, more than the {_mib(MAX_PICTURE_BYTES)} a picture may have; give a "
                "dataset with smaller pictures"
            )
    elif size > MAX_TEXT_BYTES:
        raise ValueError(
            f"{where}: field {field!r} of row {row} holds {size:,} bytes, more than the "
            f"{MAX_TEXT_BYTES:,} a text of a {bench.title} question may have; give a dataset in "
            f"the {bench.title} schema ({bench.dataset})"
        )


class _ReadRow(dict):
    """A row that remembers the last field read (to name it when a value is of the wrong type)."""

    last: str | None = None

    def __getitem__(self, key: str) -> Any:
        self.last = key
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.last = key
        return super().get(key, default)


def _to_items(
    bench: Benchmark,
    rows: Iterable[dict[str, Any]],
    lang: str,
    ref: str,
    check: Callable[[], None] | None = None,
) -> Iterator[Item]:
    """The items of ``rows`` (``check`` called every CHECK_ROWS rows read, skipped ones too)."""
    for index, row in enumerate(rows):
        if check is not None and index % CHECK_ROWS == CHECK_ROWS - 1:
            check()
        read = _ReadRow(row)
        try:
            item = bench.to_item(read, lang, index)
        except KeyError as exc:
            raise ValueError(
                f"{ref} split {lang!r} row {index} has no field {exc}; it is not in the "
                f"{bench.title} schema ({bench.dataset})"
            ) from None
        except (TypeError, AttributeError, ValueError) as exc:
            where = f"{ref} split {lang!r} row {index}"
            raise ValueError(_unreadable(bench, exc, read, where)) from None
        if item is not None:
            yield item


def _unreadable(bench: Benchmark, exc: Exception, row: _ReadRow, where: str) -> str:
    """What is wrong with a row ``to_item`` could not read: the field last read and the type of
    its value (a list or null where text belongs), or the item's own check (a long question)."""
    frame = exc.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is not None and frame.tb_frame.f_code.co_name == "__post_init__":
        return f"{where}: {exc}"  # Item's own check, which names the problem
    field = row.last
    value = dict.get(row, field)
    held = " is null and" if value is None else f" holds a {type(value).__name__} that"
    held = held if field in row else ""
    what = f"its field {field!r}{held} cannot be read" if field else "it cannot be read"
    return (
        f"{where}: {what} ({type(exc).__name__}: {exc}); the {bench.title} schema "
        f"({bench.dataset}) has the fields {', '.join(bench.fields)}"
    )


def _mib(size: int) -> str:
    return f"{size / MIB:,.1f} MiB"


def _probe_items(
    path: str | None,
    languages: Sequence[str],
    limit: int | None,
    seed: int,
    allowed_roots: Sequence[str | Path] | None,
) -> list[Item]:
    from dim3.demo import demo_probe_path
    from dim3.probes import load_probe

    ref = (path or "").strip()
    file = demo_probe_path() if ref in ("", "demo") else Path(ref).expanduser()
    # the file and every picture it names are checked against the allowed folders before use
    probe = load_probe(file, allowed_roots=allowed_roots)
    present = list(dict.fromkeys(it.language for it in probe))
    wanted = [lang.strip() for lang in languages if lang.strip()] or present
    unknown = [lang for lang in wanted if lang not in present]
    if unknown:
        raise ValueError(
            f"the probe has no question in {', '.join(unknown)}; its languages: "
            f"{', '.join(present)}"
        )
    counters: dict[str, int] = {}
    rows: list[Item] = []
    for it in probe:  # file order; ids count each language's questions
        n = counters[it.language] = counters.get(it.language, -1) + 1
        if it.language in wanted:
            rows.append(
                Item(
                    f"{it.language}-{n}",
                    it.language,
                    it.question,
                    (it.answer,),
                    it.image,
                    (),
                    12,
                    it.context,
                )
            )
    if limit is None:
        return rows
    items: list[Item] = []
    for lang in dict.fromkeys(wanted):
        items.extend(reservoir((r for r in rows if r.language == lang), limit, _rng(seed, lang)))
    return items


def _rng(seed: int, lang: str) -> random.Random:
    return random.Random(f"{seed}:{lang}")
