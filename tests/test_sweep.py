"""``python -m dim3 sweep``: grid parsing, the fixed tuning/reporting split, selection, the
Pareto front, a CLI run on the demo trio, and both new views in a real browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dim3 import cli
from dim3.demo import demo_probe
from dim3.plots import pareto_front
from dim3.probes import ProbeItem, split_units
from dim3.sweep import (
    SweepPoint,
    grid_points,
    parse_grid,
    scores,
    select,
)


def test_grid_parses_numbers_and_fails_clearly():
    assert parse_grid(["density=0.1, 0.2", "seed=1,2"]) == {"density": [0.1, 0.2], "seed": [1, 2]}
    for bad, message in (
        ("density", "KEY=V1,V2"),
        ("density=", "no key or no values"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_grid([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["density=0.1", "density=0.2"])


def test_grid_points_are_the_product_checked_by_the_method():
    points = grid_points("ties", {"density": [0.1, 0.3], "scaling": [0.5, 1, 2]})
    assert len(points) == 6 and {"density": 0.3, "scaling": 2} in points
    with pytest.raises(ValueError, match=r"grid point .*density.*ties"):
        grid_points("ties", {"density": [0.5, 7.0]})
    with pytest.raises(ValueError, match="unknown option"):
        grid_points("dim3", {"density": [0.5]})


def _items(n_pictures: int) -> list[ProbeItem]:
    return [
        ProbeItem("q", "a", lang, image=Path(f"/p/{i}.png"), kind=kind)
        for i in range(n_pictures)
        for lang in ("en", "de", "zh")
        for kind in ("colour", "shape")
    ]


def test_split_is_disjoint_fixed_and_by_picture():
    items = _items(11)
    tune, report = split_units(items)
    assert sorted(tune + report) == list(range(len(items))) and not set(tune) & set(report)
    assert (tune, report) == split_units(items)  # fixed
    assert split_units(items, seed=1) != (tune, report)  # the seed decides it
    pictures = [{items[i].image for i in half} for half in (tune, report)]
    assert not pictures[0] & pictures[1]  # one picture never lands in both halves
    assert len(pictures[0]) == 6 and len(pictures[1]) == 5
    # text-only: the n-th question of every language goes to the same half
    text = [ProbeItem(f"q{i}", "a", lang) for lang in ("en", "de") for i in range(6)]
    t_tune, _ = split_units(text)
    firsts = {(text[i].question) for i in t_tune if text[i].language == "en"}
    assert firsts == {text[i].question for i in t_tune if text[i].language == "de"}


def test_demo_probe_split_halves_keep_every_language():
    items = demo_probe()
    tune, report = split_units(items)
    for half in (tune, report):
        langs = {items[i].language for i in half}
        assert len(langs) == 8
    assert abs(len(tune) - len(report)) <= 16  # 60 pictures each, 16 questions per picture


def test_scores_add_mean_and_non_english_mean():
    items = [ProbeItem("q", "a", "en"), ProbeItem("q", "b", "de"), ProbeItem("q", "c", "zh")]
    s = scores(items, ["a", "b", "x"])
    assert s["en"] == 1 and s["de"] == 1 and s["zh"] == 0
    assert s["mean"] == pytest.approx(2 / 3) and s["others"] == pytest.approx(0.5)


def _point(label, kind, tune, report):
    return SweepPoint(label, kind, "ties", {}, {"mean": tune}, {"mean": report})


def test_selection_uses_the_tuning_half_only_and_prefers_the_default_on_ties():
    points = [
        _point("original", "original", 0.9, 0.9),
        _point("ties (default)", "default", 0.5, 0.1),
        _point("ties density=0.4", "grid", 0.5, 0.9),
        _point("ties density=0.8", "grid", 0.4, 0.95),
    ]
    assert select(points, "mean").label == "ties (default)"  # original is no candidate
    points.append(_point("ties density=0.6", "grid", 0.6, 0.0))
    assert select(points, "mean").label == "ties density=0.6"  # whatever the report half says


def test_pareto_front_by_hand():
    pts = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.5, 0.2)]
    assert pareto_front(pts) == [0, 1, 3]


def test_cli_sweep_on_the_demo_trio(tmp_path):
    out, plot = tmp_path / "sweep.json", tmp_path / "pareto.png"
    rc = cli.main(
        ["sweep", "--method", "ties", "--option", "density=0.2,0.6", "--references",
         "task_arithmetic", "--per-language", "4", "--json", str(out), "--plot", str(plot)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    labels = [p["label"] for p in data["points"]]
    # density=0.2 is the default: scored once, as the default
    assert labels == ["original", "task_arithmetic (default)", "ties (default)", "ties density=0.6"]
    assert data["split"]["tuning_questions"] + data["split"]["report_questions"] == 32
    for p in data["points"]:
        for half in ("tuning", "report"):
            assert set(p[half]) == {
                "en",
                "de",
                "es",
                "ru",
                "zh",
                "ar",
                "hi",
                "sw",
                "overall",
                "mean",
                "others",
            }
    original = data["points"][0]
    assert original["tuning"]["en"] > 0.5 and original["tuning"]["others"] == 0.0
    candidates = [p for p in data["points"] if p["kind"] in ("default", "grid")]
    best = max(candidates, key=lambda p: p["tuning"]["mean"])
    assert data["chosen"]["label"] == best["label"]
    assert data["chosen"]["report"] == best["report"]
    assert data["points"][3]["options"] == {"density": 0.6, "scaling": 1.0}
    with Image.open(plot) as img:
        img.verify()


def test_cli_sweep_refuses_bad_grids_before_loading(tmp_path, capsys):
    rc = cli.main(
        [
            "sweep",
            "--method",
            "ties",
            "--option",
            "density=0.5,3",
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "density" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.json").exists()


# --- the app ----------------------------------------------------------------------------------


try:  # the app fixtures of the main browser test (a server of this module's own)
    from tests.test_app_browser import browser, merge, open_app, screenshot, server  # noqa: F401

    HAVE_BROWSER = True
except (ImportError, pytest.skip.Exception):
    HAVE_BROWSER = False


@pytest.mark.browser
@pytest.mark.skipif(not HAVE_BROWSER, reason="needs Playwright and Chromium")
def test_represent_and_sweep_views_in_the_browser(server, browser):
    url, _ = server
    page = open_app(browser, url)
    assert "Merged" in merge(page)

    page.click("#dim3-tab-analysis-button")
    page.click("#dim3-represent")
    status = page.locator("#dim3-rep-status")
    status.filter(has_text="✅").or_(status.filter(has_text="❌")).wait_for()
    text = status.inner_text()
    assert "✅" in text and "original, merged" in text, text
    page.locator("#dim3-rep-map img").wait_for()  # matplotlib: an image (the label icon is hidden)
    screenshot(page, "represent")

    page.click("#dim3-tab-evaluate-button")
    n = page.locator("#dim3-sweep-n input[type=number]")
    n.fill("8")
    n.press("Enter")
    page.fill("#dim3-sweep-grid textarea", "density=0.6")
    page.uncheck("#dim3-sweep-refs input[type=checkbox]")  # no reference methods: quicker
    page.click("#dim3-sweep")
    status = page.locator("#dim3-sweep-status")
    status.filter(has_text="✅").or_(status.filter(has_text="❌")).wait_for()
    assert "Chosen on the tuning half" in status.inner_text(), status.inner_text()
    table = page.locator("#dim3-sweep-table").inner_text()
    assert "original" in table and "ties (default)" in table and "ties density=0.6" in table
    assert "dim3 (default)" not in table
    screenshot(page, "sweep")
    page.click("#dim3-sweep-send")
    status.filter(has_text="The Merge tab is set to").wait_for()
    page.click("#dim3-tab-merge-button")
    method = page.locator("#dim3-tab-merge").get_by_label("Method", exact=True)
    assert method.input_value().startswith("ties"), method.input_value()
    page.close()
