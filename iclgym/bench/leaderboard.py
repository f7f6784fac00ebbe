"""The leaderboard: the results store (:mod:`iclgym.bench.store`) as one row per (model, config
hash), rendered as a self-contained static HTML page (sortable table, score-vs-parameters plot)
and as a GitHub Markdown table.

Every number comes from :func:`iclgym.bench.run.summarize` on the model's rows: per entry the
normalised score (0 = context-free floor, 1 = Bayes oracle) with its 95% bootstrap interval,
and the interquartile mean over the entries the model has, with its interval. A model missing
entries is still listed (blank cells, ``coverage`` below the suite's size); its IQM is over the
entries it has.

**Size classes** (:data:`SIZE_CLASSES`), by the parameter count: ``XS`` < 100k <= ``S`` < 1M <=
``M`` < 10M <= ``L``. A model's count is the largest over its entries (the embedding and the
read-out follow each task's vocabulary, so one config has a slightly different count per
entry); :attr:`BoardRow.parameters_range` keeps the smallest and the largest. A predictor
scored untrained (``iclgym bench --predictor``: the oracle, n-grams, strategies; stored with 0
parameters) has no size class (``-``) and is drawn on the plot as a horizontal reference line.

**Verified**: every stored row of the (model, config hash) has the store's ``verified`` flag;
otherwise the row is self-reported.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from iclgym.bench.run import summarize
from iclgym.bench.store import ResultsStore
from iclgym.bench.suite import SUITE, SUITE_VERSION
from iclgym.browser import headless_chrome

SIZE_CLASSES: tuple[tuple[int, str], ...] = ((100_000, "XS"), (1_000_000, "S"), (10_000_000, "M"))
"""(exclusive upper bound, class) in increasing order; a count at or above the last is ``L``."""
NO_SIZE = "-"
"""The size class of a parameter-free predictor (0 parameters)."""


def size_class(parameters: int) -> str:
    """The size class of a parameter count (:data:`SIZE_CLASSES`; :data:`NO_SIZE` for 0)."""
    if parameters <= 0:
        return NO_SIZE
    for bound, name in SIZE_CLASSES:
        if parameters < bound:
            return name
    return "L"


@dataclass(frozen=True)
class EntryScore:
    """One entry's normalised score, its 95% bootstrap interval and the seeds it is over."""

    score: float
    ci: tuple[float, float]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class BoardRow:
    """One (model, config hash) of the leaderboard.

    Attributes:
        rank: 1-based: models scored on more entries first (an IQM over fewer entries is not
            comparable), then by IQM (highest first; ties by model name, then config hash).
        model, config_hash: the stored model name and config hash.
        parameters: the largest parameter count over the model's entries.
        parameters_range: (smallest, largest) parameter count over its entries.
        size: :func:`size_class` of ``parameters``.
        train_flops, wall_s: totals over every stored row (entries and seeds).
        iqm, iqm_ci: the IQM of the entry scores and its 95% bootstrap interval.
        entries: the suite's entry names, in column order (the same for every row).
        scores: entry name -> :class:`EntryScore`, for the entries the model has.
        seeds: the distinct training seeds over its rows.
        runs: the number of stored rows.
        verified: every stored row is verified (else self-reported).
        suite_version, created: the suite version; the newest row's creation time.
    """

    rank: int
    model: str
    config_hash: str
    parameters: int
    parameters_range: tuple[int, int]
    size: str
    train_flops: float
    wall_s: float
    iqm: float
    iqm_ci: tuple[float, float]
    entries: tuple[str, ...]
    scores: Mapping[str, EntryScore]
    seeds: tuple[int, ...]
    runs: int
    verified: bool
    suite_version: str
    created: str

    @property
    def coverage(self) -> int:
        """How many of :attr:`entries` the model has a score on."""
        return sum(name in self.scores for name in self.entries)


def leaderboard_table(
    store_path: str | Path,
    suite_version: str = SUITE_VERSION,
    entries: Sequence[str] | None = None,
) -> list[BoardRow]:
    """One :class:`BoardRow` per (model, config hash) stored under ``suite_version``, ranked by
    coverage, then IQM. ``entries`` (the columns) defaults to :data:`SUITE`'s names when
    ``suite_version`` is the current one, followed by any other stored entry name in order of
    first appearance.
    ``FileNotFoundError`` when there is no store at ``store_path``."""
    if not Path(store_path).is_file():
        raise FileNotFoundError(f"no results store at {store_path}")
    with ResultsStore(store_path) as store:
        rows = store.rows(suite_version=suite_version)
    if entries is not None:
        names = list(entries)
    else:
        names = [e.name for e in SUITE] if suite_version == SUITE_VERSION else []
        names += [n for n in dict.fromkeys(r["entry"] for r in rows) if n not in names]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["entry"] in names:
            groups.setdefault((row["model"], row["config_hash"]), []).append(row)
    unranked = [_board_row(key, group, names, suite_version) for key, group in groups.items()]
    unranked.sort(key=lambda r: (-r.coverage, -r.iqm, r.model, r.config_hash))
    return [replace(r, rank=i + 1) for i, r in enumerate(unranked)]


def _board_row(
    key: tuple[str, str], rows: list[dict[str, Any]], names: list[str], suite_version: str
) -> BoardRow:
    summary = summarize(rows, names)
    counts = [int(r["parameters"]) for r in rows]
    scores = {
        name: EntryScore(float(e["score"]), _pair(e["ci"]), tuple(e["seeds"]))
        for name, e in summary["entries"].items()
    }
    return BoardRow(
        rank=0,
        model=key[0],
        config_hash=key[1],
        parameters=max(counts),
        parameters_range=(min(counts), max(counts)),
        size=size_class(max(counts)),
        train_flops=float(sum(r["train_flops"] for r in rows)),
        wall_s=float(sum(r["wall_s"] for r in rows)),
        iqm=float(summary["iqm"]),
        iqm_ci=_pair(summary["iqm_ci"]),
        entries=tuple(names),
        scores=MappingProxyType(scores),
        seeds=tuple(sorted({int(r["seed"]) for r in rows})),
        runs=len(rows),
        verified=all(r["verified"] for r in rows),
        suite_version=suite_version,
        created=max(str(r["created"]) for r in rows),
    )


def _pair(values: Sequence[float]) -> tuple[float, float]:
    return float(values[0]), float(values[1])


# ---------------------------------------------------------------------------------- formatting


def human_count(n: float) -> str:
    """A count with a k / M / G suffix (3 significant digits): 5472 -> ``5.47k``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def human_seconds(s: float) -> str:
    """A duration: ``12.3s``, ``4m 05s``, ``2h 03m``."""
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(round(s), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def _sci(x: float) -> str:
    """``3.0e13``: one decimal, no ``+`` or leading zero in the exponent (``0`` for 0)."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _status(row: BoardRow) -> str:
    return "verified" if row.verified else "self-reported"


def _columns(rows: Sequence[BoardRow]) -> tuple[str, ...]:
    return rows[0].entries if rows else tuple(e.name for e in SUITE)


# -------------------------------------------------------------------------------------- markdown


def render_markdown(rows: Sequence[BoardRow], *, caption: bool = True) -> str:
    """A GitHub Markdown table (rank, model, size, parameters, IQM [95% CI], coverage, status,
    then each entry's score to 2 decimals; blank where the model has none), preceded by a
    one-line caption unless ``caption`` is false."""
    columns = _columns(rows)
    head = ["#", "model", "size", "params", "IQM [95% CI]", "entries", "status", *columns]
    lines = []
    if caption:
        version = rows[0].suite_version if rows else SUITE_VERSION
        lines += [
            f"Suite `{version}`: normalised score per entry (0 = context-free floor, 1 = Bayes "
            "oracle) and its interquartile mean over entries with a 95% bootstrap interval.",
            "",
        ]
    lines += [_md_line(head), _md_line(["---:", "---", "---", "---:", "---", "---:", "---"]
                                       + ["---:"] * len(columns))]  # fmt: skip
    for r in rows:
        lo, hi = r.iqm_ci
        cells = [
            str(r.rank),
            f"{_md_escape(r.model)} `{r.config_hash[:8]}`",
            r.size,
            human_count(r.parameters),
            f"{r.iqm:.2f} [{lo:.2f}, {hi:.2f}]",
            f"{r.coverage}/{len(columns)}",
            "✅ verified" if r.verified else "self-reported",
        ]
        cells += [f"{r.scores[c].score:.2f}" if c in r.scores else "" for c in columns]
        lines.append(_md_line(cells))
    return "\n".join(lines) + "\n"


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|")


# ------------------------------------------------------------------------------------------ plot


def score_plot_png(rows: Sequence[BoardRow]) -> bytes:
    """The IQM (95% CI error bars) against the parameter count (log x), one labelled point per
    row, verified filled and self-reported hollow, parameter-free predictors as labelled
    horizontal lines (their CI shaded); as PNG bytes (matplotlib's Agg canvas, no display and
    no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axhline(0.0, color="#999", lw=0.8, ls="--")
    ax.axhline(1.0, color="#2a7", lw=0.8, ls="--")
    ax.text(0.99, 1.0, "Bayes oracle", transform=ax.get_yaxis_transform(), va="bottom",
            ha="right", fontsize=8, color="#2a7")  # fmt: skip
    ax.text(0.99, 0.0, "context-free floor", transform=ax.get_yaxis_transform(), va="bottom",
            ha="right", fontsize=8, color="#777")  # fmt: skip
    trained = [r for r in rows if r.parameters > 0]
    for r in rows:
        if r.parameters <= 0:
            ax.axhline(r.iqm, color="#8250df", lw=0.9, ls=":")
            ax.axhspan(*r.iqm_ci, color="#8250df", alpha=0.07, lw=0)
            ax.text(0.01, r.iqm, f"{r.model} (no parameters)", transform=ax.get_yaxis_transform(),
                    va="bottom", fontsize=7.5, color="#8250df")  # fmt: skip
    if trained:
        for bound, _ in SIZE_CLASSES:
            ax.axvline(bound, color="#ddd", lw=0.8, zorder=0)
        for verified in (True, False):
            part = [r for r in trained if r.verified == verified]
            if not part:
                continue
            x = [r.parameters for r in part]
            y = [r.iqm for r in part]
            err = [[max(r.iqm - r.iqm_ci[0], 0.0) for r in part],
                   [max(r.iqm_ci[1] - r.iqm, 0.0) for r in part]]  # fmt: skip
            color = "#1f6feb" if verified else "#d9822b"
            ax.errorbar(x, y, yerr=err, fmt="o", ms=6, capsize=3, color=color,
                        mfc=color if verified else "white",
                        label="verified" if verified else "self-reported")  # fmt: skip
        for r in trained:
            ax.annotate(r.model, (r.parameters, r.iqm), xytext=(5, 4),
                        textcoords="offset points", fontsize=8)  # fmt: skip
        xs = [r.parameters for r in trained]
        ax.set_xlim(min(xs) / 2.5, max(xs) * 4)
        fig.legend(loc="outside upper center", ncols=2, fontsize=8, frameon=False)
    else:
        ax.set_xlim(1e3, 1e8)
        ax.text(0.5, 0.5, "no trained models", transform=ax.transAxes, ha="center", color="#777")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("IQM normalised score")
    ax.grid(True, which="major", axis="y", color="#eee")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ html

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328}
h1{font-size:22px;margin:0 0 4px}
.meta,.note{color:#59636e;font-size:13px}
.wrap{overflow-x:auto;margin:16px 0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:5px 8px;border-bottom:1px solid #d1d9e0;text-align:right;white-space:nowrap}
th{background:#f6f8fa;cursor:pointer;user-select:none;position:sticky;top:0;font-weight:600}
th:hover{background:#eaeef2}
th[aria-sort=ascending]::after{content:" \\25B2";font-size:10px}
th[aria-sort=descending]::after{content:" \\25BC";font-size:10px}
th.text,td.text{text-align:left}
th.entry{writing-mode:vertical-rl;transform:rotate(180deg);text-align:left;vertical-align:bottom;
  font-weight:500}
tbody tr:hover{background:#f6f8fa}
td small{display:block;color:#59636e;font-size:10.5px;font-weight:400}
td.entry{padding:5px 6px}
.badge{display:inline-block;padding:1px 7px;border-radius:10px;font-size:12px}
.verified{background:#dafbe1;color:#116329;border:1px solid #4ac26b}
.self{background:#fff8c5;color:#7d4e00;border:1px solid #d4a72c}
.size{font-weight:600}
code{font-size:12px;color:#59636e}
img.plot{max-width:100%;border:1px solid #d1d9e0;border-radius:6px}
"""

_JS = """
(function () {
  var table = document.getElementById("board");
  var body = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  Array.prototype.forEach.call(body.rows, function (r, i) { r.dataset.index = i; });
  function sortBy(th) {
    var col = heads.indexOf(th);
    var asc = th.getAttribute("aria-sort") !== "ascending";
    var num = th.dataset.type === "num";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
      var ex = x === "", ey = y === "";
      if (ex || ey) { return ex === ey ? a.dataset.index - b.dataset.index : (ex ? 1 : -1); }
      var c = num ? Number(x) - Number(y) : x.localeCompare(y);
      return (asc ? c : -c) || a.dataset.index - b.dataset.index;
    });
    heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    rows.forEach(function (r) { body.appendChild(r); });
  }
  heads.forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(th); }
    });
  });
})();
"""


def render_html(
    rows: Sequence[BoardRow], out_path: str | Path, *, generated: datetime | None = None
) -> Path:
    """Write the leaderboard as ONE self-contained HTML file (inline CSS, inline vanilla-JS
    sorter, the plot as a base64 PNG data URI; nothing fetched) and return its path.

    The table (``id="board"``) has one ``<tr data-model=... data-config=...>`` per row; every
    cell carries ``data-value`` (a number for ``data-type="num"`` columns, else text; empty
    for a blank, which sorts last both ways). Clicking a header (or Enter on it) sorts by it,
    ascending first, then toggles; ``aria-sort`` marks the sorted column."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows)
    version = rows[0].suite_version if rows else SUITE_VERSION
    when = (generated or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    plot = base64.b64encode(score_plot_png(rows)).decode("ascii")
    e = html.escape
    head = [
        ("#", "num", "", "rank (by IQM)"),
        ("model", "text", "text", "model name and config hash"),
        ("size", "text", "text", _size_legend()),
        ("params", "num", "", "parameter count (largest over entries)"),
        ("train FLOPs", "num", "", "total training FLOPs estimate (6 N tokens), all runs"),
        ("wall", "num", "", "total wall time, all runs"),
        ("IQM", "num", "", "interquartile mean of the entry scores [95% bootstrap interval]"),
        ("entries", "num", "", "entries scored, out of the suite's"),
        ("seeds", "num", "", "distinct training seeds"),
        ("status", "text", "text", "verified: every stored run re-checked"),
    ]
    ths = [
        f'<th tabindex="0" data-type="{kind}" class="{cls}" title="{e(tip)}"'
        + (' aria-sort="ascending"' if label == "#" else "")
        + f">{e(label)}</th>"
        for label, kind, cls, tip in head
    ]
    ths += [
        f'<th tabindex="0" data-type="num" class="entry" title="normalised score on {e(c)}">'
        f"{e(c)}</th>"
        for c in columns
    ]
    body = "\n".join(_html_row(r, columns) for r in rows)
    text = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>iclgym leaderboard — {e(version)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>iclgym leaderboard</h1>
<p class="meta">suite <code id="suite-version">{e(version)}</code> ·
{len(rows)} model configs · generated <span id="generated">{e(when)}</span></p>
<p class="note">Normalised score per entry: 0 = the best context-free predictor, 1 = the exact
Bayes oracle. IQM = interquartile mean over the entries a model has, with a 95% percentile
bootstrap interval over seeds and sequences. Size classes: {e(_size_legend())}; - = a
parameter-free predictor scored untrained. Click a column header to sort; blanks sort last.</p>
<div class="wrap">
<table id="board">
<thead><tr>{"".join(ths)}</tr></thead>
<tbody>
{body}
</tbody>
</table>
</div>
<h2>Score against parameters</h2>
<img class="plot" id="plot" alt="IQM normalised score against parameter count"
 src="data:image/png;base64,{plot}">
<script>{_JS}</script>
</body>
</html>
"""
    out.write_text(text, encoding="utf-8")
    return out


def _size_legend() -> str:
    parts, low = [], ""
    for bound, name in SIZE_CLASSES:
        parts.append(
            f"{name} {low}–{human_count(bound)}" if low else f"{name} < {human_count(bound)}"
        )
        low = human_count(bound)
    return ", ".join([*parts, f"L ≥ {low}"])


def _html_row(r: BoardRow, columns: Sequence[str]) -> str:
    e = html.escape
    lo, hi = r.iqm_ci
    pmin, pmax = r.parameters_range
    ptip = f"{pmin:,}" if pmin == pmax else f"{pmin:,}–{pmax:,} over entries"
    badge = (
        '<span class="badge verified">verified</span>'
        if r.verified
        else '<span class="badge self">self-reported</span>'
    )
    cells = [
        f'<td data-value="{r.rank}">{r.rank}</td>',
        f'<td class="text" data-value="{e(r.model)}" title="config {e(r.config_hash)}">'
        f"{e(r.model)}<small><code>{e(r.config_hash[:8])}</code></small></td>",
        f'<td class="text size" data-value="{"" if r.size == NO_SIZE else r.size}">{r.size}</td>',
        f'<td data-value="{r.parameters}" title="{ptip}">{human_count(r.parameters)}</td>',
        f'<td data-value="{r.train_flops!r}">{_sci(r.train_flops)}</td>',
        f'<td data-value="{r.wall_s!r}">{human_seconds(r.wall_s)}</td>',
        f'<td data-value="{r.iqm!r}"><b>{r.iqm:.3f}</b><small>[{lo:.3f}, {hi:.3f}]</small></td>',
        f'<td data-value="{r.coverage}">{r.coverage}/{len(columns)}</td>',
        f'<td data-value="{len(r.seeds)}" title="seeds {e(",".join(map(str, r.seeds)))}">'
        f"{len(r.seeds)}</td>",
        f'<td class="text" data-value="{_status(r)}">{badge}</td>',
    ]
    for c in columns:
        s = r.scores.get(c)
        if s is None:
            cells.append('<td class="entry" data-value=""></td>')
        else:
            cells.append(
                f'<td class="entry" data-value="{s.score!r}" title="{e(c)}: seeds '
                f'{",".join(map(str, s.seeds))}">{s.score:.2f}'
                f"<small>[{s.ci[0]:.2f}, {s.ci[1]:.2f}]</small></td>"
            )
    return (
        f'<tr data-model="{e(r.model)}" data-config="{e(r.config_hash)}">'
        + "".join(cells)
        + "</tr>"
    )


# --------------------------------------------------------------------------------------- browser


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1400) -> Path:
    """A full-page PNG screenshot of the leaderboard page at ``html_path`` (headless Chromium,
    a ``width`` CSS pixel window; the picture is as tall as the page and as wide as the whole
    table); returns ``png_path``."""
    html_file, out = Path(html_path).resolve(), Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile, headless_chrome(profile, (width, 900)) as d:
        d.get(html_file.as_uri())
        d.execute_script("return document.getElementById('plot').decode()")
        w, h = d.execute_script(  # the table unclipped: the whole of it in the picture
            "document.querySelector('.wrap').style.overflow = 'visible';"
            "var e = document.documentElement; return [e.scrollWidth + 24, e.scrollHeight]"
        )
        clip = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
        shot = d.execute_cdp_cmd(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
        )
        out.write_bytes(base64.b64decode(shot["data"]))
    return out
