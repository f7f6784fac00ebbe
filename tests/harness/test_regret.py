"""Online scoring under bandit feedback (``iclgym.harness.regret``, ``iclgym regret``): the
uniform agent's regret against its closed form on the same episodes, the full-information
oracle as the lower reference, the revealed-bigram reference on hand-built observations, the
bandit DPT's feedback draw and its agent, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from baselines.dpt import BanditDPT, DPTAgent, make_bandit_model, make_model
from iclgym.cli import main
from iclgym.harness import RunOptions, TrainConfig, build_model, check_model, train
from iclgym.harness.regret import (
    bandit_regret,
    episode_seeds,
    full_information_regret,
    revealed_bigram_policy,
    uniform_policy,
)
from iclgym.harness.train import Targets, training_labels
from iclgym.registry import make_task

SPEC = {"num_states": 3, "seq_len": 30}


def test_uniform_regret_matches_its_closed_form_on_the_same_episodes():
    """On every step, the full-information oracle's regret plus its expected reward is
    max_v p(v); a uniform action's expected regret is max_v p(v) - 1/V. Paired per episode
    (the same seeds give the same episodes to every agent and under every observation mode),
    the uniform agent's regret minus sum_t max p - T/V is noise of its actions only: its mean
    is within 3 SE of 0, and that SE is far below the spread between episodes."""
    n, t, v = 512, SPEC["seq_len"], SPEC["num_states"]
    oracle = full_information_regret("ICL-MarkovChain-v0", spec=SPEC, num_episodes=n)
    uniform = bandit_regret(
        "ICL-MarkovChain-v0", uniform_policy(v, seed=1), spec=SPEC, num_episodes=n
    )
    # per episode: sum_t max p = oracle regret + T x its mean expected reward
    expected = np.add(oracle.episode_regrets, t * np.asarray(oracle.episode_accuracies)) - t / v
    diff = np.subtract(uniform.episode_regrets, expected)
    se = diff.std(ddof=1) / np.sqrt(n)
    assert abs(diff.mean()) < 3 * se and se < 0.5 * uniform.regret_se
    assert abs(uniform.accuracy - 1 / v) < 3 * uniform.accuracy_se
    # the oracle learns the table: its regret per step falls along the episode
    steps = np.diff([0.0, *oracle.curve])
    assert steps[-10:].mean() < 0.5 * steps[:5].mean()
    assert oracle.regret < 0.5 * uniform.regret
    # the episodes depend on the seeds only, not on the observation mode or the batching
    window = {**SPEC, "observation": "window", "window": 4}
    again = full_information_regret("ICL-MarkovChain-v0", spec=window, num_episodes=n, num_envs=7)
    assert again.episode_regrets == oracle.episode_regrets


def test_episode_seeds_are_a_function_of_seed_and_index():
    """A longer run extends a shorter one; two seeds share no episode; the split is passed
    through (validation episodes differ from test ones); bad seeds and counts refuse."""
    assert episode_seeds(3, 5) == episode_seeds(3, 8)[:5]
    assert not set(episode_seeds(0, 256)) & set(episode_seeds(1, 256))
    kwargs = {"spec": SPEC, "num_episodes": 4}
    test = full_information_regret("ICL-MarkovChain-v0", **kwargs)
    validation = full_information_regret("ICL-MarkovChain-v0", split="validation", **kwargs)
    assert test.episode_regrets != validation.episode_regrets
    for bad in ({"seed": -1}, {"num_episodes": 0}, {"num_envs": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            full_information_regret("ICL-MarkovChain-v0", **{**kwargs, **bad})


def test_revealed_bigram_reads_only_what_was_shown():
    """V = 3, PAD = 3, HIDDEN = 4: the most frequent revealed successor of a shown x_t, else
    the most frequent revealed token (first on ties)."""
    act = revealed_bigram_policy(3)
    obs = np.array(
        [
            [0, 1, 0, 2, 0, 3, 3],  # x_4 = 0 shown; successors of 0: 1 and 2 once each -> 1
            [0, 1, 0, 1, 4, 3, 3],  # x_4 hidden -> unigram {0: 2, 1: 2} -> 0
            [2, 4, 1, 3, 3, 3, 3],  # x_2 = 1, no revealed pair after a 1 -> unigram -> 1
            [2, 2, 1, 2, 4, 2, 3],  # x_5 = 2: pairs 2->2, 2->1 (2->4, 4->2 hidden) -> 1
        ]
    )
    assert act(obs).tolist() == [1, 0, 1, 1]
    assert act({"tokens": obs, "features": np.zeros((4, 7, 2))}).tolist() == [1, 0, 1, 1]


def test_revealed_bigram_beats_uniform_and_stays_above_the_oracle():
    kwargs = {"spec": {"num_states": 3, "seq_len": 60}, "num_episodes": 256}
    oracle = full_information_regret("ICL-MarkovChain-v0", **kwargs)
    uniform = bandit_regret("ICL-MarkovChain-v0", uniform_policy(3), **kwargs)
    bigram = bandit_regret("ICL-MarkovChain-v0", revealed_bigram_policy(3), **kwargs)
    paired = np.subtract(uniform.episode_regrets, bigram.episode_regrets)
    assert paired.mean() > 4 * paired.std(ddof=1) / np.sqrt(len(paired))
    below = np.subtract(bigram.episode_regrets, oracle.episode_regrets)
    assert below.mean() > 4 * below.std(ddof=1) / np.sqrt(len(below))


def test_bandit_dpt_feedback_keeps_the_missed_action_and_follows_the_behaviour_law():
    """On a constant stream x = 0 a row's reveal rate is its behaviour law's mass on 0:
    Dirichlet(1) mixed with a point mass at a uniform weight, so across rows it spans (0, 1)
    with mean 1/V. A hidden x_j shows as V + 1 + a_{j-1} (a_{j-1} != x_j); x_0 .. x_first are
    always shown."""
    torch.manual_seed(0)
    v, t = 3, 41
    model = make_bandit_model(vocab_size=v, seq_len=t)
    tokens = torch.zeros(2048, t, dtype=torch.long)
    shown = model.feedback(tokens)
    hidden = shown != 0
    assert not hidden[:, 0].any()
    assert set(shown[hidden].unique().tolist()) == {v + 2, v + 3}  # misses of actions 1 and 2
    rate = 1 - hidden[:, 1:].float().mean(1)
    assert rate.min() < 0.05 and rate.max() > 0.95  # point mass near 0 and near 1 both occur
    assert abs(rate.mean().item() - 1 / v) < 0.03
    mixed = torch.randint(v, (256, t))
    later = model.feedback(mixed, first=10)
    assert torch.equal(later[:, :11], mixed[:, :11])
    missed = later[:, 11:] != mixed[:, 11:]
    assert missed.any() and (later[:, 11:][missed] > v).all()
    assert (later[:, 11:][missed] - v - 1 != mixed[:, 11:][missed]).all()


def test_bandit_dpt_is_a_causal_model_and_an_agent_under_bandit_feedback():
    task = make_task("ICL-MarkovChain-v0", **SPEC)
    model = build_model("baselines.dpt:make_bandit_model", task, seed=0)
    assert isinstance(model, BanditDPT)
    check_model(model, task)
    batch = task.sample(8, generator=torch.Generator().manual_seed(0))
    targets, mask, laws = training_labels(batch, "soft")
    selected = Targets.select(targets, mask, laws=laws)
    loss = model.training_loss((batch.tokens,), selected)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    # the agent gives the model each miss with the action that missed: V + 1 + a
    agent = DPTAgent(model)
    first = agent.act(np.array([[2, 3, 3, 3]]))  # x_0 = 2 shown, PAD = 3 after it
    agent.act(np.array([[2, 4, 3, 3]]))  # x_1 hidden: the first action missed it
    assert agent._with_misses(torch.tensor([[2, 4]]), torch.tensor([1]))[0, 1] == 4 + first[0]
    with torch.no_grad():  # what the model read for that act
        expected = model(torch.tensor([[2, 4 + int(first[0])]]))[0, 1].argmax()
    assert agent.act(np.array([[2, 4, 3, 3]]))[0] == expected
    # a hidden token after a step the agent never acted on cannot be read
    with pytest.raises(ValueError, match="did not act on"):
        DPTAgent(model).act(np.array([[0, 4, 1, 2, 3, 3]]))
    # a DPT trained with full information refuses hidden tokens
    full = make_model(vocab_size=3, seq_len=SPEC["seq_len"])
    with pytest.raises(ValueError, match=r"cannot read hidden tokens.*dpt_bandit"):
        DPTAgent(full).act(np.array([[0, 4, 1, 2, 3, 3]]))
    report = bandit_regret(
        "ICL-MarkovChain-v0",
        DPTAgent(model, mode="sample").act,
        spec=SPEC,
        num_episodes=8,
        num_envs=3,
    )
    assert report.episodes == 8 and len(report.curve) == SPEC["seq_len"]


def test_regret_command_prints_every_agent_and_refuses_bad_names(capsys, tmp_path):
    argv = ["regret", "ICL-MarkovChain-v0", "--set", "seq_len=20", "--episodes", "16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("oracle (full information)", "uniform", "revealed_bigram"):
        assert name in out
    # one episode: standard errors are undefined, and the JSON stays strict (null, not NaN)
    assert main([*argv[:-1], "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out, parse_constant=_refuse)
    assert rows[0]["regret_se"] is None and rows[0]["env_id"] == "ICL-MarkovChain-v0"
    assert [len(r["episode_regrets"]) for r in rows] == [1, 1, 1]
    # a checkpoint that is not a bandit DPT is refused when it is loaded, whatever the luck
    task = make_task("ICL-MarkovChain-v0", seq_len=20)
    full = build_model("baselines.dpt:make_model", task, seed=0)
    config = TrainConfig(steps=1, batch_size=2, eval_every=0, eval_sequences=8)
    train(full, task, config, RunOptions(out=str(tmp_path / "full"), progress=False, plot=False))
    bad = {
        "nope": "agent='nope' is invalid",
        f"dpt:{tmp_path / 'full'}": "holds a StreamingDPT, not a bandit DPT",
        f"dpt:{tmp_path / 'full'}:bogus": "mode='bogus'",
        f"dpt:{tmp_path / 'absent'}": "does not exist",
    }
    for agent, message in bad.items():
        assert main([*argv, "--agent", agent]) == 2
        assert message in capsys.readouterr().err
    for flag, message in (("--episodes", "num_episodes=0"), ("--seed", "seed=-1")):
        assert main([*argv, flag, "0" if flag == "--episodes" else "-1"]) == 2
        assert message in capsys.readouterr().err


def _refuse(constant):
    raise ValueError(f"non-strict JSON constant {constant}")
