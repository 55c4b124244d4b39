"""Sources of evaluation items: a benchmark's dataset (Hub id or local folder) or a probe file.

:func:`load_items` returns a fixed, seeded subset of each language's questions as
:class:`~dim3.benchmarks.Item` objects, whatever the source:

- a benchmark (``xgqa``, ``maxm``, ``marvl``, ``m3exam``): the ``datasets`` library resolves the
  dataset (Hub id or local folder) into its files, one split per language; no dataset script is
  ever run. A parquet split (all the reference sets) is **streamed** ``STREAM_BATCH`` rows at a
  time, one row group in memory (other formats stream through ``datasets``). Nothing is cached in
  full; pictures stay encoded while the split streams past; a reservoir sample (``random.Random(f"{seed}:{lang}")``,
  Algorithm R over the rows in file order) keeps ``limit`` items per language, returned in file
  order. Only those items' encoded pictures are held; they are decoded one batch at a time when
  asked (``dim3.evaluate``).
- ``probe``: the demo probe (``dataset`` empty or ``demo``) or a JSONL probe file
  (:func:`dim3.probes.load_probe`), sampled the same way.

A local folder must lie under ``allowed_roots`` when given (the app passes its folders). This
module knows files and datasets; it knows nothing about models or Gradio.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dim3.benchmarks import PROBE, Benchmark, Item, get_benchmark

DEFAULT_LIMIT = 200
DEFAULT_SEED = 0
STREAM_BATCH = 64  # rows converted to Python at a time while a split streams past
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def reservoir(rows: Iterable[Item], k: int, rng: random.Random) -> list[Item]:
    """``k`` items drawn uniformly from ``rows`` in one pass (Algorithm R), in input order.

    Item ``i`` (0-based) replaces a random kept one with probability ``k / (i + 1)``; memory is
    ``k`` items whatever the length of ``rows``.
    """
    kept: list[tuple[int, Item]] = []
    for i, item in enumerate(rows):
        if i < k:
            kept.append((i, item))
        else:
            j = rng.randint(0, i)
            if j < k:
                kept[j] = (i, item)
    return [item for _, item in sorted(kept, key=lambda pair: pair[0])]


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
) -> list[Item]:
    """Up to ``limit`` seeded items per language (``None``: all), languages in the order given.

    ``dataset``: a Hub id or a local folder (default: the benchmark's Hub id); for ``probe``,
    ``demo`` (default) or a JSONL file. Raises ``ValueError`` naming the problem and the fix (an
    unknown benchmark or language, a missing split or field, a folder outside the allowed ones).
    ``scan`` reads only the first ``scan`` usable questions of each split (a quick draw).
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
    for lang in langs:
        rows = _rows(bench, ref, lang, token)
        if scan is not None:
            rows = itertools.islice(rows, scan)
        if limit is None:
            items.extend(rows)
        else:
            items.extend(reservoir(rows, limit, _rng(seed, lang)))
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
        return str(folder.resolve())
    if not _HUB_ID.match(ref):
        raise ValueError(
            f"{ref!r} is neither a local folder nor a Hub dataset id (owner/name such as "
            f"{bench.dataset})"
        )
    return ref


def _present(bench: Benchmark, ref: str, token: str | None) -> tuple[str, ...]:
    import datasets

    try:
        splits = datasets.get_dataset_split_names(ref, token=token)
    except Exception as exc:  # noqa: BLE001 - reported with the dataset's name
        raise ValueError(f"cannot open the dataset {ref}: {type(exc).__name__}: {exc}") from None
    langs = tuple(lang for lang in bench.languages if lang in splits)
    if not langs:
        raise ValueError(
            f"{ref} has none of the {bench.title} language splits ({', '.join(bench.languages)}); "
            f"its splits: {', '.join(splits)}"
        )
    return langs


def _rows(bench: Benchmark, ref: str, lang: str, token: str | None) -> Iterator[Item]:
    """The split ``lang`` of ``ref``, streamed, as items (rows ``to_item`` skips are left out)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(ref, token=token)
    except FileNotFoundError as exc:
        raise ValueError(
            f"cannot find the dataset {ref} ({exc}); give a local folder, or a Hub id with "
            "network access (and HF_TOKEN for gated sets)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the Hub's many errors become one clear message
        raise ValueError(f"cannot open the dataset {ref}: {type(exc).__name__}: {exc}") from None
    files = dict(builder.config.data_files or {})
    if files and lang not in files:
        raise ValueError(
            f"{ref} has no split {lang!r} ({bench.title} keeps one split per language: "
            f"{', '.join(bench.languages)}); its splits: {', '.join(map(str, files))}"
        )
    if builder.name == "parquet":
        return _to_items(bench, _parquet_rows(files[lang], token), lang, ref)
    stream = datasets.load_dataset(ref, split=lang, streaming=True, token=token)
    field = bench.image_field
    if field and isinstance((stream.features or {}).get(field), datasets.Image):
        stream = stream.cast_column(field, datasets.Image(decode=False))  # keep pictures encoded
    return _to_items(bench, stream, lang, ref)


def _parquet_rows(urls: Sequence[str], token: str | None) -> Iterator[dict[str, Any]]:
    """Rows of parquet files (local paths or ``hf://`` URLs), ``STREAM_BATCH`` at a time.

    ``pre_buffer=False``: pyarrow's default reads a whole file object into memory first; without
    it only the row group being read is (pictures as ``{"bytes", "path"}``, still encoded)."""
    import fsspec
    import pyarrow.parquet as pq

    for url in urls:
        options = {"token": token} if str(url).startswith("hf://") and token else {}
        with fsspec.open(str(url), "rb", **options) as f:
            for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(STREAM_BATCH):
                yield from batch.to_pylist()


def _to_items(bench: Benchmark, rows: Iterable[dict[str, Any]], lang: str, ref: str):
    for index, row in enumerate(rows):
        try:
            item = bench.to_item(row, lang, index)
        except KeyError as exc:
            raise ValueError(
                f"{ref} split {lang!r} row {index} has no field {exc}; it is not in the "
                f"{bench.title} schema ({bench.dataset})"
            ) from None
        if item is not None:
            yield item


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
