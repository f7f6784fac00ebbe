"""The leaderboard (``iclgym.bench.leaderboard``): its table is :func:`summarize` of each
(model, config hash), ranked by coverage then IQM; the Markdown lists every model; the HTML page is
self-contained and, in a real headless Chromium, shows every row, renders the plot and sorts
on a header click."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from iclgym.bench import SUITE, SUITE_VERSION, ResultRow, ResultsStore
from iclgym.bench.leaderboard import (
    leaderboard_table,
    render_html,
    render_markdown,
    screenshot,
    size_class,
)
from iclgym.bench.run import summarize
from iclgym.browser import find_chrome, headless_chrome

ENTRIES = [e.name for e in SUITE[:3]]
FLOOR = np.array([0.5, 1.0, 1.5, 2.0, 0.8, 1.2])
# model -> (parameters, entry scores (None: not run), noise on the model's excess, verified)
MODELS = {
    "tiny-lstm": (5_000, (0.9, 0.5, 0.3), 0.0, True),
    "mid-transformer": (250_000, (0.95, 0.8, 0.6), 0.05, False),
    "big-mamba": (2_000_000, (0.99, 0.98, None), 0.0, False),  # best IQM, but not every entry
    "ngram:2": (0, (0.4, 0.3, 0.2), 0.0, True),  # a parameter-free predictor, scored untrained
}
SEEDS = (0, 1)


def _row(model: str, entry: str, seed: int, score: float, params: int, noise: float):
    """A well-formed row whose model excess is (1 - score) x the floor's (plus noise): its
    normalised score is exactly ``score`` without noise, on every bootstrap resample. The
    parameter count grows a little with the entry, like a real model's vocabulary-sized
    embedding (0 stays 0: a parameter-free predictor, with no training FLOPs)."""
    rng = np.random.default_rng([seed, len(model), len(entry)])
    excess = (1.0 - score) * FLOOR * (1.0 + noise * rng.standard_normal(len(FLOOR)))
    return ResultRow(
        suite_version=SUITE_VERSION, entry=entry, model=model, config_hash=f"{model}-cfg",
        seed=seed, fingerprint="f" * 64, iclgym_version="0.1.0", git_commit="deadbeef",
        parameters=params and params + len(entry), train_flops=1e12 if params else 0.0,
        wall_s=30.0, device="cpu",
        scores={"excess_loss": float(excess.mean()), "accuracy": 0.5, "score": score,
                "sequence_excess": excess.tolist(), "floor_sequence_excess": FLOOR.tolist()},
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("board") / "results.db"
    with ResultsStore(path) as results:
        for model, (params, scores, noise, verified) in MODELS.items():
            for entry, score in zip(ENTRIES, scores, strict=True):
                for seed in SEEDS:
                    if score is not None:
                        row_id = results.add(_row(model, entry, seed, score, params, noise))
                        if verified:
                            results.mark_verified(row_id)
        stale = _row("old-model", ENTRIES[0], 0, 0.99, 10, 0.0)
        results.add(replace(stale, suite_version="iclgym-suite-old"))
    return path


@pytest.fixture(scope="module")
def board(store):
    return leaderboard_table(store)


def test_table_is_summarize_per_model_ranked_by_coverage_then_iqm(store, board):
    assert [r.model for r in board] == ["mid-transformer", "tiny-lstm", "ngram:2", "big-mamba"]
    assert [r.rank for r in board] == [1, 2, 3, 4]
    names = [e.name for e in SUITE]
    with ResultsStore(store) as results:
        for r in board:
            rows = results.rows(suite_version=SUITE_VERSION, model=r.model)
            summary = summarize(rows, names)
            assert r.iqm == summary["iqm"] and r.iqm_ci == tuple(summary["iqm_ci"])
            assert set(r.scores) == set(summary["entries"])
            for name, e in summary["entries"].items():
                got = r.scores[name]
                assert (got.score, got.ci, got.seeds) == (e["score"], tuple(e["ci"]),
                                                          tuple(e["seeds"]))  # fmt: skip
            assert r.entries == tuple(names) and r.config_hash == f"{r.model}-cfg"
            assert r.runs == len(rows) and r.seeds == SEEDS
            assert r.train_flops == sum(x["train_flops"] for x in rows)
            assert r.wall_s == 30.0 * len(rows)
            assert r.parameters == max(x["parameters"] for x in rows)
    tiny, ngram, big = board[1:]
    assert tiny.iqm == pytest.approx(np.mean([0.9, 0.5, 0.3]))  # IQM of 3 = their mean
    assert tiny.scores[ENTRIES[0]].ci == pytest.approx((0.9, 0.9))  # exact on every resample
    assert big.coverage == 2 and ENTRIES[2] not in big.scores and big.iqm > board[0].iqm
    assert ngram.iqm == pytest.approx(0.3) and ngram.train_flops == 0.0
    assert [r.verified for r in board] == [False, True, True, False]
    assert [r.size for r in board] == ["S", "XS", "-", "M"]
    assert [size_class(n) for n in (0, 1, 99_999, 100_000, 999_999, 10**6, 10**7)] == [
        "-", "XS", "XS", "S", "S", "M", "L"
    ]  # fmt: skip
    assert leaderboard_table(store, "iclgym-suite-old")[0].model == "old-model"
    assert leaderboard_table(store, "iclgym-suite-old")[0].entries == (ENTRIES[0],)


def test_markdown_lists_every_model(board):
    text = render_markdown(board)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(MODELS)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    for r in board:
        assert f"| {r.rank} | {r.model} " in text
    assert "0.57 [0.5" in text and "| 0.90 | 0.50 | 0.30 |" in text
    assert "✅ verified" in text and "self-reported" in text and SUITE_VERSION in text


def test_html_is_self_contained(board, tmp_path):
    path = render_html(board, tmp_path / "leaderboard.html")
    text = path.read_text()
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"<(link|iframe)\b|\bsrc=\"(?!data:)", text)
    assert text.count("<tr data-model=") == len(MODELS) and SUITE_VERSION in text
    assert 'src="data:image/png;base64,' in text
    empty = render_html([], tmp_path / "empty.html").read_text()  # an empty board renders
    assert "<tbody>\n\n</tbody>" in empty and SUITE[-1].name in render_markdown([])
    with pytest.raises(FileNotFoundError, match="no results store"):
        leaderboard_table(tmp_path / "missing.db")


@pytest.mark.skipif(find_chrome() is None, reason="needs chromium and chromedriver on PATH")
def test_html_in_a_real_browser(board, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SE_OFFLINE", "true")
    path = render_html(board, tmp_path / "leaderboard.html")
    with headless_chrome(tmp_path / "profile") as driver:
        driver.get(path.resolve().as_uri())
        assert driver.title == f"iclgym leaderboard — {SUITE_VERSION}"
        assert driver.find_element(By.ID, "suite-version").text == SUITE_VERSION

        def order() -> list[str]:
            rows = driver.find_elements(By.CSS_SELECTOR, "#board tbody tr")
            return [row.get_attribute("data-model") for row in rows]

        assert order() == [r.model for r in board]
        assert driver.execute_script(
            "var i = document.getElementById('plot'); return i.decode().then(function ()"
            " { return i.complete && i.naturalWidth; })"
        ) > 0  # fmt: skip

        def click(label: str) -> None:
            xpath = f"//table[@id='board']/thead//th[normalize-space()='{label}']"
            driver.find_element(By.XPATH, xpath).click()

        by_params = sorted(board, key=lambda r: r.parameters)
        click("params")
        assert order() == [r.model for r in by_params]
        click("params")
        assert order() == [r.model for r in reversed(by_params)]
        click("model")
        assert order() == ["big-mamba", "mid-transformer", "ngram:2", "tiny-lstm"]
        click("model")
        assert order() == ["tiny-lstm", "ngram:2", "mid-transformer", "big-mamba"]
        click(ENTRIES[2])  # big-mamba has no score there: blank, last both ways
        assert order() == ["ngram:2", "tiny-lstm", "mid-transformer", "big-mamba"]
        click(ENTRIES[2])
        assert order() == ["mid-transformer", "tiny-lstm", "ngram:2", "big-mamba"]
        click("#")
        assert order() == [r.model for r in board]
    shot = screenshot(path, tmp_path / "leaderboard.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
