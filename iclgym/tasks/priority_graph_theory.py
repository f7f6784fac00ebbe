"""Theory of token-priority graphs (Li, Huang, Ildiz, Rawat, Oymak 2024, *Mechanics of Next Token
Prediction with Self-Attention*, arXiv 2403.08081): the paper-mode dataset, the empirical
token-priority graph (Oracle A), the Graph-SVM ``W^svm``, the finite component ``W^fin``, the
implicit-bias limit (Oracle B) and the paper-mode metrics. The contract is
``shared/specs/priority-graph.md``; section numbers below refer to it.

Conventions (spec sections 2 and 5):

- Vocabulary [K] = {0 .. K-1}; a sample is a context X of T token ids and a label y. The last
  token ``x_bar = X[T - 1] = k`` is the **query**; it is part of the attended context and may be
  the label (pitfall 2).
- Fixed embeddings E (K, d): token j is the vector ``E[j]``. The model's score of position t is
  ``a_t = x_t^T W x_bar`` with W (d, d) the weight of a bias-free ``torch.nn.Linear(d, d)``
  (pitfall 5). In embedding space ``beta[k, j] = E[j]^T W E[k]`` is the score of token j under
  query k: ``beta = (E W E^T)^T``.
- TPG: one directed graph G^(k) per query k on the nodes [K]; each sample with query k adds an
  edge **from the label y to every other token j of X** (pitfall 1). Priority is reachability
  (``i`` has priority over or equal to ``j`` when j is reachable from i), never SCC ids
  (pitfall 10).

Everything here is numpy float64 / int64 (the paper's sizes are tiny: K <= 64, d <= 64);
strongly connected components and reachability come from ``scipy.sparse.csgraph``, the
Graph-SVM from ``scipy.optimize.nnls`` (an exact active-set solver) and ``W^fin`` from
``scipy.optimize.minimize`` (L-BFGS-B).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse.csgraph import connected_components, shortest_path

from iclgym.validation import as_int, invalid

EMBEDDINGS = ("random", "ortho", "equi-corr")
"""Paper-mode embedding choices (spec section 2.1)."""


# ------------------------------------------------------------------ paper-mode dataset
def paper_embeddings(
    num_tokens: int, d: int, embedding: str = "random", seed: int = 0
) -> np.ndarray:
    """(K, d) float64 fixed token embeddings of paper mode (spec section 2.1, ``choice``).

    - ``random``: i.i.d. Gaussian rows normalised to unit norm; needs ``d >= K`` (independent
      rows; ``d < K`` raises).
    - ``ortho``: the first K rows of a random orthogonal d x d matrix (QR of a Gaussian matrix
      with the signs of R's diagonal, i.e. Haar); needs ``d >= K``.
    - ``equi-corr``: unit rows with pairwise inner product 0.5, ``E[j] = (q_j + q_K) / sqrt(2)``
      from K + 1 orthonormal rows ``q``; needs ``d >= K + 1``. The reference code spends one of
      its K vectors on the shared direction (effective K is K - 1); here the shared direction is
      an extra vector, so all K tokens exist.

    ``seed`` drives ``numpy.random.default_rng(SeedSequence(seed).spawn(2)[0])`` (the data of
    :func:`paper_dataset` uses the second child, so E does not depend on the rejection loop).
    Raises ``ValueError`` for K < 2, d < 1, an unknown ``embedding`` or too small a d.
    """
    num_tokens = as_int("num_tokens", num_tokens, 2)
    d = as_int("d", d, 1)
    if embedding not in EMBEDDINGS:
        raise invalid("embedding", embedding, f"one of {', '.join(map(repr, EMBEDDINGS))}")
    need = num_tokens + 1 if embedding == "equi-corr" else num_tokens
    if d < need:
        why = {
            "random": "i.i.d. rows with d < K are linearly dependent",
            "ortho": "K orthonormal rows need d >= K",
            "equi-corr": "K equi-correlated rows use K + 1 orthonormal directions",
        }[embedding]
        raise invalid("d", d, f"an int >= {need} for embedding={embedding!r} ({why})")
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    if embedding == "random":
        e = rng.standard_normal((num_tokens, d))
        return e / np.linalg.norm(e, axis=1, keepdims=True)
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
    rows = q.T  # orthonormal rows
    if embedding == "ortho":
        return np.ascontiguousarray(rows[:num_tokens])
    return (rows[:num_tokens] + rows[num_tokens][None, :]) / np.sqrt(2.0)


@dataclass(frozen=True)
class PaperDataset:
    """A paper-mode training set (spec section 2.1): the fixed dataset whose TPGs, SCCs,
    ``W^svm`` and ``W^fin`` the paper studies."""

    contexts: np.ndarray
    """(n, T) int64 token ids; column T - 1 is the query."""
    labels: np.ndarray
    """(n,) int64 labels; each occurs in its context."""
    embeddings: np.ndarray
    """(K, d) float64 fixed embeddings (:func:`paper_embeddings`)."""
    num_tokens: int
    """K."""
    cyclic: bool
    """The TPG condition the dataset was accepted under."""
    tries: int
    """Number of whole-dataset draws until the condition held (1 = first draw)."""

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def context_len(self) -> int:
        return int(self.contexts.shape[1])

    @property
    def queries(self) -> np.ndarray:
        """(n,) int64 the last token of each context."""
        return self.contexts[:, -1]


def _draw_contexts(rng: np.random.Generator, n: int, t: int, k: int) -> np.ndarray:
    if t <= k:  # T distinct tokens, uniformly without replacement
        return np.argsort(rng.random((n, k)), axis=1)[:, :t].astype(np.int64)
    perm = np.argsort(rng.random((n, k)), axis=1)  # a permutation of [K], then i.i.d. tokens
    return np.concatenate([perm, rng.integers(0, k, (n, t - k))], axis=1).astype(np.int64)


def _draw_labels(rng: np.random.Generator, contexts: np.ndarray, k: int) -> np.ndarray:
    n, t = contexts.shape
    y = rng.integers(0, k, n)
    pos = rng.integers(0, t, n)
    absent = ~(contexts == y[:, None]).any(1)
    return np.where(absent, contexts[np.arange(n), pos], y).astype(np.int64)


def paper_dataset(
    n: int,
    context_len: int,
    num_tokens: int,
    d: int,
    embedding: str = "random",
    cyclic: bool = True,
    seed: int = 0,
    max_tries: int = 10_000,
) -> PaperDataset:
    """Draw the paper-mode dataset (spec section 2.1, the reference's ``data_generator`` with
    ``next_data`` rejection).

    - Embeddings: :func:`paper_embeddings` (``num_tokens``, ``d``, ``embedding``, ``seed``).
    - Contexts: T distinct uniform tokens if T <= K; otherwise a uniform permutation of [K]
      followed by T - K i.i.d. uniform tokens.
    - Labels: y ~ U[K]; if y is not in X it is replaced by the token at a uniform position of X
      (so y always occurs in X, and with distinct tokens it is uniform over the T positions).
    - Rejection: the whole dataset (contexts and labels; E is fixed) is redrawn until the TPG
      condition holds: ``cyclic=True`` needs some G^(k) with an SCC of two or more nodes,
      ``cyclic=False`` needs every SCC to be a single node.

    The draws come from ``numpy.random.default_rng(SeedSequence(seed).spawn(2)[1])``.

    Raises:
        ValueError: a parameter out of range (n >= 1, context_len >= 1, num_tokens >= 2, d as in
            :func:`paper_embeddings`, max_tries >= 1), or no draw satisfying the condition
            within ``max_tries`` (e.g. ``cyclic=True`` with n = 1, which cannot make a cycle).
    """
    n = as_int("n", n, 1)
    t = as_int("context_len", context_len, 1)
    k = as_int("num_tokens", num_tokens, 2)
    max_tries = as_int("max_tries", max_tries, 1)
    if not isinstance(cyclic, (bool, np.bool_)):
        raise invalid("cyclic", cyclic, "a bool")
    emb = paper_embeddings(k, d, embedding, seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    for tries in range(1, max_tries + 1):
        contexts = _draw_contexts(rng, n, t, k)
        labels = _draw_labels(rng, contexts, k)
        has_cycle = EmpiricalTPG.fit(contexts, labels, k).has_cycle
        if has_cycle == bool(cyclic):
            return PaperDataset(contexts, labels, emb, k, bool(cyclic), tries)
    condition = (
        "some G^(k) has a strongly connected component of >= 2 tokens (cyclic=True)"
        if cyclic
        else "every strongly connected component is a single token (cyclic=False)"
    )
    raise ValueError(
        f"paper_dataset found no dataset with n={n}, context_len={t}, num_tokens={k} where "
        f"{condition} in max_tries={max_tries} draws; change n, context_len, num_tokens or "
        "cyclic, or raise max_tries"
    )


# ------------------------------------------------------------------ Oracle A
def _check_ids(name: str, a: np.ndarray, num_tokens: int) -> None:
    if a.size and (a.min() < 0 or a.max() >= num_tokens):
        raise invalid(name, f"ids in [{a.min()}, {a.max()}]", f"ids in [0, {num_tokens - 1}]")


def _check_contexts(contexts: object, num_tokens: int) -> np.ndarray:
    x = np.asarray(contexts)
    if x.ndim != 2 or x.shape[1] < 1 or not np.issubdtype(x.dtype, np.integer):
        raise invalid("contexts", f"an array of shape {x.shape}, dtype {x.dtype}", "(n, T) ints")
    _check_ids("contexts", x, num_tokens)
    return x.astype(np.int64)


def _check_samples(contexts: object, labels: object, num_tokens: int) -> tuple:
    x = _check_contexts(contexts, num_tokens)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise invalid("labels", f"an array of shape {y.shape}", f"({x.shape[0]},) ints")
    _check_ids("labels", y, num_tokens)
    return x, y.astype(np.int64)


@dataclass(frozen=True)
class EmpiricalTPG:
    """The empirical token-priority graphs of a training set and Oracle A (spec sections 2.1
    and 3).

    Fit with :meth:`fit`. For every query k, ``adjacency[k, i, j]`` is the edge i -> j of
    G^(k) (label i, other context token j), ``scc[k, i]`` the strongly connected component id
    of token i in G^(k) (``scipy.sparse.csgraph.connected_components(connection="strong")``;
    ids are labels only, not priorities), and ``reach[k, i, j]`` whether j is reachable from i
    in G^(k) (every node reaches itself). Tokens never seen as a label or context token of a
    query-k sample are isolated nodes of G^(k).
    """

    adjacency: np.ndarray
    """(K, K, K) bool edges label -> other token, per query."""
    scc: np.ndarray
    """(K, K) int64 SCC id of token i in G^(k) (0-based within each k)."""
    reach: np.ndarray
    """(K, K, K) bool reachability (reflexive)."""

    @property
    def num_tokens(self) -> int:
        return int(self.scc.shape[0])

    @property
    def scc_sizes(self) -> np.ndarray:
        """(K, K) int64 size of the SCC of token i in G^(k)."""
        same = self.scc[:, :, None] == self.scc[:, None, :]
        return same.sum(-1)

    @property
    def has_cycle(self) -> bool:
        """Some G^(k) has an SCC of >= 2 tokens (the paper's *cyclic* condition)."""
        return bool((self.scc_sizes > 1).any())

    @classmethod
    def fit(cls, contexts: object, labels: object, num_tokens: int) -> EmpiricalTPG:
        """TPGs of ``contexts`` (n, T) int and ``labels`` (n,) int over ``num_tokens`` K ids:
        each sample with query k = contexts[i, -1] adds the edges y -> j for every other token
        j of its context (spec pitfall 1). Raises ``ValueError`` for bad shapes or ids."""
        k_tokens = as_int("num_tokens", num_tokens, 1)
        x, y = _check_samples(contexts, labels, k_tokens)
        adj = np.zeros((k_tokens, k_tokens, k_tokens), dtype=bool)
        q = np.repeat(x[:, -1], x.shape[1])
        src = np.repeat(y, x.shape[1])
        dst = x.reshape(-1)
        keep = src != dst
        adj[q[keep], src[keep], dst[keep]] = True
        scc = np.zeros((k_tokens, k_tokens), dtype=np.int64)
        reach = np.zeros_like(adj)
        for k in range(k_tokens):
            _, scc[k] = connected_components(adj[k], directed=True, connection="strong")
            reach[k] = np.isfinite(shortest_path(adj[k], unweighted=True))
        return cls(adj, scc, reach)

    def top_sets(self, contexts: object) -> tuple[np.ndarray, np.ndarray]:
        """Oracle A's hard retrieval for ``contexts`` (B, T) int: ``(top, ambiguous)``.

        ``top`` (B, K) bool: the undominated tokens of each context (token i of X is dominated
        when some j of X has ``reach[k, j, i]`` and not ``reach[k, i, j]``); ``ambiguous``
        (B,) bool: the undominated tokens span more than one SCC (incomparable SCCs, or tokens
        unseen under query k, which are isolated and never dominated). Otherwise ``top`` is
        S* (spec section 3, Oracle A steps 3-4)."""
        x = _check_contexts(contexts, self.num_tokens)
        b = x.shape[0]
        present = np.zeros((b, self.num_tokens), dtype=bool)
        present[np.arange(b)[:, None], x] = True
        r = self.reach[x[:, -1]]  # (B, K, K): r[b, i, j] = j reachable from i
        beats = r & ~np.swapaxes(r, 1, 2)  # beats[b, j, i]: j strictly above i
        dominated = (present[:, :, None] & beats).any(1)
        top = present & ~dominated
        ids = self.scc[x[:, -1]]
        lo = np.where(top, ids, np.iinfo(np.int64).max).min(1)
        hi = np.where(top, ids, -1).max(1)
        return top, lo != hi

    def predict(self, contexts: object, beta: np.ndarray | None = None) -> tuple:
        """Oracle A (spec section 3): ``(probs, ambiguous)`` for ``contexts`` (B, T) int.

        ``probs`` (B, K) float64: ``p(j) ∝ n_X(j) exp(beta[k, j])`` on the top set of
        :meth:`top_sets` and 0 elsewhere, with k the query and n_X(j) the count of j in X
        (pitfall 3); ``beta`` (K, K) defaults to 0 (count-weighted uniform), else e.g.
        :func:`token_scores` of ``W^fin``. ``ambiguous`` (B,) bool flags contexts whose
        undominated tokens span several SCCs: Oracle A is undefined there (pitfall 4) and the
        documented fallback is the same formula over all undominated tokens (use Oracle B,
        :func:`implicit_bias_probs`, for the model's limit). Raises ``ValueError`` for bad ids
        or a ``beta`` of the wrong shape.
        """
        x = _check_contexts(contexts, self.num_tokens)
        top, ambiguous = self.top_sets(x)
        kk = self.num_tokens
        if beta is None:
            beta = np.zeros((kk, kk))
        beta = np.asarray(beta, dtype=np.float64)
        if beta.shape != (kk, kk) or not np.isfinite(beta).all():
            raise invalid("beta", f"array of shape {beta.shape}", f"finite ({kk}, {kk}) floats")
        counts = np.zeros((x.shape[0], kk))
        np.add.at(counts, (np.arange(x.shape[0])[:, None], x), 1.0)
        logits = np.where(top, np.log(np.maximum(counts, 1.0)) + beta[x[:, -1]], -np.inf)
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True), ambiguous


def token_scores(w: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """(K, K) float64 ``beta[k, j] = E[j]^T W E[k]``: the score of token j under query k for
    the model's W (d, d) (spec section 5, ``a_t = x_t^T W x_bar``)."""
    e = np.asarray(embeddings, dtype=np.float64)
    return (e @ np.asarray(w, dtype=np.float64) @ e.T).T


__all__ = [
    "EMBEDDINGS",
    "EmpiricalTPG",
    "PaperDataset",
    "paper_dataset",
    "paper_embeddings",
    "token_scores",
]
