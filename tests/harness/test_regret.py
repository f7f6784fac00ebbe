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
    max_v p(v); a uniform action's expected regret is max_v p(v) - 1/V. Same episodes (seeds),
    so the uniform agent's mean regret must equal sum_t max p - T/V within its sampling error
    given the episodes (3 SE of its actions' noise, bounded by the episodes' SE)."""
    n, t, v = 512, SPEC["seq_len"], SPEC["num_states"]
    oracle = full_information_regret("ICL-MarkovChain-v0", spec=SPEC, num_episodes=n)
    uniform = bandit_regret(
        "ICL-MarkovChain-v0", uniform_policy(v, seed=1), spec=SPEC, num_episodes=n
    )
    expected = oracle.regret + t * oracle.accuracy - t / v
    assert oracle.episodes == uniform.episodes == n
    assert len(oracle.curve) == len(uniform.curve) == t
    assert abs(uniform.regret - expected) < 3 * uniform.regret_se
    assert abs(uniform.accuracy - 1 / v) < 3 * uniform.accuracy_se
    # the oracle is the lower reference: every step's regret is >= 0 and well below uniform
    assert min(np.diff([0.0, *oracle.curve])) >= 0.0
    assert oracle.regret < 0.5 * uniform.regret
    # every agent sees the same episodes: the seeds decide them, the agent does not
    again = full_information_regret("ICL-MarkovChain-v0", spec=SPEC, num_episodes=n)
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


def test_bandit_dpt_feedback_hides_exactly_the_missed_tokens():
    torch.manual_seed(0)
    model = make_bandit_model(vocab_size=3, seq_len=40)
    tokens = torch.randint(3, (512, 40))
    shown = model.feedback(tokens)
    hidden = shown == 4  # HIDDEN = V + 1
    assert torch.equal(shown[~hidden], tokens[~hidden])
    assert not hidden[:, 0].any()  # x_0 is always shown
    # a mixture of Dirichlet and point-mass laws: reveal rates range from rare to frequent
    rate = 1 - hidden[:, 1:].float().mean(1)
    assert rate.min() < 0.2 and rate.max() > 0.6
    assert abs(rate.mean().item() - 1 / 3) < 0.03  # uniform iid tokens: E[p(a)] = 1/3


def test_bandit_dpt_is_a_causal_model_and_an_agent_under_bandit_feedback(tmp_path):
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
    # the bandit DPT acts on observations with hidden tokens; a full-information DPT refuses
    obs = np.array([[0, 4, 1, 2, 3, 3], [1, 1, 4, 4, 0, 3]])
    action = DPTAgent(model).act(obs)
    assert action.shape == (2,) and set(action.tolist()) <= {0, 1, 2}
    full = make_model(vocab_size=3, seq_len=SPEC["seq_len"])
    with pytest.raises(ValueError, match=r"cannot read hidden tokens.*dpt_bandit"):
        DPTAgent(full).act(obs)
    report = bandit_regret(
        "ICL-MarkovChain-v0", DPTAgent(model, mode="sample").act, spec=SPEC, num_episodes=8
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
