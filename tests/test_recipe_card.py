"""Recipes replay from anywhere; the model card is one the Hub and people can use; output folders
get the umask's modes; the CLI lists its commands. Real merges of the tiny LLaVA trio."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html import escape as html_escape
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.repocard import metadata_load

from dim3 import engine
from dim3.cli import SUBCOMMANDS, main
from dim3.recipe import RECIPE_FILE, Recipe, Source, model_card
from tests.test_engine import load_all

ROOT = Path(__file__).resolve().parent.parent


def _copy_trio(trio, dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True)
    return {
        role: Path(shutil.copytree(getattr(trio, role), dest / role))
        for role in ("base", "multilingual", "multimodal")
    }


def test_a_recipe_of_relative_local_folders_replays_from_any_folder(
    tiny_llava_trio, tmp_path, monkeypatch, capsys
):
    project = tmp_path / "project"
    _copy_trio(tiny_llava_trio, project / "models")
    monkeypatch.chdir(project)
    args = ["--base", "models/base", "--multilingual", "models/multilingual"]
    assert main(["merge", *args, "--multimodal", "models/multimodal", "--out", "merged"]) == 0
    saved = json.loads((project / "merged" / RECIPE_FILE).read_text())
    assert saved["base"]["ref"] == "models/base"  # as the user wrote it
    assert saved["local"]["base"] == {
        "absolute": str((project / "models" / "base").resolve()),
        "relative_to_recipe": os.path.join("..", "models", "base"),
    }
    first = load_all(project / "merged")

    # 1. from another working folder: found at the recorded absolute path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = str(project / "merged" / RECIPE_FILE)
    assert main(["merge", "--recipe", recipe, "--out", "again"]) == 0
    assert all(torch.equal(first[k], v) for k, v in load_all(elsewhere / "again").items())

    # 2. the whole tree moved: found relative to the recipe
    moved = tmp_path / "moved"
    project.rename(moved)
    recipe = str(moved / "merged" / RECIPE_FILE)
    assert main(["merge", "--recipe", recipe, "--out", "third"]) == 0
    assert all(torch.equal(first[k], v) for k, v in load_all(elsewhere / "third").items())
    replayed = json.loads((elsewhere / "third" / RECIPE_FILE).read_text())
    assert replayed["local"]["multimodal"]["absolute"] == str(moved / "models" / "multimodal")

    # 3. gone: the error names the role and every place looked, and writes nothing
    shutil.rmtree(moved / "models" / "multilingual")
    capsys.readouterr()
    assert main(["merge", "--recipe", recipe, "--out", "fourth"]) == 2
    err = capsys.readouterr().err
    assert "multilingual folder 'models/multilingual' is missing" in err
    assert str(moved / "merged" / ".." / "models" / "multilingual") in err
    assert str(project / "models" / "multilingual") in err
    assert not (elsewhere / "fourth").exists()


def test_hub_sources_are_left_as_hub_ids_on_load(tmp_path):
    recipe = Recipe(Source("org/base", "v1"), Source("org/ml"), Source("org/vlm"))
    path = tmp_path / RECIPE_FILE
    path.write_text(json.dumps(recipe.to_dict() | {"resolved": {}, "local": {}}))
    assert Recipe.load(path) == recipe


def test_output_folder_gets_the_umask_modes(tiny_llava_trio, tmp_path):
    old = os.umask(0o022)
    try:
        recipe = Recipe(
            Source(str(tiny_llava_trio.base)),
            Source(str(tiny_llava_trio.multilingual)),
            Source(str(tiny_llava_trio.multimodal)),
        )
        engine.merge_to_folder(recipe, tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in (tmp_path / "out").iterdir())


def test_model_card_metadata_for_the_hub():
    recipe = Recipe(
        Source("meta-llama/Llama-2-7b-hf"),
        (Source("MaLA-LM/emma-500-llama2-7b"), Source("org/ja-expert")),
        Source("llava-hf/llava-1.5-7b-hf"),
        method="ties",
        dtype="auto",
    )
    cards = {
        "multilingual_1": {"language": ["de", "zh"]},
        "multilingual_2": {"language": "ja"},
        "multimodal": {"language": ["en"], "license": "llama2"},
    }
    card = model_card(
        recipe, {"merged": 3, "copied": 2, "padded": 1}, {}, dtype="bfloat16", source_cards=cards
    )
    front = card.split("---")[1]
    meta = yaml.safe_load(front)
    assert meta["base_model"] == [
        "meta-llama/Llama-2-7b-hf",
        "MaLA-LM/emma-500-llama2-7b",
        "org/ja-expert",
        "llava-hf/llava-1.5-7b-hf",
    ]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["language"] == ["de", "zh", "ja", "en"]
    assert meta["license"] == "llama2"
    assert len(meta["tags"]) == len(set(meta["tags"])) and "ties" in meta["tags"]
    assert "Output dtype: `bfloat16`" in card and "`auto`" not in card


def test_model_card_tables_keep_each_value_in_its_cell():
    """A visitor's folder or revision name may carry what Markdown reads: the card's tables still
    have one cell per column, each showing the value as written (line breaks as '?'), and no HTML
    of theirs comes through. Rendered as the Hub renders it (CommonMark with GFM tables)."""
    from markdown_it import MarkdownIt

    odd = {
        "base": ("/models/a|b", "<script>alert(1)</script>|x"),
        "multilingual": ("/models/tick`s ``here``", None),
        "multimodal": ("/models/line\nbreak\\", "v1"),
    }
    recipe = Recipe(
        Source(*odd["base"]), (Source(*odd["multilingual"]),), Source(*odd["multimodal"])
    )
    resolved = {"base": "abc|def", "multilingual": None, "multimodal": "0123"}
    card = model_card(recipe, {"merged": 1, "copied": 0, "padded": 0}, resolved)
    html = MarkdownIt("commonmark").enable("table").render(card)
    assert "<script" not in html and "&lt;script&gt;" in html
    rows = re.findall(r"<tr>\n<td>(multilingual|base|multimodal)</td>\n(.*?)</tr>", html, re.S)
    assert [role for role, _ in rows] == ["base", "multilingual", "multimodal"]
    for role, rest in rows:
        cells = re.findall(r"<td>(.*?)</td>", rest, re.S)
        ref, revision = odd[role]
        want_ref = ref.replace("\n", "?")
        assert len(cells) == 3 and cells[0] == f"<code>{html_escape(want_ref)}</code>"
        assert cells[1] == (f"<code>{html_escape(revision)}</code>" if revision else "default")
        assert cells[2] == (f"<code>{resolved[role]}</code>" if resolved[role] else "local")


def test_model_card_of_a_real_merge_loads_and_its_snippet_runs(tiny_llava_trio, tmp_path):
    """The card's front matter parses as the Hub parses it; its "Use it" snippet, run as written
    (path and picture filled in), loads the merge and answers a picture question."""
    trio = _copy_trio(tiny_llava_trio, tmp_path / "in")
    (trio["multimodal"] / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# a VLM\n"
    )
    recipe = Recipe(*(Source(str(trio[r])) for r in ("base", "multilingual", "multimodal")))
    engine.merge_to_folder(recipe, tmp_path / "out")
    card_path = tmp_path / "out" / "README.md"
    meta = metadata_load(card_path)
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["library_name"] == "transformers" and "base_model" not in meta  # local only
    dtypes = {str(t.dtype).removeprefix("torch.") for t in load_all(tmp_path / "out").values()}
    assert f"Output dtype: `{', '.join(sorted(dtypes))}` (the VLM's own)" in card_path.read_text()

    snippet = re.search(r"```python\n(.*?)```", card_path.read_text(), re.S).group(1)
    from PIL import Image

    Image.new("RGB", (40, 40), "red").save(tmp_path / "picture.png")
    snippet = snippet.replace("PATH_OR_HUB_ID_OF_THIS_MODEL", str(tmp_path / "out"))
    snippet = snippet.replace('"picture.png"', repr(str(tmp_path / "picture.png")))
    run = subprocess.run(
        [sys.executable, "-c", snippet],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_cli_help_lists_every_command_in_plain_words():
    out = subprocess.run(
        [sys.executable, "-m", "dim3", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    ).stdout
    assert "``" not in out
    for name, (_, text) in SUBCOMMANDS.items():
        assert re.search(rf"^  {name}\s+{re.escape(text)}$", out, re.M), name


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_command_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert SUBCOMMANDS[name][1] in " ".join(capsys.readouterr().out.split())  # argparse wraps


def test_plan_and_merge_state_the_output_size_in_the_output_dtype(
    tiny_llava_trio, tmp_path, capsys
):
    """``--dtype bfloat16`` of a float32 VLM: the plan and the merge say the size the written
    tensors have (counted from the written files' headers), not the VLM's own."""
    from safetensors import safe_open

    from dim3.sizes import human_size

    trio = tiny_llava_trio
    args = ["--base", str(trio.base), "--multilingual", str(trio.multilingual)]
    args += ["--multimodal", str(trio.multimodal)]

    def written(folder):
        total = 0
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), "pt") as f:
                total += sum(f.get_tensor(k).nbytes for k in f.keys())
        return total

    sizes = {}
    for dtype in ("auto", "bfloat16"):
        assert main(["plan", *args, "--dtype", dtype]) == 0
        planned = capsys.readouterr().out
        out = tmp_path / dtype
        assert main(["merge", *args, "--dtype", dtype, "--out", str(out)]) == 0
        merged = capsys.readouterr().out
        sizes[dtype] = written(out)
        line = f"Output size: {human_size(sizes[dtype])} in "
        assert line in planned and line in merged, (planned, sizes)
        assert ("(bfloat16)" in planned) == (dtype == "bfloat16")
    assert sizes["bfloat16"] * 2 == sizes["auto"]  # the tiny VLM is float32
