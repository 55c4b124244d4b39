"""dim3.paths: the app's save destination stays inside the output folder; paths shown to
visitors carry no absolute server path."""

from __future__ import annotations

import os

import pytest

from dim3.paths import DestinationError, public_path, redact_paths, save_destination


def test_a_plain_name_inside_the_output_folder_is_accepted(tmp_path):
    assert save_destination(tmp_path, "my-merge") == tmp_path / "my-merge"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_bytes(b"x")
    assert save_destination(tmp_path, "old") == tmp_path / "old"


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", "", ".hidden", "x" * 101, "nul\0"])
def test_names_that_are_paths_are_refused(tmp_path, name):
    with pytest.raises(DestinationError, match="simple name"):
        save_destination(tmp_path, name)


def test_the_folder_the_server_keeps_its_fishers_in_is_no_save_name(tmp_path):
    """A visitor's save named as the Fisher cache would take it over: another visitor's fisher
    merge would write into the saved model, and the save's overwrite would delete every
    visitor's Fishers."""
    from dim3.fisher import FISHER_ROOT

    (tmp_path / FISHER_ROOT).mkdir()
    with pytest.raises(DestinationError, match=f"{FISHER_ROOT!r} is the server's own"):
        save_destination(tmp_path, FISHER_ROOT)
    assert save_destination(tmp_path, FISHER_ROOT + "-2") == tmp_path / (FISHER_ROOT + "-2")


def test_a_name_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DestinationError, match="'link' in the output folder is a symbolic link"):
        save_destination(out, "link")
    assert (outside / "precious.txt").read_text() == "keep me"


def test_a_symlink_deeper_inside_the_destination_is_refused(tmp_path):
    out = tmp_path / "outputs"
    (out / "merge" / "sub").mkdir(parents=True)
    (out / "merge" / "sub" / "escape").symlink_to(tmp_path)
    with pytest.raises(DestinationError, match=r"contains a symbolic link \(sub/escape\)"):
        save_destination(out, "merge")


def test_an_output_folder_under_a_symlink_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    with pytest.raises(DestinationError, match="under a symbolic link"):
        save_destination(tmp_path / "alias", "merge")


def test_public_paths_and_redaction(tmp_path, monkeypatch):
    root = tmp_path / "models"
    (root / "vlm").mkdir(parents=True)
    work = tmp_path / "work"
    (work / "assets" / "demo").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert public_path(work / "assets" / "demo", [root]) == "./assets/demo"
    assert public_path(root / "vlm", [root]) == "models/vlm"
    assert public_path("/etc/passwd", [root]) == "…/passwd"
    text = f"cannot read {root / 'vlm'}/config.json; allowed: {root}, {os.getcwd()}"
    shown = redact_paths(text, [root])
    assert str(tmp_path) not in shown
    assert shown == "cannot read models/vlm/config.json; allowed: models, ."
