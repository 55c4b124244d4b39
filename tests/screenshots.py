"""Take the README's and docs' screenshots: ``python -m tests.screenshots [--out DIR] [--phone]``.

An explicit command, never run by the tests (pytest collects only ``test_*.py``): it starts
``python app.py`` offline on the demo trio like the browser tests do (``tests.app_server``),
drives headless Chromium through every tab and writes one PNG per view into ``--out``
(default ``assets/screenshots``):

- ``merge.png``: the Merge tab after a DiM3 merge, with the heat map of its weights;
- ``chat.png``: the side-by-side chat answering a Chinese question about a picture;
- ``heatmap.png``: the heat map alone (Analysis tab, DiM3's weights per layer and module);
- ``analysis.png``, ``represent.png``: the Analysis tab's diagnostics and representations;
- ``evaluate.png``, ``sweep.png``: the Evaluate tab's chart and a small sweep;
- with ``--phone``, each again at a phone's 390 px width as ``NAME-phone.png``.

It lives beside the browser tests because it drives the same real server and browser. It first
checks that fonts for every example language are installed (Debian: ``fonts-noto-core``,
``fonts-noto-cjk``, ``fonts-noto-color-emoji``) and stops with that list if not, so that no
screenshot shows empty boxes where CJK, Indic or emoji text should be. Images are downscaled to
at most 1000 px wide and stored with a 256-colour octree palette (small, colours kept).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.app_server import ROOT, running_app

CHROMIUM = os.environ.get("DIM3_CHROMIUM", "/usr/bin/chromium")
TIMEOUT = 180_000  # ms: a merge, an evaluation or a sweep on a busy 2-core machine
# family name that must be installed -> the Debian package that has it
FONTS = {
    "Noto Sans": "fonts-noto-core",
    "Noto Sans Arabic": "fonts-noto-core",
    "Noto Sans Devanagari": "fonts-noto-core",
    "Noto Sans CJK": "fonts-noto-cjk",
    "Noto Color Emoji": "fonts-noto-color-emoji",
}
WIDTHS = {"": 1400, "-phone": 390}


def missing_fonts() -> list[str]:
    """The families of :data:`FONTS` that fontconfig does not list."""
    try:
        listed = subprocess.run(
            ["fc-list", ":", "family"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return list(FONTS)
    return [f for f in FONTS if f not in listed]


def save(page, target, path: Path) -> None:
    """A PNG of ``target`` (a locator, or the page for the whole page), downscaled, palette."""
    from PIL import Image

    raw = path.with_suffix(".raw.png")
    if target is page:
        page.screenshot(path=str(raw), full_page=True)
    else:
        target.screenshot(path=str(raw))
    with Image.open(raw) as img:
        img = img.convert("RGB")
        if img.width > 1000:
            img = img.resize((1000, round(img.height * 1000 / img.width)), Image.Resampling.LANCZOS)
        # 256 colours by octree, no dithering: small files, and the methods' colours kept
        # (a median-cut palette visibly shifted them)
        img = img.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        img.save(path, optimize=True)
    raw.unlink()
    print(f"wrote {path}")


def wait_status(page, selector: str) -> str:
    status = page.locator(selector)
    status.filter(has_text="✅").or_(status.filter(has_text="❌")).first.wait_for()
    return status.inner_text()


def run_views(page, out: Path, suffix: str) -> None:
    """Every view, in the order a visitor goes through them."""
    page.click("#dim3-tab-merge-button")
    page.click("#dim3-merge")
    page.locator("#dim3-merge-status").filter(has_text="Merged").wait_for()
    page.locator("#dim3-merge-heatmap img").wait_for()
    save(page, page, out / f"merge{suffix}.png")

    page.click("#dim3-tab-chat-button")
    chip = page.locator("#dim3-examples button").filter(has_text="中文").first
    chip.click()
    page.wait_for_selector("#dim3-box .thumbnail-item")
    page.press("#dim3-box textarea", "Enter")
    page.wait_for_function(
        """() => ['#dim3-original', '#dim3-merged'].every(pane => {
            const bots = document.querySelectorAll(pane + " [data-testid='bot']");
            const last = bots[bots.length - 1];
            return last && last.innerText.trim() !== '' && last.innerText.trim() !== '…';
        }) && !document.querySelector('#dim3-box textarea').disabled"""
    )
    save(page, page, out / f"chat{suffix}.png")

    page.click("#dim3-tab-evaluate-button")
    page.click("#dim3-evaluate")
    wait_status(page, "#dim3-eval-status")
    page.locator("#dim3-eval-chart img").wait_for()
    save(page, page, out / f"evaluate{suffix}.png")

    n = page.locator("#dim3-sweep-n input[type=number]")
    n.fill("8")
    n.press("Enter")
    page.fill("#dim3-sweep-grid textarea", "density=0.3,0.7")
    page.click("#dim3-sweep")
    wait_status(page, "#dim3-sweep-status")
    page.locator("#dim3-sweep-plot img").wait_for()
    save(page, page.locator("#dim3-sweep-status").locator(".."), out / f"sweep{suffix}.png")

    page.click("#dim3-tab-analysis-button")
    page.click("#dim3-diagnose")
    wait_status(page, "#dim3-analysis-status")
    page.locator("#dim3-analysis-heatmap img").wait_for()
    save(page, page.locator("#dim3-analysis-heatmap img"), out / f"heatmap{suffix}.png")
    save(page, page, out / f"analysis{suffix}.png")

    page.click("#dim3-represent")
    wait_status(page, "#dim3-rep-status")
    page.locator("#dim3-rep-map img").wait_for()
    save(page, page.locator("#dim3-rep-status").locator(".."), out / f"represent{suffix}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshots")
    parser.add_argument("--phone", action="store_true", help="also at 390 px (NAME-phone.png)")
    parser.add_argument("--only-phone", action="store_true", help="only at 390 px")
    args = parser.parse_args(argv)
    missing = missing_fonts()
    if missing:
        packages = sorted({FONTS[f] for f in missing})
        print(
            f"missing fonts: {', '.join(missing)}; install {' '.join(packages)} "
            "(apt-get install) so that every example language renders",
            file=sys.stderr,
        )
        return 2
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    widths = {"-phone": 390} if args.only_phone else WIDTHS if args.phone else {"": 1400}
    with tempfile.TemporaryDirectory(prefix="dim3-shots-") as tmp:
        scratch = Path(tmp)
        with running_app(scratch, [ROOT / "assets", scratch]) as url, sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu"],
            )
            for suffix, width in widths.items():
                page = browser.new_page(
                    viewport={"width": width, "height": 900}, device_scale_factor=1
                )
                page.set_default_timeout(TIMEOUT)
                page.goto(url, wait_until="load")
                page.wait_for_selector("#dim3-merge")
                run_views(page, args.out, suffix)
                page.close()
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
