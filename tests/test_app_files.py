"""Files a visitor names, directly or inside a probe or parallel file, stay under the allowed
folders: resolved (symbolic links too) and checked before anything opens or stats them, with a
refusal that names no server path and reads the same whether the outside file exists or not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dim3.paths import OutsideRootsError, allowed_file
from dim3.probes import ProbeError, load_parallel, load_probe
from dim3.represent import parallel_items


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def probe_file(folder: Path, image: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    line = {"image": image, "question": "Colour?", "answer": "red", "language": "en"}
    path = folder / "probe.jsonl"
    path.write_text(json.dumps(line) + "\n")
    return path


def parallel_file(folder: Path, image: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": g, "language": lang, "text": f"{g} {lang}", "image": image}
        for g in ("a", "b")
        for lang in ("en", "de")
    ]
    path = folder / "parallel.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def world(tmp_path):
    """An allowed folder with a picture, and a real readable picture outside it."""
    allowed = tmp_path / "allowed"
    png(allowed / "pics" / "inside.png")
    outside = png(tmp_path / "secret" / "outside.png")
    return allowed, outside


def refusal(load, path: Path, roots) -> str:
    with pytest.raises(ProbeError) as info:
        load(path, allowed_roots=roots)
    return str(info.value)


@pytest.mark.parametrize("load,write", [(load_probe, probe_file), (load_parallel, parallel_file)])
def test_pictures_named_inside_a_file_must_lie_under_the_allowed_folders(world, load, write):
    allowed, outside = world
    roots = [allowed]
    ok = load(write(allowed / "ok", "../pics/inside.png"), allowed_roots=roots)
    assert all(it.image == (allowed / "pics" / "inside.png").resolve() for it in ok)
    cases = {
        "absolute, exists": str(outside),
        "absolute, missing": str(outside.parent / "no_such_file_zz.png"),
        "dot-dot, exists": "../../secret/outside.png",
        "dot-dot, missing": "../../secret/no_such_file_zz.png",
        "system file": "/etc/passwd",
    }
    messages = {}
    for name, image in cases.items():
        text = refusal(load, write(allowed / "bad", image), roots)
        assert "outside the folders this server may read" in text, (name, text)
        assert "secret" not in text and "passwd" not in text and "no_such" not in text, text
        assert "does not exist" not in text and "not a readable" not in text, text
        assert "move the checkpoint" not in text, text
        messages[name] = text
    # Whether the outside file exists cannot be told from the answer.
    assert messages["absolute, exists"] == messages["absolute, missing"]
    assert messages["dot-dot, exists"] == messages["dot-dot, missing"]


@pytest.mark.parametrize("load,write", [(load_probe, probe_file), (load_parallel, parallel_file)])
def test_a_symbolic_link_inside_the_allowed_folder_that_leads_out_is_refused(world, load, write):
    allowed, outside = world
    link = allowed / "pics" / "link.png"
    link.symlink_to(outside)
    folder_link = allowed / "outdir"
    folder_link.symlink_to(outside.parent, target_is_directory=True)
    for image in ("../pics/link.png", "../outdir/outside.png"):
        text = refusal(load, write(allowed / "bad", image), [allowed])
        assert "outside the folders this server may read" in text, text
        assert "secret" not in text and "outside.png" not in text, text
    # The command line (a local user, no allowed roots) keeps reading any path it is given.
    items = load(write(allowed / "cli", str(outside)))
    assert all(it.image == outside for it in items)


def test_the_named_file_itself_is_checked_and_its_refusal_is_about_files(world):
    allowed, outside = world
    out_probe = probe_file(outside.parent / "p", str(outside))
    for path in (out_probe, outside.parent / "p" / "missing.jsonl"):
        text = refusal(load_probe, path, [allowed])
        assert "the probe file lies outside the folders" in text, text
        assert "checkpoint" not in text and "secret" not in text, text
    text = refusal(load_parallel, outside.parent / "p" / "x.jsonl", [allowed])
    assert "the parallel file lies outside" in text
    with pytest.raises(ProbeError, match="parallel file lies outside"):
        parallel_items(str(out_probe), allowed_roots=[allowed])


def test_allowed_file_resolves_before_it_looks(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert allowed_file("a/b.png", [root], relative_to=root) == (root / "a" / "b.png").resolve()
    with pytest.raises(OutsideRootsError, match="outside"):
        allowed_file("../x.png", [root], relative_to=root)
    with pytest.raises(OutsideRootsError, match="NUL"):
        allowed_file("a\0b", [root], relative_to=root)
    # A root given through a symbolic link is compared resolved, too.
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert allowed_file(alias / "x.png", [alias]) == (root / "x.png").resolve()
    assert allowed_file("../x.png", None, relative_to=root) == root / "../x.png"
