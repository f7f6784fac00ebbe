"""The streaming decision-pretrained transformer (``baselines.dpt``; spec dpt-gym-sb3.md
sections 3 and 5): its transition embedding is the Linear map of the concatenated one-hot
codes of [s_{t-1}; x_t], it is causal, its head count is real, and the ``lee2023`` recipe
builds and trains it with soft labels through the one trainer and the command line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from baselines.dpt import StreamingDPT, TransitionEmbedding, make_model
from iclgym.cli import main
from iclgym.harness import RECIPES, build_model, check_model, check_training
from iclgym.registry import make_task


@pytest.mark.parametrize("state_len", [1, 3])
def test_transition_embedding_is_a_linear_map_of_the_one_hot_window(state_len):
    """Element t = W [onehot(x_{t-m}); ...; onehot(x_t)] + b with PAD id V before the start:
    DPT's input layer (Lee et al. 2023: [s, a, s', r] through one Linear; a and r dropped)."""
    torch.manual_seed(0)
    v, m, d = 5, state_len, 7
    emb = TransitionEmbedding(v, m, d)
    tokens = torch.randint(0, v, (3, 9))
    padded = torch.cat([torch.full((3, m), v), tokens], 1)
    onehots = torch.cat(
        [F.one_hot(padded[:, j : j + 9], v + 1).float() for j in range(m + 1)], -1
    )  # (B, T, (m + 1)(V + 1)), slot j = x_{t - m + j}
    expected = onehots @ emb.table.weight + emb.bias
    torch.testing.assert_close(emb(tokens), expected)


def test_dpt_meets_the_model_contract_with_real_heads():
    task = make_task("ICL-MarkovChain-v0", num_states=3, seq_len=40)
    model = build_model("baselines.dpt:make_model", task, seed=0, n_heads=4, state_len=2)
    assert isinstance(model, StreamingDPT) and model.state_len == 2
    assert {b.attn.n_heads for b in model.blocks} == {4}  # the original hard-codes 1
    check_model(model, task)  # shapes and causality (positions t' > t never change t)
    batch = task.sample(2, generator=task.generator(0))
    out, maps = model(batch.tokens, return_attention=True)
    assert out.shape == (2, 40, 3) and maps[0].shape == (2, 4, 40, 40)
    with pytest.raises(ValueError, match="state_len"):
        make_model(3, 40, state_len=0)


def test_lee2023_recipe_trains_soft_dpt_from_the_command_line(tmp_path, capsys):
    recipe = RECIPES["lee2023"]
    assert recipe.model == "dpt" and recipe.train.labels == "soft"
    out = tmp_path / "dpt"
    main(
        [
            "train", "--recipe", "lee2023", "--steps", "3", "--eval-every", "0",
            "--eval-sequences", "32", "--set", "seq_len=20", "--out", str(out),
        ]
    )  # fmt: skip
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["type"] == "eval"][-1]
    assert last["step"] == 3 and last["batch_loss"] > 0
    main(["eval", "ICL-MarkovChain-v0", "--set", "seq_len=20", "--predictor",
          f"checkpoint:{out}", "--num-sequences", "32"])  # fmt: skip
    assert "checkpoint" in capsys.readouterr().out


def test_dpt_agent_acts_in_the_env_loop_as_the_model_predicts():
    """Through ICLEnv's context observation: the distribution agent's log-prob rewards are the
    model's log-probabilities of the revealed next tokens (floored at 1e-6 as the env reads
    actions), the greedy agent's actions their argmax; a vector env batch acts row by row."""
    import gymnasium as gym
    import numpy as np

    from baselines.dpt import DPTAgent
    from iclgym.envs import ICLVectorEnv
    from iclgym.harness.model import ModelPredictor

    task = make_task("ICL-MarkovChain-v0", num_states=3, seq_len=12)
    model = build_model("baselines.dpt:make_model", task, seed=1)
    agents = {mode: DPTAgent(model, mode) for mode in ("distribution", "greedy")}
    env = gym.make("ICL-MarkovChain-v0", num_states=3, seq_len=12, observation="context",
                   action="distribution").unwrapped  # fmt: skip
    obs, _ = env.reset(seed=3)
    rewards, greedy = [], []
    for _ in range(12):
        greedy.append(agents["greedy"].act(obs))
        obs, reward, terminated, _, _ = env.step(agents["distribution"].act(obs))
        rewards.append(reward)
    assert terminated
    tokens = torch.as_tensor(obs[None].astype(np.int64))  # x_0 .. x_T, all revealed
    batch = task.sample(1, generator=task.generator(0))
    batch = type(batch)(**{**batch.__dict__, "tokens": tokens[:, :12], "targets": tokens[:, 1:]})
    log_q = ModelPredictor(model).predict(batch)[0]
    q = log_q.exp().clamp_min(1e-6)
    q = q / q.sum(-1, keepdim=True)
    expected = q[torch.arange(12), tokens[0, 1:]].log()
    np.testing.assert_allclose(rewards, expected.numpy(), rtol=1e-5, atol=1e-6)
    assert greedy == log_q.argmax(-1).tolist()
    vec = ICLVectorEnv(4, "ICL-MarkovChain-v0", num_states=3, seq_len=12)
    vobs, _ = vec.reset(seed=0)
    actions = agents["greedy"].act(vobs)
    assert actions.shape == (4,) and set(actions.tolist()) <= {0, 1, 2}
    a, b = DPTAgent(model, "sample", seed=7), DPTAgent(model, "sample", seed=7)
    assert (a.act(vobs) == b.act(vobs)).all()
    with pytest.raises(ValueError, match="mode="):
        DPTAgent(model, "thompson")


# ------------------------------------------------------------------------ the faithful DPT
def _faithful(task, **kwargs):
    from baselines.dpt import DPTModel

    model = build_model("baselines.dpt:make_faithful_model", task, seed=0, **kwargs)
    assert isinstance(model, DPTModel)
    return model


def _plain_pass(model, tokens, q, order=None):
    """Logits (B, q + 2, V) of [query s_q; E_0 .. E_q] written out plainly: the query as the
    state slots of the one-hot Linear (its s' slot zero), E_i the window x_{i-m} .. x_i."""
    v, m = model.config.vocab_size, model.state_len
    table, bias = model.embed.table.weight, model.embed.bias
    padded = torch.cat([torch.full((tokens.shape[0], m), v), tokens], 1)
    onehot = F.one_hot(padded, v + 1).float()  # (B, m + T, V + 1)
    slots = table.view(m + 1, v + 1, -1)
    context = [sum(onehot[:, i + j] @ slots[j] for j in range(m + 1)) + bias for i in range(q + 1)]
    query = sum(onehot[:, q + 1 + j] @ slots[j] for j in range(m)) + bias
    if order is not None:
        context = [context[i] for i in order]
    return model.decode(torch.stack([query, *context], 1))


@pytest.mark.parametrize("state_len", [1, 2])
def test_faithful_dpt_reads_each_query_after_its_whole_context(state_len):
    """forward's position q = the pass [s_q; E_0 .. E_q] read at its last element (Lee et al.
    2023: the query first, test time reads the last position), for every q; causal."""
    task = make_task("ICL-NGram-v0", seq_len=14)  # order 3: a state of 2 tokens is the chain's
    model = _faithful(task, state_len=state_len).eval()
    check_model(model, task)  # shapes and causality
    tokens = task.sample(3, generator=task.generator(1)).tokens
    with torch.no_grad():
        out = model(tokens)
        for q in range(14):
            torch.testing.assert_close(out[:, q], _plain_pass(model, tokens, q)[:, -1])


def test_faithful_dpt_trains_one_query_with_its_label_at_every_prefix():
    """training_loss with one scored position q per row (so the query is forced): the mean of
    the soft-label cross-entropies of the passes' outputs after E_0 .. E_j, j = 0 .. q, all
    against the law of x_{q+1} (the original repeats a* at every prefix)."""
    from iclgym.harness.train import Targets, training_labels

    task = make_task("ICL-MarkovChain-v0", seq_len=10)
    model = _faithful(task)
    batch = task.sample(4, generator=task.generator(2))
    targets, _, laws = training_labels(batch, "soft")
    queries = [3, 0, 9, 6]
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[torch.arange(4), torch.tensor(queries)] = True
    loss = model.training_loss((batch.tokens,), Targets.select(targets, mask, laws=laws))
    terms = []
    for b, q in enumerate(queries):
        logits = _plain_pass(model, batch.tokens[b : b + 1], q)[0, 1:]  # prefixes j = 0 .. q
        terms.append(-(laws[b, q] * logits.log_softmax(-1)).sum(-1))
    torch.testing.assert_close(loss, torch.cat(terms).mean())


def test_shuffled_contexts_are_permutations_of_the_query_s_own_past(monkeypatch):
    """shuffle=True: each prefix read for query q holds transitions from E_0 .. E_q only (a
    permutation of them, never a later one), and differs from the ordered context."""
    task = make_task("ICL-MarkovChain-v0", seq_len=12)
    model = _faithful(task, shuffle=True)
    batch = task.sample(6, generator=task.generator(3))
    seen = {}
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda x: seen.setdefault("x", x) is x and decode(x))
    from iclgym.harness.train import Targets

    queries = torch.tensor([11, 5, 8, 2, 11, 7])
    mask = torch.zeros(6, 12, dtype=torch.bool)
    mask[torch.arange(6), queries] = True
    torch.manual_seed(0)
    model.training_loss((batch.tokens,), Targets.select(batch.targets, mask))
    _, context = model.elements(batch.tokens)
    x = seen["x"]
    moved = 0
    for b, q in enumerate(queries.tolist()):
        got, own = x[b, 1 : q + 2], context[b, : q + 1]
        match = (got[:, None] - own[None]).abs().sum(-1) < 1e-6  # (q + 1, q + 1)
        assert match.any(1).all() and match.any(0).all()  # the same elements, in some order
        moved += int(not torch.equal(got, own))
    assert moved >= 4


@pytest.mark.parametrize(
    ("env_id", "kwargs", "state_len", "ok"),
    [
        ("ICL-MarkovChain-v0", {}, 1, True),  # first-order: the state is the last token
        ("ICL-NGram-v0", {}, 2, True),  # order 3: two tokens hold the chain's memory
        ("ICL-NGram-v0", {}, 1, False),  # a truncated window: ordered
        ("ICL-MarkovChain-v0", {"prior": "unigram"}, 1, True),  # counts suffice for any prior
        ("ICL-SymbolTemplate-v0", {}, 1, False),
        ("ICL-SparseContextualBigram-v0", {}, 1, False),
        ("ICL-PriorityGraph-v0", {}, 1, False),
    ],
)
def test_shuffling_is_refused_wherever_the_context_is_ordered(env_id, kwargs, state_len, ok):
    """The rule of spec section 3 (shuffle only exchangeable transitions, never ordered
    windows), checked before training by the model's check_task hook (check_training); the
    scoring check (check_model) never refuses a trained model for how it was trained."""
    from baselines.dpt import check_shuffle

    task = make_task(env_id, **kwargs)
    model = _faithful(task, shuffle=True, state_len=state_len)
    check_model(model, task)
    if ok:
        check_shuffle(task, state_len)
        check_training(model, task)
    else:
        with pytest.raises(ValueError, match="shuffle=True is invalid"):
            check_training(model, task)
    check_training(_faithful(task, state_len=state_len), task)  # unshuffled: always allowed


def test_faithful_dpt_trains_from_the_command_line_and_refuses_seeds(tmp_path, capsys):
    out = tmp_path / "faithful"
    main(["train", "ICL-MarkovChain-v0", "--model", "dpt_faithful", "--labels", "hard",
          "--set", "seq_len=16", "--steps", "3", "--eval-every", "0", "--eval-sequences",
          "16", "--out", str(out)])  # fmt: skip
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in records if r["type"] == "eval"][-1]["step"] == 3
    main(["eval", "ICL-MarkovChain-v0", "--set", "seq_len=16", "--predictor", f"dpt:{out}",
          "--num-sequences", "16"])  # fmt: skip
    assert f"dpt:{out}" in capsys.readouterr().out
    rc = main(["train", "ICL-SymbolCopy-v0", "--model", "dpt_faithful", "--model-arg",
               "shuffle=true", "--steps", "1", "--out", str(tmp_path / "bad")])  # fmt: skip
    assert rc != 0
    assert "shuffle=True is invalid" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # the shell's "false" is False (not the truthiness of a string): ordered tasks train
    main(["train", "ICL-SymbolCopy-v0", "--model", "dpt_faithful", "--model-arg",
          "shuffle=false", "--steps", "1", "--eval-every", "0", "--eval-sequences", "8",
          "--out", str(tmp_path / "copy")])  # fmt: skip
    assert (tmp_path / "copy" / "metrics.jsonl").exists()
    # a shuffle-trained first-order model is scored on an order-3 chain (where it could not
    # have trained shuffled): scoring never runs the training check
    shuffled = tmp_path / "shuffled"
    main(["train", "ICL-MarkovChain-v0", "--model", "dpt_faithful", "--model-arg",
          "shuffle=True", "--set", "seq_len=16", "--steps", "1", "--eval-every", "0",
          "--eval-sequences", "8", "--out", str(shuffled)])  # fmt: skip
    capsys.readouterr()
    rc = main(["eval", "ICL-NGram-v0", "--set", "seq_len=16",
               "--predictor", f"dpt:{shuffled}", "--num-sequences", "16"])  # fmt: skip
    assert rc in (0, None) and f"dpt:{shuffled}" in capsys.readouterr().out
    from iclgym.harness import RunOptions, TrainConfig, train

    task = make_task("ICL-MarkovChain-v0", seq_len=16)
    with pytest.raises(ValueError, match="training_loss"):
        train(_faithful(task), task, TrainConfig(steps=1), RunOptions(seeds=(0, 1)))


def test_faithful_dpt_refuses_non_bool_shuffle_and_feature_tasks():
    task = make_task("ICL-MarkovChain-v0", seq_len=16)
    for bad in ("false", 1, None):
        with pytest.raises(ValueError, match="shuffle="):
            _faithful(task, shuffle=bad)
    with pytest.raises(ValueError, match="reads tokens only"):
        build_model("baselines.dpt:make_faithful_model", make_task("ICL-MultiConcept-v0"))


def test_query_logits_and_forward_read_each_query_alike():
    """One query per row (different positions per row, as in a vector env) equals forward
    at those positions; forward's chunked passes equal one unchunked pass."""
    import baselines.dpt as dpt

    task = make_task("ICL-MarkovChain-v0", num_states=3, seq_len=12)
    model = _faithful(task).eval()
    tokens = task.sample(5, generator=task.generator(2)).tokens
    query = torch.tensor([0, 11, 4, 7, 11])
    with torch.no_grad():
        full = model(tokens)
        torch.testing.assert_close(model.query_logits(tokens, query), full[torch.arange(5), query])
        old = dpt.QUERY_CHUNK_ELEMENTS
        try:
            dpt.QUERY_CHUNK_ELEMENTS = 1  # one query per chunk
            torch.testing.assert_close(model(tokens), full)
        finally:
            dpt.QUERY_CHUNK_ELEMENTS = old


@pytest.mark.parametrize("factory", ["make_model", "make_faithful_model"])
def test_dpt_agent_steps_a_vector_env_through_its_episode_ends(factory):
    """Under next-step autoreset a vector env hands the agent each episode's final
    observation (all T + 1 tokens revealed); the agent acts on it (the env ignores that
    action) and on every other step acts as the model predicts at the last revealed token."""
    import numpy as np

    from baselines.dpt import DPTAgent
    from iclgym.envs import ICLVectorEnv

    task = make_task("ICL-MarkovChain-v0", num_states=3, seq_len=6)
    model = build_model(f"baselines.dpt:{factory}", task, seed=1).eval()
    agent = DPTAgent(model, "greedy")
    env = ICLVectorEnv(3, "ICL-MarkovChain-v0", num_states=3, seq_len=6, observation="context")
    obs, _ = env.reset(seed=0)
    ends = 0
    for _ in range(15):  # two whole episodes and more
        actions = agent.act(obs)
        assert actions.shape == (3,)
        for r in range(3):
            t = int((obs[r] != 3).sum()) - 1
            if t < 6:
                x = torch.as_tensor(obs[r : r + 1, : t + 1].astype(np.int64))
                with torch.no_grad():
                    assert actions[r] == int(model(x)[0, t].argmax())
        ends += int((obs != 3).all(1).sum())
        obs, _, _, _, _ = env.step(actions)
    assert ends >= 3
