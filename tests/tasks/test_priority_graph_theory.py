"""Token-priority-graph theory (``iclgym.tasks.priority_graph_theory``): the paper-mode dataset,
the empirical TPG (Oracle A), the Graph-SVM, the finite component and Oracle B, against hand
examples, plain reference code written here and the laws of Li et al. 2024 (arXiv 2403.08081)
and its reference code."""

from __future__ import annotations

import numpy as np
import pytest

from iclgym.tasks.priority_graph_theory import (
    EmpiricalTPG,
    PaperTheory,
    attention_nll,
    attention_weights,
    finite_subspace,
    graph_svm,
    normalized_gd,
    paper_dataset,
    paper_embeddings,
    project,
    reduced_dataset,
    token_scores,
)


# ------------------------------------------------------------------ plain references
def plain_graphs(contexts, labels, k):
    """Edges label -> other context token per query, written as loops."""
    adj = np.zeros((k, k, k), dtype=bool)
    for x, y in zip(contexts.tolist(), labels.tolist(), strict=True):
        for j in x:
            if j != y:
                adj[x[-1], y, j] = True
    return adj


def plain_reach(adj):
    """Floyd-Warshall transitive closure, reflexive."""
    k = adj.shape[-1]
    reach = adj | np.eye(k, dtype=bool)[None]
    for m in range(k):
        reach = reach | (reach[:, :, m : m + 1] & reach[:, m : m + 1, :])
    return reach


# ------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("kind", ["random", "ortho", "equi-corr"])
def test_embeddings_have_their_gram_matrix(kind):
    e = paper_embeddings(6, 8, kind, seed=3)
    assert e.shape == (6, 8) and e.dtype == np.float64
    gram = e @ e.T
    np.testing.assert_allclose(np.diag(gram), 1.0, atol=1e-12)
    if kind == "ortho":
        np.testing.assert_allclose(gram, np.eye(6), atol=1e-12)
    elif kind == "equi-corr":
        np.testing.assert_allclose(gram, 0.5 + 0.5 * np.eye(6), atol=1e-12)
    else:
        assert np.linalg.matrix_rank(e) == 6
    np.testing.assert_array_equal(e, paper_embeddings(6, 8, kind, seed=3))
    assert not np.allclose(e, paper_embeddings(6, 8, kind, seed=4))


@pytest.mark.parametrize(
    ("kind", "d", "match"),
    [("random", 5, "d=5"), ("ortho", 5, "d=5"), ("equi-corr", 6, "d=6"), ("gauss", 8, "embed")],
)
def test_embeddings_refuse_too_small_d_or_unknown_kind(kind, d, match):
    with pytest.raises(ValueError, match=match):
        paper_embeddings(6, d, kind)


# ------------------------------------------------------------------ dataset
@pytest.mark.parametrize(
    ("n", "t", "k", "cyclic"),
    [(6, 4, 6, True), (4, 6, 8, False), (10, 6, 8, True), (5, 9, 4, True), (3, 3, 5, False)],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dataset_meets_its_condition_and_labels_occur(n, t, k, cyclic, seed):
    ds = paper_dataset(n, t, k, 8, cyclic=cyclic, seed=seed)
    assert ds.contexts.shape == (n, t) and ds.contexts.dtype == np.int64
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int64
    assert ds.embeddings.shape == (k, 8) and ds.tries >= 1
    assert (ds.contexts == ds.labels[:, None]).any(1).all()  # y always in X
    if t <= k:  # distinct tokens
        assert all(len(set(row)) == t for row in ds.contexts.tolist())
    else:  # a permutation of [K] first
        np.testing.assert_array_equal(
            np.sort(ds.contexts[:, :k], 1), np.arange(k)[None].repeat(n, 0)
        )
    adj = plain_graphs(ds.contexts, ds.labels, k)
    reach = plain_reach(adj)
    mutual = reach & np.swapaxes(reach, 1, 2) & ~np.eye(k, dtype=bool)[None]
    assert mutual.any() == cyclic  # an SCC of >= 2 nodes iff two nodes reach each other
    again = paper_dataset(n, t, k, 8, cyclic=cyclic, seed=seed)
    np.testing.assert_array_equal(again.contexts, ds.contexts)
    np.testing.assert_array_equal(again.labels, ds.labels)


def test_label_is_uniform_over_positions_with_distinct_tokens():
    # n large: the cyclic condition holds at the first draw, so this is the raw label law
    ds = paper_dataset(20_000, 4, 6, 8, cyclic=True, seed=0)
    assert ds.tries == 1
    pos = (ds.contexts == ds.labels[:, None]).argmax(1)
    counts = np.bincount(pos, minlength=4)
    expected = ds.n / 4
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


def test_label_is_uniform_over_tokens_when_contexts_hold_every_token():
    ds = paper_dataset(20_000, 7, 4, 8, cyclic=True, seed=1)  # T > K: a permutation first
    counts = np.bincount(ds.labels, minlength=4)
    chi2 = ((counts - ds.n / 4) ** 2 / (ds.n / 4)).sum()
    assert chi2 < 16.3


def test_dataset_errors_name_the_condition_and_parameters():
    with pytest.raises(ValueError, match=r"strongly connected.*cyclic=True.*max_tries=30"):
        paper_dataset(1, 4, 6, 8, cyclic=True, max_tries=30)
    with pytest.raises(ValueError, match="n=0"):
        paper_dataset(0, 4, 6, 8)
    with pytest.raises(ValueError, match="num_tokens=1"):
        paper_dataset(3, 4, 1, 8)
    with pytest.raises(ValueError, match="cyclic='yes'"):
        paper_dataset(3, 4, 6, 8, cyclic="yes")
    with pytest.raises(ValueError, match="d=4"):
        paper_dataset(3, 4, 6, 4)


# ------------------------------------------------------------------ TPG and Oracle A
def hand_tpg():
    """Query 2: samples [0,1,2]->0 and [1,0,2]->1 make {0,1} one SCC above 2; [3,4,2]->3 puts 3
    above 4 and 2. Query 4: [0,4]->4 (edge 4 -> 0)."""
    contexts = np.array([[0, 1, 2], [1, 0, 2], [3, 4, 2], [0, 0, 4]])
    labels = np.array([0, 1, 3, 4])
    return EmpiricalTPG.fit(contexts, labels, 5)


def test_edges_run_from_the_label_to_the_other_tokens():
    g = EmpiricalTPG.fit(np.array([[0, 1, 2]]), np.array([0]), 3)
    assert g.adjacency[2, 0, 1] and g.adjacency[2, 0, 2]
    assert g.adjacency.sum() == 2  # nothing else: no reverse edge, no other query
    assert g.reach[2, 0, 1] and not g.reach[2, 1, 0]


def test_scc_and_reachability_of_a_hand_example():
    g = hand_tpg()
    assert g.scc[2, 0] == g.scc[2, 1]
    assert len({g.scc[2, 0], g.scc[2, 2], g.scc[2, 3], g.scc[2, 4]}) == 4
    assert g.scc_sizes[2, 0] == 2 and g.scc_sizes[2, 3] == 1 and g.has_cycle
    assert g.reach[2, 0, 2] and g.reach[2, 1, 2] and not g.reach[2, 2, 0]
    assert g.reach[2, 3, 4] and not g.reach[2, 3, 0] and not g.reach[2, 0, 3]
    assert g.reach[4, 4, 0] and not g.reach[4, 0, 4]
    assert not g.adjacency[0].any() and (g.scc_sizes[0] == 1).all()
    np.testing.assert_array_equal(g.reach, plain_reach(g.adjacency))


def test_oracle_a_on_a_hand_example():
    g = hand_tpg()
    contexts = np.array(
        [
            [0, 1, 2, 2],  # {0, 1} on top: half each
            [0, 0, 1, 2],  # multiplicity: 2/3, 1/3
            [4, 3, 2, 2],  # 3 beats 4 and 2
            [0, 3, 3, 2],  # {0, 1} and {3} incomparable: ambiguous
            [1, 2, 2, 2],  # 1 beats 2
            [0, 1, 1, 4],  # query 4: 4 beats 0, 1 never seen: {1} and {4} ambiguous
        ]
    )
    probs, ambiguous = g.predict(contexts)
    assert probs.dtype == np.float64 and probs.shape == (6, 5)
    np.testing.assert_allclose(probs[0], [0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(probs[1], [2 / 3, 1 / 3, 0, 0, 0])
    np.testing.assert_allclose(probs[2], [0, 0, 0, 1, 0])
    np.testing.assert_allclose(probs[4], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(ambiguous, [False, False, False, True, False, True])
    # the documented fallback: count-weighted over every undominated token
    np.testing.assert_allclose(probs[3], [1 / 3, 0, 0, 2 / 3, 0])
    np.testing.assert_allclose(probs[5], [0, 2 / 3, 0, 0, 1 / 3])
    beta = np.zeros((5, 5))
    beta[2, 0] = np.log(3.0)
    probs, _ = g.predict(contexts[:2], beta=beta)
    np.testing.assert_allclose(probs[0], [0.75, 0.25, 0, 0, 0])
    np.testing.assert_allclose(probs[1], [6 / 7, 1 / 7, 0, 0, 0])
    with pytest.raises(ValueError, match="beta"):
        g.predict(contexts, beta=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="contexts"):
        g.predict(np.array([[0, 5]]))


@pytest.mark.parametrize("seed", range(6))
def test_the_label_is_always_in_the_unique_top_scc_of_its_training_context(seed):
    ds = paper_dataset(10, 6, 8, 8, cyclic=True, seed=seed)
    g = EmpiricalTPG.fit(ds.contexts, ds.labels, 8)
    top, ambiguous = g.top_sets(ds.contexts)
    assert not ambiguous.any()
    assert top[np.arange(ds.n), ds.labels].all()
    same = g.scc[ds.queries[:, None], ds.contexts] == g.scc[ds.queries, ds.labels][:, None]
    present_top = top[np.arange(ds.n)[:, None], ds.contexts]
    np.testing.assert_array_equal(present_top, same)  # top = the label's SCC within X


def test_token_scores_follow_the_linear_convention():
    e = paper_embeddings(4, 5, "random", seed=0)
    w = np.random.default_rng(0).standard_normal((5, 5))
    beta = token_scores(w, e)
    assert beta[1, 3] == pytest.approx(e[3] @ w @ e[1])  # a_t = x_t^T W x_bar, query 1


# ------------------------------------------------------------------ Graph-SVM
def _svm_case(seed, n=6, t=4, k=6, cyclic=True):
    ds = paper_dataset(n, t, k, 8, cyclic=cyclic, seed=seed)
    return ds, EmpiricalTPG.fit(ds.contexts, ds.labels, k)


@pytest.mark.parametrize(("seed", "cyclic"), [(0, True), (1, True), (2, False), (3, True)])
def test_graph_svm_is_feasible_and_satisfies_kkt(seed, cyclic):
    ds, tpg = _svm_case(seed, cyclic=cyclic)
    svm = graph_svm(ds.contexts, ds.labels, ds.embeddings, tpg)
    w = svm.w.reshape(-1)
    assert svm.eq.shape[0] > 0 if cyclic else svm.eq.shape[0] == 0
    # primal feasibility
    np.testing.assert_allclose(svm.eq @ w, 0.0, atol=1e-9)
    slack = svm.ineq @ w - 1.0
    assert slack.min() >= -1e-9
    # dual feasibility and complementary slackness
    assert (svm.multipliers >= 0).all()
    np.testing.assert_allclose(svm.multipliers * slack, 0.0, atol=1e-9)
    assert (svm.multipliers > 1e-9).any()
    # stationarity: W - A_in^T lambda lies in the row space of the equalities
    resid = w - svm.ineq.T @ svm.multipliers
    if svm.eq.shape[0]:
        coef, *_ = np.linalg.lstsq(svm.eq.T, resid, rcond=None)
        resid = resid - svm.eq.T @ coef
    np.testing.assert_allclose(resid, 0.0, atol=1e-8)


def test_graph_svm_equals_a_generic_solver_on_a_tiny_case():
    from scipy.optimize import minimize

    ds, tpg = _svm_case(5, n=3, t=3, k=4, cyclic=False)
    svm = graph_svm(ds.contexts, ds.labels, ds.embeddings, tpg)
    d = ds.embeddings.shape[1]
    cons = [{"type": "ineq", "fun": lambda w: svm.ineq @ w - 1.0, "jac": lambda w: svm.ineq}]
    res = minimize(
        lambda w: (w @ w, 2 * w),
        np.ones(d * d),
        jac=True,
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success
    np.testing.assert_allclose(svm.w.reshape(-1), res.x, atol=1e-6)


def test_hand_graph_svm_with_one_hot_embeddings():
    # query 2: labels 0 over {1, 2}; the minimum-norm W puts scores (1/2, -1/2) on
    # (e_0 - e_1) and (e_0 - e_2) halves: beta[2] = (2/3, -1/3, -1/3) e_2 component
    e = np.eye(3)
    svm = graph_svm(np.array([[0, 1, 2]]), np.array([0]), e)
    beta = token_scores(svm.w, e)
    np.testing.assert_allclose(beta[2], [2 / 3, -1 / 3, -1 / 3], atol=1e-12)
    np.testing.assert_allclose(np.delete(beta, 2, axis=0), 0.0, atol=1e-12)


def test_svm_is_orthogonal_to_s_fin_which_is_the_span_of_the_equalities():
    for seed in range(4):
        ds, tpg = _svm_case(seed, n=10, t=6, k=8)
        svm = graph_svm(ds.contexts, ds.labels, ds.embeddings, tpg)
        basis = finite_subspace(tpg, ds.embeddings)
        assert basis.shape[0] >= 1
        np.testing.assert_allclose(np.einsum("rij,ij->r", basis, svm.w), 0.0, atol=1e-9)
        eq_rank = np.linalg.matrix_rank(svm.eq)
        joint = np.vstack([svm.eq, basis.reshape(basis.shape[0], -1)])
        assert eq_rank == basis.shape[0] == np.linalg.matrix_rank(joint)


def test_s_fin_rank_of_a_hand_case():
    # one-hot E (d = K = 5): query 2 has the SCC {0, 1}; query 4 the SCC {0, 1, 3}
    contexts = np.array([[0, 1, 2], [1, 0, 2], [0, 1, 4], [1, 3, 4], [3, 0, 4]])
    labels = np.array([0, 1, 0, 1, 3])
    tpg = EmpiricalTPG.fit(contexts, labels, 5)
    assert tpg.scc_sizes[2, 0] == 2 and tpg.scc_sizes[4, 0] == 3
    basis = finite_subspace(tpg, np.eye(5))
    assert basis.shape == (3, 5, 5)  # 1 + 2 directions despite 1 + 3 generators
    gram = np.einsum("rij,sij->rs", basis, basis)
    np.testing.assert_allclose(gram, np.eye(3), atol=1e-12)
    assert np.abs(basis[:, :, [0, 1, 3]]).max() < 1e-12  # only query columns 2 and 4
    w = np.zeros((5, 5))
    w[0, 2], w[1, 2] = 1.0, -1.0  # (e_0 - e_1) e_2^T is in S_fin
    np.testing.assert_allclose(project(w, basis), w, atol=1e-12)


def test_reduced_data_keeps_the_label_scc_and_the_query():
    contexts = np.array([[0, 1, 4, 2], [1, 0, 4, 2], [3, 0, 1, 2], [4, 3, 0, 2]])
    labels = np.array([0, 1, 3, 3])
    tpg = EmpiricalTPG.fit(contexts, labels, 5)
    red = reduced_dataset(contexts, labels, tpg)
    np.testing.assert_array_equal(red.index, [0, 1])  # 3 and 4 are alone in their SCCs
    np.testing.assert_array_equal(red.mask, [[1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(red.contexts[:, -1], [2, 2])  # the query stays


def test_w_fin_is_zero_for_symmetric_reduced_data():
    contexts = np.array([[0, 1, 4, 2], [1, 0, 4, 2], [3, 4, 0, 2]])
    labels = np.array([0, 1, 3])
    th = PaperTheory.fit(contexts, labels, paper_embeddings(5, 6, "random", seed=1))
    assert th.basis.shape[0] == 1 and th.reduced.index.size == 2
    np.testing.assert_allclose(th.w_fin, 0.0, atol=1e-10)
    assert th.reduced_optimum == pytest.approx(2 * np.log(2) / 3)


def test_w_fin_composes_by_the_label_frequencies():
    # SCC {0, 1} under query 2, label 0 twice and 1 once: p_hat(0) = 2/3 at the optimum
    contexts = np.array([[0, 1, 2], [0, 1, 2], [1, 0, 2], [3, 0, 2]])
    labels = np.array([0, 0, 1, 3])
    e = paper_embeddings(4, 5, "random", seed=2)
    th = PaperTheory.fit(contexts, labels, e)
    beta = token_scores(th.w_fin, e)
    assert beta[2, 0] - beta[2, 1] == pytest.approx(np.log(2), abs=1e-7)
    expected = -(2 * np.log(2 / 3) + np.log(1 / 3)) / 4
    assert th.reduced_optimum == pytest.approx(expected, abs=1e-10)
    probs, ambiguous = th.oracle_a(contexts)
    np.testing.assert_allclose(probs[0], [2 / 3, 1 / 3, 0, 0], atol=1e-7)
    np.testing.assert_allclose(th.oracle_b(contexts), probs, atol=1e-6)
    assert not ambiguous.any()
    # the model along W^fin + R W^svm tends to Oracle B
    unit = th.w_svm / np.linalg.norm(th.w_svm)
    s = attention_weights(th.w_fin + 200.0 * unit, contexts, e)
    model = np.zeros((4, 4))
    np.add.at(model, (np.arange(4)[:, None], contexts), s)
    np.testing.assert_allclose(model, th.oracle_b(contexts), atol=1e-6)
    r, c = th.decomposition(th.w_fin + 7.0 * unit)
    assert r == pytest.approx(7.0) and c == pytest.approx(1.0)


def test_attention_nll_gradient_matches_finite_differences():
    ds = paper_dataset(6, 4, 6, 8, seed=0)
    w = np.random.default_rng(0).standard_normal((8, 8))
    loss, grad = attention_nll(w, ds.contexts, ds.labels, ds.embeddings)
    fd = np.zeros_like(w)
    h = 1e-6
    for i in range(8):
        for j in range(8):
            dw = np.zeros_like(w)
            dw[i, j] = h
            up = attention_nll(w + dw, ds.contexts, ds.labels, ds.embeddings)[0]
            down = attention_nll(w - dw, ds.contexts, ds.labels, ds.embeddings)[0]
            fd[i, j] = (up - down) / (2 * h)
    np.testing.assert_allclose(grad, fd, atol=1e-7)
    s = attention_weights(w, ds.contexts, ds.embeddings)
    p_y = (s * (ds.contexts == ds.labels[:, None])).sum(1)
    assert loss == pytest.approx(-np.log(p_y).mean())
    with pytest.raises(ValueError, match="sample 0"):
        attention_nll(w, np.array([[0, 1]]), np.array([2]), ds.embeddings)


def test_normalized_gd_steps_have_length_lr():
    def grad(w):
        return w - np.arange(4.0).reshape(2, 2)

    w, kept = normalized_gd(grad, np.zeros((2, 2)), 0.05, 10, record=[0, 1, 2])
    assert np.linalg.norm(kept[1] - kept[0]) == pytest.approx(0.05)
    assert np.linalg.norm(kept[2] - kept[1]) == pytest.approx(0.05)
    assert np.linalg.norm(w) == pytest.approx(0.5)  # straight towards the minimiser


def test_the_graph_svm_refuses_infeasible_constraints():
    # a TPG never gives infeasible constraints (its condensation is a DAG); SCC ids split by
    # hand turn the cycle 0 <-> 1 into "0 above 1" and "1 above 0"
    contexts = np.array([[0, 1, 2], [1, 0, 2]])
    labels = np.array([0, 1])
    tpg = EmpiricalTPG.fit(contexts, labels, 3)
    split = EmpiricalTPG(tpg.adjacency, np.arange(3)[None].repeat(3, 0), tpg.reach)
    with pytest.raises(ValueError, match="infeasible"):
        graph_svm(contexts, labels, np.eye(3), split)


def test_model_metrics_read_a_model_with_the_dataset_embeddings_only():
    import torch

    from baselines.priority_attention import make_model

    ds = paper_dataset(6, 4, 6, 8, seed=0)
    th = PaperTheory.of(ds)
    model = make_model(6, 4, d=8, embedding="random", embedding_seed=0).double()
    with torch.no_grad():
        model.W.weight.copy_(torch.from_numpy(th.w_svm))
    m = th.model_metrics(model)
    assert "norm_diff" not in m and m["corr_svm"] == pytest.approx(1.0)
    assert m["proj_corr"] == pytest.approx(1.0) and m["fin_diff"] == pytest.approx(0.0, abs=1e-9)
    assert m["nll"] == pytest.approx(th.loss(th.w_svm))
    other = make_model(6, 4, d=8, embedding="random", embedding_seed=1).double()
    with pytest.raises(ValueError, match="embedding_seed = the task's instance_seed"):
        th.model_metrics(other)  # the wrong E: refused, not silently unmeasured
    with pytest.raises(ValueError, match=r"embeddings \(6, 9\) are not"):
        th.model_metrics(make_model(6, 4, d=9, embedding="random").double())
    assert th.model_metrics(torch.nn.Linear(8, 8)) == {}


@pytest.mark.parametrize(
    ("n", "t", "k", "seed"), [(6, 4, 6, 0), (6, 4, 6, 3), (10, 6, 8, 1), (8, 9, 5, 2)]
)
def test_oracle_a_equals_oracle_b_on_the_training_contexts(n, t, k, seed):
    # on training data the W^svm-maximal positions are the label's SCC (its constraints), and
    # the softmax of W^fin over them is Oracle A's n_X(j) exp(beta) with beta from W^fin
    ds = paper_dataset(n, t, k, 9, seed=seed)
    th = PaperTheory.of(ds)
    probs_a, ambiguous = th.oracle_a(ds.contexts)
    assert not ambiguous.any()
    np.testing.assert_allclose(th.oracle_b(ds.contexts), probs_a, atol=1e-9)
    assert (probs_a[np.arange(n), ds.labels] > 0).all()


def test_local_graph_svm_selects_ignores_and_matches_the_equivalent_dataset():
    from iclgym.tasks.priority_graph_theory import local_graph_svm

    e = paper_embeddings(4, 5, "random", seed=0)
    contexts = np.array([[0, 1, 3, 2]])
    # 0 and 1 selected (> 1e-2), 3 ignored (in (0.009, 0.01]), 2 below: 0, 1 above 2 only
    att = np.array([[0.8, 0.1855, 0.005, 0.0095]])
    svm, tpg = local_graph_svm(contexts, att, e)
    assert tpg.scc[2, 0] == tpg.scc[2, 1] != tpg.scc[2, 2]
    assert not tpg.adjacency[2, :, 3].any() and not tpg.adjacency[2, 3].any()
    same = graph_svm(np.array([[0, 1, 2], [1, 0, 2]]), np.array([0, 1]), e)
    np.testing.assert_allclose(svm.w, same.w, atol=1e-10)
    with pytest.raises(ValueError, match="token_attention"):
        local_graph_svm(contexts, att[:, :3], e)
