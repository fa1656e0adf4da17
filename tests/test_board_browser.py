"""The HTML leaderboard in a real headless browser: Debian's chromium, driven through Debian's
chromedriver by Selenium (the driver path is given, so Selenium Manager never downloads one).
Both boards show the Markdown board's rows, a header click sorts its table, and the page fits
a screenshot. Skipped where chromium, chromedriver or selenium is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_leaderboard import make_record, png_size, write
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.results.formats import display_frame, legend_lines
from fedbench.results.leaderboard import TITLES, Leaderboard, build_leaderboard, load_records

pytestmark = pytest.mark.slow  # behind the slow marker: CI runs it, the quick loop does not

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
By = pytest.importorskip("selenium.webdriver.common.by").By

runner = CliRunner()
WIDTH, HEIGHT = 1366, 900  # a common laptop screen
SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")  # as many sites as the prostate data
# Inside dice per method. hd95 = 10 * (1 - dice), so local's hd95 mean is 10.00 and the others'
# 1.50, 2.00, 5.00: sorted as text "10.00" would come second, sorted as numbers it comes last.
BASE = {"fedbn": 0.85, "fedavg": 0.8, "<i>odd</i> & co": 0.5, "local": 0.0}

ROWS_JS = "return [...arguments[0].rows].map(r => [...r.cells].map(c => c.textContent));"


def site_dice(method: str, seed: int) -> dict[str, float]:
    """Each method's inside dice per site, a little different per seed and site (local's 0 at
    every site: a Dice below 0 is no score a record may hold)."""
    if BASE[method] == 0:
        return dict.fromkeys(SITES, 0.0)
    return {site: BASE[method] + 0.01 * seed - 0.004 * i for i, site in enumerate(SITES)}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Three seeds of each method, and one seed of fedavg + tent outside the federation."""
    folder = tmp_path_factory.mktemp("results")
    for n, method in enumerate(BASE):
        for seed in range(3):
            write(folder, make_record(f"m{n}-s{seed}", method, seed, site_dice(method, seed)))
    tent = make_record("tent-s0", "fedavg", 0, site_dice("fedavg", 0), adapter="tent")
    write(folder, tent)
    return folder


def html_board(results: Path, metric: str) -> Path:
    """The board as the user makes it: `fedbench leaderboard --format html --out board.html`."""
    out = results.parent / f"board-{metric}.html"
    args = ["leaderboard", "--results-dir", str(results), "--metric", metric]
    result = runner.invoke(app, [*args, "--format", "html", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def boards(results) -> dict[str, tuple[Path, Leaderboard]]:
    """Per metric the HTML board's file and the leaderboard it shows, made once for the file."""
    records = load_records(results)[0]
    return {
        metric: (html_board(results, metric), build_leaderboard(records, metric=metric))
        for metric in ("dice", "hd95")
    }


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the whole file."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WIDTH},{HEIGHT}")
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_board(browser, boards: dict, metric: str) -> Leaderboard:
    """Load the metric's HTML board in the browser; return the leaderboard it shows."""
    path, lb = boards[metric]
    browser.get(path.as_uri())
    return lb


def table(browser, regime: str):
    """The regime's table: the one right after the board's heading."""
    heading = browser.find_element(By.XPATH, f"//h2[normalize-space()='{TITLES[regime]}']")
    return heading.find_element(By.XPATH, "following::table[1]")


def cells(browser, regime: str) -> list[list[str]]:
    """The table's text, header row first."""
    return browser.execute_script(ROWS_JS, table(browser, regime))


def column(browser, regime: str, name: str) -> list[str]:
    """One column's body cells, top to bottom."""
    rows = cells(browser, regime)
    return [row[rows[0].index(name)] for row in rows[1:]]


def click_header(browser, regime: str, name: str) -> str:
    """Click a column header as a user does; return the header's aria-sort afterwards."""
    header = table(browser, regime).find_element(By.XPATH, f".//th[normalize-space()='{name}']")
    header.click()
    return header.get_attribute("aria-sort")


def test_both_boards_show_the_markdown_rows_legend_and_title(browser, boards):
    lb = open_board(browser, boards, "dice")
    assert len(browser.find_elements(By.TAG_NAME, "table")) == 2
    for board in lb.boards:
        shown = display_frame(board, lb.metric)
        expected = [list(shown.columns), *shown.astype(str).to_numpy().tolist()]
        assert cells(browser, board.regime) == expected
    assert "odd" in "".join(column(browser, "inside", "method"))
    assert browser.find_elements(By.TAG_NAME, "i") == []  # a method's name is text, not markup
    legend = browser.execute_script(
        "return [...document.querySelectorAll('li')].map(li => li.textContent)"
    )
    assert legend == legend_lines(lb)
    heading = browser.find_element(By.TAG_NAME, "h1").text
    assert "toy" in browser.title and "dice" in browser.title
    assert "toy" in heading and "dice" in heading and "higher is better" in browser.page_source
    resources = browser.execute_script("return performance.getEntriesByType('resource').length")
    assert resources == 0  # standalone: nothing fetched besides the page


def test_header_click_sorts_numbers_as_numbers_best_first_for_hd95(browser, boards):
    open_board(browser, boards, "hd95")
    assert click_header(browser, "inside", "method") == "ascending"
    assert column(browser, "inside", "method") == ["<i>odd</i> & co", "fedavg", "fedbn", "local"]
    assert click_header(browser, "inside", "mean") == "ascending"  # a distance: lowest first
    assert column(browser, "inside", "method") == ["fedbn", "fedavg", "<i>odd</i> & co", "local"]
    assert column(browser, "inside", "mean")[-1].startswith("10.00")
    assert click_header(browser, "inside", "mean") == "descending"  # a second click reverses
    assert column(browser, "inside", "method") == ["local", "<i>odd</i> & co", "fedavg", "fedbn"]
    outside = column(browser, "outside", "rank")
    assert outside == sorted(outside, key=int)  # the other board stays as it was


def test_header_click_sorts_dice_highest_first_and_spread_lowest_first(browser, boards):
    lb = open_board(browser, boards, "dice")
    outside = lb.boards[1].frame
    click_header(browser, "outside", "adapter")
    assert click_header(browser, "outside", "worst site") == "descending"  # an overlap: best high
    by_worst = outside.sort_values("worst", ascending=False, kind="stable")
    assert column(browser, "outside", "method") == list(by_worst["method"])
    assert click_header(browser, "outside", "site sd") == "ascending"  # fairness: small is good
    assert click_header(browser, "outside", "p vs best (Holm)") == "ascending"
    assert column(browser, "outside", "p vs best (Holm)")[-1] == "best"  # no p: always last
    assert click_header(browser, "outside", "rank") == "ascending"
    assert column(browser, "outside", "rank") == [str(r) for r in outside["rank"]]


def test_screenshot_shows_both_boards_without_overflow(browser, boards, tmp_path):
    open_board(browser, boards, "dice")
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(WIDTH, height + 200)
    page_fits = "return document.documentElement.scrollWidth <= window.innerWidth"
    assert browser.execute_script(page_fits)
    tables_fit = "return [...document.querySelectorAll('table')].map(t => t.scrollWidth)"
    widths = browser.execute_script(tables_fit)
    assert len(widths) == 2 and max(widths) <= browser.execute_script("return innerWidth")
    path = Path(os.environ.get("FEDBENCH_BOARD_SCREENSHOT", tmp_path / "board.png"))
    assert browser.save_screenshot(str(path))
    width, shot_height = png_size(path)
    assert width == browser.execute_script("return innerWidth") and shot_height > height / 2
    browser.set_window_size(WIDTH, HEIGHT)
