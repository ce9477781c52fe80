"""The documentation site: it builds with ``mkdocs build --strict`` (no broken link, no missing page), its home
and speed pages render in headless Chromium, and the speed page's plots are drawn from the current figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_review import browser, wait_for  # noqa: F401 - the review tests' headless Chromium

REPO = Path(__file__).resolve().parent.parent


def test_the_benchmark_plots_are_drawn_from_the_current_figures_and_shown(tmp_path):
    figures = json.loads((REPO / "docs" / "figures.json").read_text())
    proc = subprocess.run([sys.executable, "bench/plots.py", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    drawn = sorted(p.name for p in tmp_path.glob("bench-*.png"))
    assert drawn == sorted(f"bench-{name}.png" for name in figures)
    speed = (REPO / "docs" / "speed.md").read_text()
    for name, figure in figures.items():
        assert f"assets/bench-{name}.png" in speed, name  # shown on the site ...
        assert (REPO / "docs" / "assets" / f"bench-{name}.png").is_file(), name  # ... as committed
        assert figure["command"].startswith(("python bench/", "make ", "spp-curate ")), figure["command"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built with ``mkdocs build --strict`` (a broken link or a missing page fails it)."""
    out = tmp_path_factory.mktemp("site") / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_site_builds_strict(site):
    """Runs wherever the suite runs, browser or not: CI builds the site with --strict."""
    for page in ("index.html", "speed/index.html", "building/index.html", "releases/index.html"):
        assert (site / page).is_file(), page


def test_the_site_renders_with_its_plots(site, tmp_path, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    for page, heading, plots in (("index.html", "spp-curate", 0), ("speed/index.html", "Speed", 3)):
        browser.get((site / page).as_uri())
        title = wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "article h1").text)
        assert heading in title, title
        images = browser.find_elements(By.CSS_SELECTOR, "article img")
        assert len(images) >= plots
        wait_for(lambda: all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                             for i in images))
        shot = tmp_path / f"{page.replace('/', '-')}.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
