"""Theory of token-priority graphs (Li, Huang, Ildiz, Rawat, Oymak 2024, *Mechanics of Next Token
Prediction with Self-Attention*, arXiv 2403.08081): the paper-mode dataset, the empirical
token-priority graph (Oracle A), the Graph-SVM ``W^svm``, the finite component ``W^fin``, the
implicit-bias limit (Oracle B) and the paper-mode metrics. The env page is
``docs/envs/ICL-PriorityGraph-v0.md``; the reproduction is ``docs/results/priority-graph.md``.

Conventions (those of the paper's reference code, ``yixiao-huang/next-token-prediction``):

- Vocabulary [K] = {0 .. K-1}; a sample is a context X of T token ids and a label y. The last
  token ``x_bar = X[T - 1] = k`` is the **query**; it is part of the attended context and may be
  the label.
- Fixed embeddings E (K, d): token j is the vector ``E[j]``. The model's score of position t is
  ``a_t = x_t^T W x_bar`` with W (d, d) the weight of a bias-free ``torch.nn.Linear(d, d)``
  (PyTorch's convention). In embedding space ``beta[k, j] = E[j]^T W E[k]`` is the score of token j
  under query k: ``beta = (E W E^T)^T``.
- TPG: one directed graph G^(k) per query k on the nodes [K]; each sample with query k adds an edge
  **from the label y to every other token j of X** (not the reverse). Priority is reachability
  (``i`` has priority over or equal to ``j`` when j is reachable from i), never SCC ids (Tarjan's
  ids come in reverse topological order).

Everything here is numpy float64 / int64 (the paper's sizes are tiny: K <= 64, d <= 64);
strongly connected components and reachability come from ``scipy.sparse.csgraph``, the
Graph-SVM from ``scipy.optimize.nnls`` (an exact active-set solver) and ``W^fin`` from
``scipy.optimize.minimize`` (L-BFGS-B).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse.csgraph import connected_components, shortest_path

from iclgym.validation import as_bool, as_int, invalid

EMBEDDINGS = ("random", "ortho", "equi-corr")
"""Paper-mode embedding choices (the reference code's ``choice``)."""


# ------------------------------------------------------------------ paper-mode dataset
def paper_embeddings(
    num_tokens: int, d: int, embedding: str = "random", seed: int = 0
) -> np.ndarray:
    """(K, d) float64 fixed token embeddings of paper mode (the reference's ``choice``).

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
    """A paper-mode training set (Li et al. 2024): the fixed dataset whose TPGs, SCCs,
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
    """Draw the paper-mode dataset (Li et al. 2024, the reference's ``data_generator`` with
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
    cyclic = as_bool("cyclic", cyclic)
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
    """The empirical token-priority graphs of a training set and Oracle A (its prediction
    from the graphs, ``docs/envs/ICL-PriorityGraph-v0.md``).

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
        each sample with query k = contexts[i, -1] adds the edges y -> j for every other token j of
        its context (the reference code's orientation). Raises ``ValueError`` for bad shapes or
        ids."""
        k_tokens = as_int("num_tokens", num_tokens, 1)
        x, y = _check_samples(contexts, labels, k_tokens)
        adj = np.zeros((k_tokens, k_tokens, k_tokens), dtype=bool)
        q = np.repeat(x[:, -1], x.shape[1])
        src = np.repeat(y, x.shape[1])
        dst = x.reshape(-1)
        keep = src != dst
        adj[q[keep], src[keep], dst[keep]] = True
        return cls.from_adjacency(adj)

    @classmethod
    def from_adjacency(cls, adjacency: np.ndarray) -> EmpiricalTPG:
        """SCCs and reachability of given graphs ``adjacency`` (K, K, K) bool (``[query, from,
        to]``), e.g. the local graphs of :func:`local_graph_svm`."""
        adj = np.asarray(adjacency, dtype=bool)
        k_tokens = adj.shape[0]
        if adj.shape != (k_tokens,) * 3:
            raise invalid("adjacency", f"an array of shape {adj.shape}", "(K, K, K) bools")
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
        S*."""
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
        """Oracle A: ``(probs, ambiguous)`` for ``contexts`` (B, T) int.

        ``probs`` (B, K) float64: ``p(j) ∝ n_X(j) exp(beta[k, j])`` on the top set of
        :meth:`top_sets` and 0 elsewhere, with k the query and n_X(j) the count of j in X
        (multiplicities count); ``beta`` (K, K) defaults to 0 (count-weighted uniform), else e.g.
        :func:`token_scores` of ``W^fin``. ``ambiguous`` (B,) bool flags contexts whose
        undominated tokens span several SCCs: Oracle A is undefined there and the
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
    the model's W (d, d) (Li et al. 2024's score ``a_t = x_t^T W x_bar``)."""
    e = np.asarray(embeddings, dtype=np.float64)
    return (e @ np.asarray(w, dtype=np.float64) @ e.T).T


def corr(a: np.ndarray, b: np.ndarray) -> float:
    """``<A, B>_F / (||A|| ||B||)`` (Li et al. 2024's correlation); NaN when either is 0."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.sum(np.asarray(a) * np.asarray(b)) / (na * nb))


# ------------------------------------------------------------------ attention and its log-loss
def attention_weights(
    w: np.ndarray, contexts: np.ndarray, embeddings: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """(n, T) float64 softmax over the (kept) positions of ``a_t = E[x_t]^T W E[x_bar]``, the
    query ``x_bar`` = the context's last token even where ``mask`` drops it (as the reference); 0 at
    dropped positions."""
    e = np.asarray(embeddings, dtype=np.float64)
    x = np.asarray(contexts)
    scores = np.einsum("ntd,nd->nt", e[x], e[x[:, -1]] @ np.asarray(w, dtype=np.float64).T)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    scores = scores - scores.max(1, keepdims=True)
    s = np.exp(scores)
    return s / s.sum(1, keepdims=True)


def attention_nll(
    w: np.ndarray,
    contexts: np.ndarray,
    labels: np.ndarray,
    embeddings: np.ndarray,
    mask: np.ndarray | None = None,
    normalizer: int | None = None,
) -> tuple[float, np.ndarray]:
    """The paper's log-loss of the ``iden`` head and its gradient in W (Li et al. 2024):
    ``sum_i [logsumexp_t a_t - logsumexp_{t: x_t = y} a_t] / normalizer`` (= ``-log p_hat_y``
    with eps = 0; convex in W), over the positions of ``mask`` (n, T) bool if given (the
    reduced dataset), ``normalizer`` defaulting to n. Returns ``(loss, grad (d, d))``:
    ``grad = sum_i sum_t (s_t - s^y_t) x_t x_bar^T / normalizer`` with s the attention and s^y
    the attention renormalised on the label's positions. Raises ``ValueError`` when a label
    does not occur among its sample's (kept) positions (the loss would be infinite)."""
    e = np.asarray(embeddings, dtype=np.float64)
    x = np.asarray(contexts)
    y = np.asarray(labels)
    n = x.shape[0] if normalizer is None else normalizer
    keep = np.ones(x.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    xt, xq = e[x], e[x[:, -1]]
    scores = np.einsum("ntd,nd->nt", xt, xq @ np.asarray(w, dtype=np.float64).T)
    lab = keep & (x == y[:, None])
    if not lab.any(1).all():
        bad = int(np.flatnonzero(~lab.any(1))[0])
        raise invalid("labels", f"label {int(y[bad])} of sample {bad}", "a token of its context")
    full = np.where(keep, scores, -np.inf)
    own = np.where(lab, scores, -np.inf)
    mx = full.max(1, keepdims=True)
    lse_full = np.log(np.exp(full - mx).sum(1)) + mx[:, 0]
    lse_own = np.log(np.exp(own - mx).sum(1)) + mx[:, 0]
    s = np.exp(full - lse_full[:, None])
    sy = np.exp(own - lse_own[:, None])
    grad = np.einsum("nt,ntd,ne->de", s - sy, xt, xq) / n
    return float((lse_full - lse_own).sum() / n), grad


def normalized_gd(
    grad_fn, w0: np.ndarray, lr: float, steps: int, record: np.ndarray | None = None
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Full-batch normalised GD (Li et al. 2024): ``W <- W - lr G / ||G||_F`` with ``G =
    grad_fn(W)`` (a step with G = 0 leaves W). Returns the last iterate and the iterates at the
    steps in ``record`` (step 0 = ``w0``)."""
    w = np.array(w0, dtype=np.float64)
    wanted = set() if record is None else {int(r) for r in record}
    kept = {0: w.copy()} if 0 in wanted else {}
    for step in range(1, steps + 1):
        g = grad_fn(w)
        norm = np.linalg.norm(g)
        if norm > 0:
            w = w - lr * g / norm
        if step in wanted:
            kept[step] = w.copy()
    return w, kept


# ------------------------------------------------------------------ Graph-SVM
def _orthonormal_rows(a: np.ndarray) -> np.ndarray:
    """Orthonormal basis (r, m) of the row space of ``a`` by SVD (duplicates and redundant rows
    allowed)."""
    if a.shape[0] == 0:
        return np.zeros((0, a.shape[1]))
    _, sv, vt = np.linalg.svd(a, full_matrices=False)
    tol = max(a.shape) * np.finfo(np.float64).eps * (sv[0] if sv.size else 0.0)
    return vt[: int((sv > tol).sum())]


def _null_space(a: np.ndarray, m: int) -> np.ndarray:
    """(m, p) orthonormal basis of the null space of ``a`` (rows of length m)."""
    if a.shape[0] == 0:
        return np.eye(m)
    _, sv, vt = np.linalg.svd(a, full_matrices=True)
    tol = max(a.shape) * np.finfo(np.float64).eps * sv[0]
    return vt[int((sv > tol).sum()) :].T


@dataclass(frozen=True)
class GraphSVM:
    """The Graph-SVM solution (Li et al. 2024) with its constraints and dual certificate."""

    w: np.ndarray
    """(d, d) W^svm = argmin ||W||_F subject to the constraints."""
    eq: np.ndarray
    """(m_eq, d * d) rows a with a . vec(W) = 0: same-SCC pairs (vec = row-major flatten)."""
    ineq: np.ndarray
    """(m_in, d * d) rows a with a . vec(W) >= 1: label above a token of a lower SCC."""
    multipliers: np.ndarray
    """(m_in,) float64 lambda >= 0 of the inequalities: ``W^svm = P (A_in^T lambda)`` with P the
    projection onto the null space of the equalities (KKT stationarity), ``lambda_i > 0``
    only where the constraint is tight."""


def _sample_pairs(contexts: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(m, 3) int64 ``[k, y, j]``: every sample's query, label and each distinct other token."""
    pairs = []
    for x, y in zip(np.asarray(contexts).tolist(), np.asarray(labels).tolist(), strict=True):
        pairs.extend((x[-1], y, j) for j in sorted(set(x) - {y}))
    return np.array(pairs, dtype=np.int64).reshape(-1, 3)


def _pair_constraints(
    pairs: np.ndarray, embeddings: np.ndarray, tpg: EmpiricalTPG
) -> tuple[np.ndarray, np.ndarray]:
    e = np.asarray(embeddings, dtype=np.float64)
    k, y, j = pairs.T
    rows = np.einsum("ma,mb->mab", e[y] - e[j], e[k]).reshape(len(pairs), -1)
    same = tpg.scc[k, y] == tpg.scc[k, j]
    return rows[same], rows[~same]


def svm_constraints(
    contexts: np.ndarray, labels: np.ndarray, embeddings: np.ndarray, tpg: EmpiricalTPG
) -> tuple[np.ndarray, np.ndarray]:
    """The Graph-SVM's rows ``vec((E[y] - E[j]) E[k]^T)`` (so ``row . vec(W) = (e_y - e_j)^T W
    e_k``) for every sample (query k, label y) and every token j != y of its context (once per
    distinct j): ``(eq, ineq)``, the same-SCC pairs and the others (Li et al. 2024)."""
    return _pair_constraints(_sample_pairs(contexts, labels), embeddings, tpg)


def _solve_svm(eq: np.ndarray, ineq: np.ndarray, d: int) -> GraphSVM:
    from scipy.optimize import nnls

    if ineq.shape[0] == 0:
        return GraphSVM(np.zeros((d, d)), eq, ineq, np.zeros(0))
    null = _null_space(eq, d * d)
    g = ineq @ null
    p = g.shape[1]
    lhs = np.vstack([g.T, np.ones((1, g.shape[0]))])
    rhs = np.zeros(p + 1)
    rhs[-1] = 1.0
    u, _ = nnls(lhs, rhs, maxiter=50 * lhs.shape[1])
    gap = 1.0 - u.sum()
    if gap <= 1e-12:
        raise ValueError(
            "the Graph-SVM constraints are infeasible (an inequality contradicts the "
            "equalities): no W separates the labels' SCCs"
        )
    lam = u / gap
    w = (null @ (g.T @ lam)).reshape(d, d)
    return GraphSVM(w, eq, ineq, lam)


def graph_svm(
    contexts: np.ndarray,
    labels: np.ndarray,
    embeddings: np.ndarray,
    tpg: EmpiricalTPG | None = None,
) -> GraphSVM:
    """W^svm of a training set (Li et al. 2024's Graph-SVM): ``min ||W||_F`` s.t. ``(e_y - e_j)^T W
    e_k = 0`` when y and j share an SCC of G^(k) and ``>= 1`` otherwise, over every sample and other
    token j of its context, with e the embedding vectors ``E[id]``.

    The redundant equalities are eliminated by the null space N of their rows (SVD),
    ``vec(W) = N z``; the inequality QP ``min ||z||`` s.t. ``G z >= 1`` (``G = A_in N``) is a
    least-distance program, solved exactly by non-negative least squares (Lawson and Hanson,
    *Solving Least Squares Problems*, ch. 23: ``u = argmin_{u >= 0} ||[G^T; 1^T] u - e_last||``,
    then ``z = G^T u / (1 - 1^T u)``), with ``scipy.optimize.nnls``. The dual multipliers are
    ``lambda = u / (1 - 1^T u)``. With no inequality W^svm = 0. Raises ``ValueError`` when the
    constraints are infeasible (never for a TPG: its condensation is a DAG).
    """
    e = np.asarray(embeddings, dtype=np.float64)
    if tpg is None:
        tpg = EmpiricalTPG.fit(contexts, labels, e.shape[0])
    eq, ineq = svm_constraints(contexts, labels, e, tpg)
    return _solve_svm(eq, ineq, e.shape[1])


def local_graph_svm(
    contexts: np.ndarray,
    token_attention: np.ndarray,
    embeddings: np.ndarray,
    select: float = 1e-2,
    ignore_low: float = 9e-3,
) -> tuple[GraphSVM, EmpiricalTPG]:
    """The local Graph-SVM of a trained model ("Local SVM", the reference code's
    local-convergence runs): ``(svm, local_tpg)``.

    ``token_attention`` (n, K): each sample's attention summed per token id at the trained W.
    The selected set C_i holds the tokens with attention > ``select``; tokens with attention in
    (``ignore_low``, ``select``] are ignored; every c in C_i acts as a label, with an edge c ->
    j to every other non-ignored token j of the context under its query. The Graph-SVM of
    those edges (equalities inside the SCCs of the local graphs, ``>= 1`` across) is solved as
    in :func:`graph_svm`."""
    x = np.asarray(contexts, dtype=np.int64)
    att = np.asarray(token_attention, dtype=np.float64)
    e = np.asarray(embeddings, dtype=np.float64)
    kk = e.shape[0]
    if att.shape != (x.shape[0], kk):
        raise invalid("token_attention", f"an array of shape {att.shape}", f"({x.shape[0]}, {kk})")
    pairs = []
    for row, a in zip(x.tolist(), att, strict=True):
        tokens = sorted(set(row))
        kept = [j for j in tokens if not ignore_low < a[j] <= select]
        pairs.extend((row[-1], c, j) for c in kept if a[c] > select for j in kept if j != c)
    pairs_arr = np.array(pairs, dtype=np.int64).reshape(-1, 3)
    adj = np.zeros((kk, kk, kk), dtype=bool)
    adj[pairs_arr[:, 0], pairs_arr[:, 1], pairs_arr[:, 2]] = True
    tpg = EmpiricalTPG.from_adjacency(adj)
    eq, ineq = _pair_constraints(pairs_arr, e, tpg)
    return _solve_svm(eq, ineq, e.shape[1]), tpg


def token_attention(w: np.ndarray, contexts: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """(n, K) float64 the attention at W summed per token id (the ``iden`` head's p_hat)."""
    x = np.asarray(contexts, dtype=np.int64)
    s = attention_weights(w, x, embeddings)
    out = np.zeros((x.shape[0], np.asarray(embeddings).shape[0]))
    np.add.at(out, (np.arange(x.shape[0])[:, None], x), s)
    return out


# ------------------------------------------------------------------ finite component
@dataclass(frozen=True)
class ReducedData:
    """The reduced dataset (Li et al. 2024's finite component): samples whose label's SCC holds
    another token of the context, restricted to the positions of that SCC; the query stays the
    original last token, as in the reference code."""

    index: np.ndarray
    """(m,) int64 indices of the kept samples in the full dataset."""
    contexts: np.ndarray
    """(m, T) int64 the kept samples' full contexts."""
    labels: np.ndarray
    """(m,) int64 their labels."""
    mask: np.ndarray
    """(m, T) bool the positions whose token lies in the label's SCC of G^(k)."""


def reduced_dataset(contexts: np.ndarray, labels: np.ndarray, tpg: EmpiricalTPG) -> ReducedData:
    """:class:`ReducedData` of a training set and its TPG."""
    x = np.asarray(contexts, dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)
    q = x[:, -1]
    ids = tpg.scc[q[:, None], x]
    mask = ids == tpg.scc[q, y][:, None]
    keep = (mask & (x != y[:, None])).any(1)
    index = np.flatnonzero(keep)
    return ReducedData(index, x[index], y[index], mask[index])


def finite_subspace(tpg: EmpiricalTPG, embeddings: np.ndarray) -> np.ndarray:
    """(r, d, d) orthonormal basis of ``S_fin = span{(e_i - e_j) e_k^T : i, j in one SCC of
    G^(k)}`` (Li et al. 2024), by SVD of the generators (they hold duplicates)."""
    e = np.asarray(embeddings, dtype=np.float64)
    d = e.shape[1]
    gens = []
    for k in range(tpg.num_tokens):
        for i in range(tpg.num_tokens):
            for j in range(i + 1, tpg.num_tokens):
                if tpg.scc[k, i] == tpg.scc[k, j]:
                    gens.append(np.outer(e[i] - e[j], e[k]).reshape(-1))
    basis = _orthonormal_rows(np.array(gens).reshape(-1, d * d))
    return basis.reshape(-1, d, d)


def project(w: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """(d, d) orthogonal projection of W onto the span of an orthonormal ``basis`` (r, d, d)."""
    if basis.shape[0] == 0:
        return np.zeros_like(np.asarray(w, dtype=np.float64))
    coef = np.einsum("rij,ij->r", basis, w)
    return np.einsum("r,rij->ij", coef, basis)


def finite_component(
    reduced: ReducedData, embeddings: np.ndarray, basis: np.ndarray, n: int
) -> tuple[np.ndarray, float]:
    """``(W^fin, optimum)``: the minimiser over S_fin (``basis`` (r, d, d)) of the reduced
    log-loss summed over the reduced samples and divided by the full ``n`` (Li et al. 2024), by
    L-BFGS-B (``scipy.optimize.minimize``, gradient tolerance 1e-12) from 0, and the loss
    there. W^fin = 0 and optimum 0 when S_fin or the reduced data is empty; W^fin is 0 when the
    reduced data is symmetric. Raises ``ValueError`` if the minimiser does not converge (an
    unbounded direction)."""
    from scipy.optimize import minimize

    e = np.asarray(embeddings, dtype=np.float64)
    d = e.shape[1]
    if basis.shape[0] == 0 or reduced.index.size == 0:
        return np.zeros((d, d)), 0.0

    def fun(c: np.ndarray) -> tuple[float, np.ndarray]:
        w = np.einsum("r,rij->ij", c, basis)
        loss, grad = attention_nll(w, reduced.contexts, reduced.labels, e, reduced.mask, n)
        return loss, np.einsum("rij,ij->r", basis, grad)

    res = minimize(
        fun,
        np.zeros(basis.shape[0]),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000},
    )
    grad_norm = float(np.linalg.norm(fun(res.x)[1]))
    if grad_norm > 1e-6:
        raise ValueError(
            f"W^fin did not converge (gradient norm {grad_norm:.2e} after {res.nit} "
            "iterations): the reduced log-loss has no finite minimiser on S_fin"
        )
    return np.einsum("r,rij->ij", res.x, basis), float(res.fun)


def implicit_bias_probs(
    contexts: np.ndarray,
    w_svm: np.ndarray,
    w_fin: np.ndarray,
    embeddings: np.ndarray,
    num_tokens: int,
    tol: float = 1e-6,
) -> np.ndarray:
    """Oracle B (the implicit-bias limit): (B, K) float64 the limit of the model along
    ``W^fin + R W^svm``, R -> inf: keep the positions whose ``x_t^T W^svm x_bar`` is within
    ``tol * ||W^svm||`` of the context's maximum, softmax ``x_t^T W^fin x_bar`` over them and
    sum per token."""
    e = np.asarray(embeddings, dtype=np.float64)
    x = np.asarray(contexts, dtype=np.int64)
    hard = np.einsum("ntd,nd->nt", e[x], e[x[:, -1]] @ np.asarray(w_svm).T)
    keep = hard >= hard.max(1, keepdims=True) - tol * max(np.linalg.norm(w_svm), 1e-300)
    s = attention_weights(w_fin, x, e, keep)
    probs = np.zeros((x.shape[0], num_tokens))
    np.add.at(probs, (np.arange(x.shape[0])[:, None], x), s)
    return probs


# ------------------------------------------------------------------ the whole theory
@dataclass(frozen=True)
class PaperTheory:
    """Everything the paper's theory predicts for a training set (Li et al. 2024): build with
    :meth:`fit`, score a trained W with :meth:`metrics`."""

    contexts: np.ndarray
    """(n, T) int64."""
    labels: np.ndarray
    """(n,) int64."""
    embeddings: np.ndarray
    """(K, d) float64."""
    tpg: EmpiricalTPG
    svm: GraphSVM
    reduced: ReducedData
    basis: np.ndarray
    """(r, d, d) orthonormal basis of S_fin."""
    w_fin: np.ndarray
    """(d, d) W^fin."""
    reduced_optimum: float
    """The reduced log-loss at W^fin (normalised by the full n): the plateau of the training
    loss (2 ln 2 / 6 in one cyclic trial of the reference notebooks)."""

    @classmethod
    def fit(cls, contexts: np.ndarray, labels: np.ndarray, embeddings: np.ndarray) -> PaperTheory:
        """TPG, W^svm, reduced dataset, S_fin and W^fin of ``contexts`` (n, T), ``labels``
        (n,) and ``embeddings`` (K, d) (e.g. a :class:`PaperDataset`'s)."""
        e = np.asarray(embeddings, dtype=np.float64)
        tpg = EmpiricalTPG.fit(contexts, labels, e.shape[0])
        x, y = _check_samples(contexts, labels, e.shape[0])
        svm = graph_svm(x, y, e, tpg)
        reduced = reduced_dataset(x, y, tpg)
        basis = finite_subspace(tpg, e)
        w_fin, optimum = finite_component(reduced, e, basis, x.shape[0])
        return cls(x, y, e, tpg, svm, reduced, basis, w_fin, optimum)

    @classmethod
    def of(cls, dataset: PaperDataset) -> PaperTheory:
        """:meth:`fit` on a :class:`PaperDataset`."""
        return cls.fit(dataset.contexts, dataset.labels, dataset.embeddings)

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def w_svm(self) -> np.ndarray:
        return self.svm.w

    def loss(self, w: np.ndarray) -> float:
        """The training log-loss (mean ``-log p_hat_y``, eps = 0) at W."""
        return attention_nll(w, self.contexts, self.labels, self.embeddings)[0]

    def reduced_run(self, lr: float, steps: int, record: np.ndarray | None = None) -> tuple:
        """The separate reduced-data run of Li et al. 2024's norm-difference metric: normalised GD
        from W = 0 on the reduced log-loss (normalised by the full n) with the gradient projected on
        S_fin (the iterates stay there); returns :func:`normalized_gd`'s ``(last, recorded)``."""
        red, e, b = self.reduced, self.embeddings, self.basis
        d = e.shape[1]
        if red.index.size == 0:
            zero = np.zeros((d, d))
            return zero, {int(r): zero for r in (record if record is not None else [])}

        def grad(w: np.ndarray) -> np.ndarray:
            g = attention_nll(w, red.contexts, red.labels, e, red.mask, self.n)[1]
            return project(g, b)

        return normalized_gd(grad, np.zeros((d, d)), lr, steps, record)

    def decomposition(self, w: np.ndarray) -> tuple[float, float]:
        """``(R, corr)``: the least-squares scalar R of ``W ~ W^fin + R W^svm / ||W^svm||`` and
        ``corr(W, W^fin + R W^svm / ||W^svm||)`` (Li et al. 2024's decomposition)."""
        unit = self.w_svm / np.linalg.norm(self.w_svm)
        r = float(np.sum((np.asarray(w) - self.w_fin) * unit))
        return r, corr(w, self.w_fin + r * unit)

    def metrics(self, w: np.ndarray, w_fin_tau: np.ndarray | None = None) -> dict[str, float]:
        """The paper-mode metrics of a model's W (d, d) on the training set (Li et al. 2024):

        - ``corr_svm``: corr(W, W^svm); ``corr_decomp`` and ``R``: :meth:`decomposition`;
          ``R_raw = R / ||W^svm||``, the coefficient of the unnormalised W^svm (the scale of
          the reference notebooks' fitted R, 9.19 and 7.67 in two cyclic trials);
        - ``proj_corr``: corr(W^svm, W - Pi_{S_fin} W);
        - ``norm_diff``: ``||Pi_{S_fin} W - W^fin(tau)||_F`` when the reduced run's iterate
          ``w_fin_tau`` is given (NaN otherwise); ``fin_diff``: ``||Pi_{S_fin} W - W^fin||``;
        - ``top_scc_mass``: per sample, the attention summed per SCC of G^(k), the largest,
          averaged; ``min_top_scc_mass`` its minimum;
        - ``label_attention`` (``min_label_attention``): mean (min) attention on the label's
          positions, p_hat_y;
        - ``oracle_b_tv`` (``max_oracle_b_tv``): mean (max) total variation between the model's
          p_hat (attention summed per token) and Oracle B on the training contexts: the
          distance to the implicit-bias limit;
        - ``nll``: the training log-loss; ``norm_W``: ||W||_F.

        Every name is a valid model-metric name of the trainer (:meth:`model_metrics`).
        """
        w = np.asarray(w, dtype=np.float64)
        s = attention_weights(w, self.contexts, self.embeddings)
        q = self.contexts[:, -1]
        ids = self.tpg.scc[q[:, None], self.contexts]  # (n, T)
        per_scc = np.zeros((self.n, self.tpg.num_tokens))
        np.add.at(per_scc, (np.arange(self.n)[:, None], ids), s)
        top = per_scc.max(1)
        label = (s * (self.contexts == self.labels[:, None])).sum(1)
        proj = project(w, self.basis)
        r, c = self.decomposition(w)
        p_hat = np.zeros((self.n, self.tpg.num_tokens))
        np.add.at(p_hat, (np.arange(self.n)[:, None], self.contexts), s)
        tv = 0.5 * np.abs(p_hat - self.oracle_b(self.contexts)).sum(1)
        return {
            "corr_svm": corr(w, self.w_svm),
            "corr_decomp": c,
            "R": r,
            "R_raw": r / float(np.linalg.norm(self.w_svm)),
            "proj_corr": corr(self.w_svm, w - proj),
            "norm_diff": (
                float(np.linalg.norm(proj - w_fin_tau)) if w_fin_tau is not None else float("nan")
            ),
            "fin_diff": float(np.linalg.norm(proj - self.w_fin)),
            "top_scc_mass": float(top.mean()),
            "min_top_scc_mass": float(top.min()),
            "label_attention": float(label.mean()),
            "min_label_attention": float(label.min()),
            "oracle_b_tv": float(tv.mean()),
            "max_oracle_b_tv": float(tv.max()),
            "nll": self.loss(w),
            "norm_W": float(np.linalg.norm(w)),
        }

    def model_metrics(self, model: object) -> dict[str, float]:
        """:meth:`metrics` (without ``norm_diff``) of a model with a (d, d) ``weight`` (W, e.g.
        :class:`baselines.priority_attention.PriorityAttention`) and an ``embeddings`` (K, d)
        table; ``{}`` for a model without them. The body of a paper-mode task's
        ``model_metrics`` hook (the trainer logs them at every evaluation, and calls it once
        before training). ``ValueError`` when the model's embeddings are not this dataset's
        (another shape, or an entry off by more than 1e-6): the theory (W^svm, W^fin) is of
        the dataset's E, so such a run would train on the wrong geometry and log nothing."""
        w = getattr(model, "weight", None)
        e = getattr(model, "embeddings", None)
        if w is None or e is None or not hasattr(w, "detach") or not hasattr(e, "detach"):
            return {}
        w = w.detach().cpu().double().numpy()
        e = e.detach().cpu().double().numpy()
        shape = self.embeddings.shape
        off = np.abs(e - self.embeddings).max() if e.shape == shape else np.inf
        if w.shape != (shape[1],) * 2 or off > 1e-6:
            raise ValueError(
                f"the model's embeddings {e.shape} are not this paper-mode dataset's {shape} "
                f"(largest difference {off:.3g}): build the model with the dataset's E "
                "(priority_attention: embedding_seed = the task's instance_seed, the same d and "
                "embedding; e.g. --set instance_seed=3 --model-arg embedding_seed=3)"
            )
        out = self.metrics(w)
        del out["norm_diff"]
        return out

    def oracle_a(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Oracle A with ``beta = token_scores(W^fin)``: ``(probs (B, K), ambiguous (B,))``."""
        return self.tpg.predict(contexts, token_scores(self.w_fin, self.embeddings))

    def oracle_b(self, contexts: np.ndarray) -> np.ndarray:
        """Oracle B (:func:`implicit_bias_probs` of W^svm and W^fin): (B, K) float64."""
        return implicit_bias_probs(
            contexts, self.w_svm, self.w_fin, self.embeddings, self.tpg.num_tokens
        )


__all__ = [
    "EMBEDDINGS",
    "EmpiricalTPG",
    "GraphSVM",
    "PaperDataset",
    "PaperTheory",
    "ReducedData",
    "attention_nll",
    "attention_weights",
    "corr",
    "finite_component",
    "finite_subspace",
    "graph_svm",
    "implicit_bias_probs",
    "local_graph_svm",
    "normalized_gd",
    "paper_dataset",
    "paper_embeddings",
    "project",
    "reduced_dataset",
    "svm_constraints",
    "token_attention",
    "token_scores",
]
