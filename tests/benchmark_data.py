"""Small local copies of the multilingual benchmarks, in each set's real schema and on-disk layout.

Each builder writes ``<folder>/data/<split>-00000-of-00001.parquet`` (one split per language, as
the Hub sets are laid out) with the columns the reference evaluation reads, pictures generated
here (coloured shapes from the demo world's probe pictures, so the demo VLM can answer some).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import datasets
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


def picture(colour: str, shape: str = "circle", size: int = 64) -> bytes:
    """A PNG of one coloured shape on white."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _write(folder: Path, split: str, rows: dict, features: datasets.Features) -> None:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))


def colours(n: int) -> list[str]:
    names = list(COLOURS)
    return [names[i % len(names)] for i in range(n)]


def build_xgqa(folder: Path, languages=("de", "zh"), n: int = 6) -> Path:
    """neulab/PangeaBench-xgqa: image (Image), question, answer (English)."""
    questions = {"de": "Welche Farbe hat die Form?", "zh": "这个形状是什么颜色？"}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    for lang in languages:
        cs = colours(n)
        rows = {
            "image": [{"bytes": picture(c), "path": None} for c in cs],
            "question": [questions.get(lang, "What colour is the shape?") for _ in cs],
            "answer": cs,
        }
        _write(folder, lang, rows, features)
    return folder


def build_maxm(folder: Path, languages=("fr", "zh"), n: int = 4) -> Path:
    """neulab/PangeaBench-maxm: image as encoded bytes (a {bytes, path} struct, not an Image
    feature), question, answers (list), image_id."""
    names = {"fr": ["rouge", "bleu", "vert"], "zh": ["红色", "蓝色", "绿色"]}
    features = datasets.Features(
        {
            "image": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "question": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "image_id": datasets.Value("string"),
        }
    )
    for lang in languages:
        cs = colours(n)
        rows = {
            "image": [{"bytes": picture(c), "path": None} for c in cs],
            "question": ["De quelle couleur est la forme ?" if lang == "fr" else "形状是什么颜色？"]
            * n,
            "answers": [[names[lang][list(COLOURS).index(c)], c] for c in cs],
            "image_id": [f"{lang}{i:03d}" for i in range(n)],
        }
        _write(folder, lang, rows, features)
    return folder


def build_marvl(folder: Path, languages=("id", "zh"), n: int = 4) -> Path:
    """neulab/PangeaBench-marvl: image (Image), conversations (LLaVA style), id."""
    turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conversations": [turn],
            "id": datasets.Value("string"),
        }
    )
    for lang in languages:
        cs = colours(n)
        claims = [(c, "red") for c in cs]
        rows = {
            "image": [{"bytes": picture(c), "path": None} for c in cs],
            "conversations": [
                [
                    {"from": "human", "value": f"<image>\nThe shape is {claim}"},
                    {"from": "gpt", "value": "true" if c == claim else "false"},
                ]
                for c, claim in claims
            ],
            "id": [f"{lang}-marvl-{i}" for i in range(n)],
        }
        _write(folder, lang, rows, features)
    return folder


def build_m3exam(folder: Path, languages=("english", "chinese"), n: int = 4) -> Path:
    """neulab/PangeaBench-m3exam: language, subject_category, question_text, options,
    answer_text, background_description, image_0 .. image_9 (base64 text or "None")."""
    string = datasets.Value("string")
    spec = {
        "language": string,
        "subject_category": string,
        "question_text": string,
        "options": datasets.Sequence(string),
        "answer_text": string,
        "background_description": datasets.Sequence(string),
    }
    spec |= {f"image_{i}": string for i in range(10)}
    features = datasets.Features(spec)
    for lang in languages:
        cs = colours(n)
        rows: dict[str, list] = {k: [] for k in spec}
        for i, c in enumerate(cs):
            options = [f"({chr(65 + j)}) {name}" for j, name in enumerate(COLOURS)]
            rows["language"].append(lang)
            rows["subject_category"].append("natural-science")
            rows["question_text"].append("What colour is the shape? (image)[image-0.png]")
            rows["options"].append(options)
            rows["answer_text"].append(
                chr(65 + list(COLOURS).index(c)) if i % 2 else str(1 + list(COLOURS).index(c))
            )
            rows["background_description"].append([] if i % 2 else ["A picture of one shape."])
            encoded = base64.b64encode(picture(c)).decode()
            pictures = [encoded] + (["None"] * 9 if i != n - 1 else [encoded] + ["None"] * 8)
            for k in range(10):
                rows[f"image_{k}"].append(pictures[k])
        _write(folder, lang, rows, features)
    return folder


BUILDERS = {"xgqa": build_xgqa, "maxm": build_maxm, "marvl": build_marvl, "m3exam": build_m3exam}


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.benchmark_data OUT [--n N]``: write the four local copies under OUT."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=48, help="questions per language")
    args = parser.parse_args(argv)
    for name, build in BUILDERS.items():
        print(build(args.out / name, n=args.n))


if __name__ == "__main__":
    main()
