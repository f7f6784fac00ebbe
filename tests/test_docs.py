"""The documentation site (``mkdocs.yml`` over ``docs/``) against the code: every registered env
id has its page in the navigation and its env table states the spaces and defaults the registry
builds; no page and no public docstring points at a file that is not in the repository (or at
the task specifications, which are not); every relative link of a page resolves.

Fast and static: no mkdocs needed (``tests/test_docs_site.py`` builds and browses the site).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import baselines
import iclgym
from iclgym.envs import ICLEnv
from iclgym.registry import ENVS, make_task, spec_keys

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ENV_PAGES = DOCS / "envs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "scripts" not in p.relative_to(DOCS).parts)

# ------------------------------------------------------------------ the navigation


def nav_pages() -> list[str]:
    """Every page path (relative to ``docs/``) in ``mkdocs.yml``'s ``nav``, read without YAML:
    the entries are ``- Title: path.md`` lines below ``nav:``."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:\n", 1)[1]
    return re.findall(r"^\s+- (?:[^\n]*?: )?(\S+\.md)\s*$", nav, flags=re.MULTILINE)


def test_every_env_id_has_a_page_in_the_navigation():
    nav = nav_pages()
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"
    for env_id in ENVS:
        assert (ENV_PAGES / f"{env_id}.md").is_file(), f"no docs/envs/{env_id}.md"
        assert f"envs/{env_id}.md" in nav, f"docs/envs/{env_id}.md is not in mkdocs.yml's nav"
    stale = {p.stem for p in ENV_PAGES.glob("ICL-*.md")} - set(ENVS)
    assert not stale, f"env pages without a registered id: {sorted(stale)}"
    for page in nav:
        assert (DOCS / page).is_file(), f"mkdocs.yml's nav lists a missing page: {page}"


# ------------------------------------------------------------------ env tables


def table_rows(text: str) -> dict[str, str]:
    """The ``| name | value |`` rows of a page's first table (the env table), by name."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0] and not cells[0].startswith("-"):
            rows.setdefault(cells[0], " | ".join(cells[1:]))
        elif rows and not line.startswith("|"):
            break
    return rows


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section ('' when the page has none)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


def argument_rows(text: str) -> dict[str, str]:
    """``name -> default`` of the Arguments table (a cell ``a``, ``b`` with defaults ``x, y``
    gives two entries; defaults that cannot be split one per name are left out)."""
    out = {}
    for line in section(text, "Arguments").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or cells[0] in ("argument", ""):
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(", ")] if cells[1] else []
        for i, name in enumerate(names):
            out[name] = defaults[i] if len(defaults) == len(names) else ""
    return out


def literal(text: str) -> Any:
    """A default as the page writes it (``3``, ``1.0``, ``"token"``, ``None``, ``False``), or
    the ``NOT_LITERAL`` marker for prose (``min(3, K)``, ``from the preset``)."""
    text = text.strip().strip("`")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return NOT_LITERAL


NOT_LITERAL = object()


class _Space:
    """Stand-ins for Gymnasium's space constructors, so that a page's space expression such as
    ``MultiDiscrete([k + 1] * (seq_len + 1))`` evaluates to comparable plain values."""

    @staticmethod
    def namespace(symbols: dict[str, int]) -> dict[str, Any]:
        return {
            "Discrete": lambda n: ("Discrete", n),
            "MultiDiscrete": lambda nvec: ("MultiDiscrete", list(nvec)),
            "Box": lambda low, high, shape, dtype=None: (
                "Box",
                tuple(shape),
                float(np.float32(low)),
                float(np.float32(high)),
            ),
            "Dict": lambda **spaces: ("Dict", spaces),
            "inf": float("inf"),
            "float32": "float32",
            **symbols,
        }


def actual(space: gym.Space) -> tuple:
    if isinstance(space, gym.spaces.Discrete):
        return ("Discrete", int(space.n))
    if isinstance(space, gym.spaces.MultiDiscrete):
        return ("MultiDiscrete", [int(v) for v in space.nvec])
    if isinstance(space, gym.spaces.Box):  # the bounds as stated: one value each
        low, high = np.unique(space.low), np.unique(space.high)
        assert low.size == high.size == 1, f"{space}: bounds vary; state them on the page"
        return ("Box", tuple(space.shape), float(low[0]), float(high[0]))
    if isinstance(space, gym.spaces.Dict):
        return ("Dict", {k: actual(v) for k, v in space.spaces.items()})
    raise AssertionError(f"unexpected space {space}")


def stated_space(cell: str, symbols: dict[str, int]) -> tuple:
    """The first code span of an env-table cell (the default space), evaluated."""
    code = re.search(r"`([^`]+)`", cell)
    assert code, f"no space in {cell!r}"
    return eval(code.group(1), {"__builtins__": {}}, _Space.namespace(symbols))


def symbols_of(env_id: str, action_cell: str) -> dict[str, int]:
    """The names a page's space expressions use, with this id's default values: the vocabulary
    letter of its ``Discrete(...)`` action, ``seq_len`` / ``T`` (context positions) / ``L``
    (template or demonstration tokens before the query) and the feature sizes ``d``, ``d_y``."""
    task = make_task(env_id)
    spec = task.spec
    out = {"L": task.seq_len - 1}
    vocab = re.search(r"`Discrete\(([A-Za-z])\)`", action_cell)
    if vocab:
        out[vocab.group(1)] = task.vocab_size
    for name in ("seq_len", "d", "d_y"):
        if hasattr(spec, name):
            out[name] = getattr(spec, name)
    out["T"] = getattr(spec, "context_len", getattr(spec, "seq_len", None))
    return out


def parent_page(env_id: str, text: str) -> str | None:
    """The env id whose arguments a page defers to ("As [ICL-X](ICL-X.md)", "those of
    `ICL-X`"): the first other id named in its Arguments section, else on the page."""
    for body in (section(text, "Arguments"), text):
        for other in re.findall(r"ICL-[A-Za-z]+(?:-[A-Za-z]+)*-v\d+", body):
            if other != env_id and other in ENVS:
                return other
    return None


def stated_values(text: str, key: str) -> list[Any]:
    """Values the page's prose gives ``key``: ```key=VALUE```, ```key` (is) fixed to/at VALUE``,
    ```key` (default VALUE``, ```key` may be `VALUE` (default)``."""
    patterns = (
        rf"`{key}=([^`]+)`",
        rf"`{key}` (?:is )?fixed (?:to|at) `?([^`\s,;)]+)",
        rf"`{key}` \(default ([^,;)]+)",
        rf"`{key}` may be `([^`]+)` \(default\)",
    )
    values = []
    for pattern in patterns:
        for raw in re.findall(pattern, text):
            value = literal(raw)
            values.append(raw.strip() if value is NOT_LITERAL else value)
    return values


ENV_OPTIONS = {
    name: p.default
    for name, p in inspect.signature(ICLEnv.__init__).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
}
"""ICLEnv's keyword options (``observation``, ``action``, ``split``, ...) and their defaults."""


@pytest.mark.parametrize("env_id", list(ENVS))
def test_env_table_matches_the_registry(env_id):
    text = (ENV_PAGES / f"{env_id}.md").read_text(encoding="utf-8")
    assert text.startswith(f"# {env_id}\n")
    rows = table_rows(text)
    for name in ("Action space", "Observation space", "Import", "Vector"):
        assert name in rows, f"{env_id}: the env table has no {name!r} row"
    assert f'gym.make("{env_id}"' in rows["Import"]
    assert f'gym.make_vec("{env_id}"' in rows["Vector"]

    env = gym.make(env_id)
    try:
        symbols = symbols_of(env_id, rows["Action space"])
        for row, space in (
            ("Action space", env.action_space),
            ("Observation space", env.observation_space),
        ):
            assert stated_space(rows[row], symbols) == actual(space), (env_id, row)
    finally:
        env.close()


@pytest.mark.parametrize("env_id", list(ENVS))
def test_argument_defaults_match_the_registry(env_id):
    """Every argument a page lists exists (a spec key or an env option) and its stated default
    is the one the id builds; every default the registry sets for the id is stated, on the
    page or on the page it defers to."""
    text = (ENV_PAGES / f"{env_id}.md").read_text(encoding="utf-8")
    entry, spec = ENVS[env_id], make_task(env_id).spec
    keys = set(spec_keys(env_id))
    for name, stated in argument_rows(text).items():
        assert name in keys or name in ENV_OPTIONS, f"{env_id}: unknown argument `{name}`"
        value = literal(stated)
        if value is NOT_LITERAL:
            continue  # prose ("min(3, K)", "from the preset")
        if name in keys:
            assert value == getattr(spec, name), (env_id, name, stated)
        elif ENV_OPTIONS[name] is not None or value is None:
            assert value == ENV_OPTIONS[name], (env_id, name, stated)

    parent = parent_page(env_id, text)
    inherited = {}
    if parent is not None:
        inherited = argument_rows((ENV_PAGES / f"{parent}.md").read_text(encoding="utf-8"))
    own = argument_rows(text)
    for key, value in entry.defaults.items():
        if key in own:
            continue  # compared above
        stated = stated_values(text, key)
        if stated:
            assert value in stated, (env_id, key, value, stated)
        else:
            assert key in inherited, f"{env_id}: the default {key}={value!r} is not stated"
            assert literal(inherited[key]) == value, (env_id, key, parent, inherited[key])


# ------------------------------------------------------------------ file references

PATH_RE = re.compile(
    r"(?<![\w/.:-])((?:\.\.?/)*(?:[\w.{}*,<>-]+/)+[\w.{}*,<>-]*"
    r"\.(?:md|py|png|json|jsonl|txt|yml|yaml|toml|csv|pt|db|html|parquet|ipynb))(?![\w/])"
)
"""A file path with at least one folder, e.g. ``docs/results/baselines.md`` or ``../x.png``."""
GENERATED = ("docs/leaderboard/", "results/", "runs/", "site/")
"""Folders that commands write (``iclgym leaderboard --out docs/leaderboard``, ``iclgym bench
--store results/iclgym.db``, ``iclgym train``, ``mkdocs build``), not part of the repository."""
SPEC_CITATION = re.compile(
    r"shared/specs|\bspecs/|\bspec(?:'s)? (?:section|sections|§|pitfall)\b|\bpitfalls? \d"
)
"""The task specifications are not part of the repository: cite the paper or a page instead."""
TOP_LEVEL = {
    p.name
    for p in ROOT.iterdir()
    if not p.name.startswith(".") and f"{p.name}/" not in GENERATED and p.suffix != ".egg-info"
} | {".ci"}


def expand(token: str) -> list[str]:
    """``a{0,1}.png`` -> ``a0.png``, ``a1.png`` (one brace group)."""
    match = re.search(r"\{([^{}]*)\}", token)
    if not match:
        return [token]
    return [token[: match.start()] + part + token[match.end() :] for part in match[1].split(",")]


def missing_paths(text: str, base: Path | None = None) -> list[str]:
    """The repository paths ``text`` names that do not exist. A path counts when it starts at a
    top-level entry of the repository (``docs/...``, ``tests/...``), climbs with ``../``, or
    (``base`` given: a page's folder) starts at an entry of ``base``; other paths are outputs
    or placeholders (``runs/...``, ``OUT/seeds.json``, ``<entry>/seed<S>/checkpoint.pt``)."""
    missing = []
    for token in PATH_RE.findall(text):
        if token.startswith(GENERATED) or re.search(r"[<>]", token):
            continue
        first = token.split("/", 1)[0]
        roots = []
        if first in TOP_LEVEL:
            roots.append(ROOT)
        if base is not None and (first in ("..", ".") or (base / first).exists()):
            roots.append(base)
        if not roots and first in ("..", "."):
            roots.append(ROOT)
        for path in expand(token):
            hits = [m for r in roots for m in r.glob(path)] if "*" in path else None
            if roots and not (hits or any((r / path).exists() for r in roots)):
                missing.append(token)
    return missing


def public_docstrings() -> Iterator[tuple[str, str]]:
    """(where, docstring) for every module of iclgym and baselines, their public classes,
    functions, methods and properties (``inspect.getdoc``), and the attribute docstrings (a
    string right after an assignment at module or class level, which only the source has)."""
    for package in (iclgym, baselines):
        names = [package.__name__]
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        for name in names:
            module = importlib.import_module(name)
            yield name, inspect.getdoc(module) or ""
            for attr, obj in vars(module).items():
                if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                    continue
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    yield f"{name}.{attr}", inspect.getdoc(obj) or ""
                if inspect.isclass(obj):
                    for member_name, member in vars(obj).items():
                        if not member_name.startswith("_"):
                            member = getattr(member, "__func__", member)
                            yield f"{name}.{attr}.{member_name}", inspect.getdoc(member) or ""
            tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
            yield from _attribute_docstrings(tree.body, name)


def _attribute_docstrings(body: list[ast.stmt], where: str) -> Iterator[tuple[str, str]]:
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.Assign | ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            yield f"{where} (line {after.lineno})", after.value.value
    for node in body:
        if isinstance(node, ast.ClassDef):
            yield from _attribute_docstrings(node.body, f"{where}.{node.name}")


def test_docs_pages_point_at_existing_files():
    bad = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        bad += [f"{page.relative_to(ROOT)}: {p}" for p in missing_paths(text, page.parent)]
        bad += [f"{page.relative_to(ROOT)}: {m}" for m in SPEC_CITATION.findall(text)]
    assert not bad, "\n".join(bad)


def test_public_docstrings_point_at_existing_files():
    bad, seen = [], 0
    for where, doc in public_docstrings():
        seen += 1
        bad += [f"{where}: {p}" for p in missing_paths(doc)]
        bad += [f"{where}: {m}" for m in SPEC_CITATION.findall(doc)]
    assert seen > 500  # the walk found the modules
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ links

LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code blocks
    bad = []
    for target in LINK_RE.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto:, in-page anchors
        path = target.split("#", 1)[0]
        resolved = (page.parent / path).resolve()
        inside = DOCS.resolve() in (resolved, *resolved.parents)
        # docs/scripts is excluded from the site (mkdocs.yml: exclude_docs): name scripts as code
        if not resolved.exists() or not inside or "scripts" in resolved.relative_to(DOCS).parts:
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)}: links that do not resolve in the site: {bad}"
