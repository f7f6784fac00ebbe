"""SB3 agents scored by the harness (``baselines.sb3_agents``; ``docs/envs/clients.md``):
trained through ``make_vec_env`` and saved with their record, read back as predictors whose
next-token law is the policy's action distribution on the observation the env would show,
through ``iclgym eval --predictor sb3:RUN`` and ``dpt:RUN``."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from baselines.sb3_agents import (
    AgentConfig,
    SB3BanditAgent,
    SB3Predictor,
    main,
    train_agent,
)
from iclgym.cli import main as iclgym_main
from iclgym.harness import evaluate
from iclgym.harness.evaluate import HeldOut
from iclgym.registry import make_task

MARKOV = {"seq_len": 12}


@pytest.fixture(scope="module")
def ppo_token(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    config = AgentConfig(
        "ICL-MarkovChain-v0", steps=512, env_kwargs={**MARKOV, "observation": "token"}
    )
    return out, train_agent(config, out)


def test_training_records_the_config_and_env_steps(ppo_token):
    out, record = ppo_token
    on_disk = json.loads((out / "agent.json").read_text())
    assert on_disk["num_timesteps"] == record["num_timesteps"] >= 512
    assert on_disk["config"]["env_kwargs"] == {"observation": "token", **MARKOV}
    assert on_disk["policy"] == "MlpPolicy" and on_disk["config"]["gamma"] == 0.0
    with pytest.raises(ValueError, match="algo='dqn' is invalid"):
        AgentConfig("ICL-MarkovChain-v0", algo="dqn")


def test_ppo_predictor_is_the_policy_law_of_the_current_token(ppo_token):
    """Token observation and token action: position t's law is the policy's categorical
    distribution given x_t, computed here straight from the policy."""
    out, _ = ppo_token
    task = make_task("ICL-MarkovChain-v0", **MARKOV)
    predictor = SB3Predictor(out, task)
    batch = task.sample(16, generator=task.generator(0, "test"))
    got = predictor.predict(batch)
    policy = predictor.agent.policy
    for t in range(task.seq_len):
        obs, _ = policy.obs_to_tensor(batch.tokens[:, t].numpy())
        with torch.no_grad():
            probs = policy.get_distribution(obs).distribution.probs
        torch.testing.assert_close(got[:, t].exp(), probs.float(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="seq_len"):
        SB3Predictor(out, make_task("ICL-MarkovChain-v0", seq_len=20))


@pytest.mark.parametrize(
    ("env_id", "algo", "env_kwargs"),
    [
        ("ICL-MarkovChain-v0", "ppo", {**MARKOV, "observation": "window", "window": 3,
                                       "action": "logits"}),
        ("ICL-MarkovChain-v0", "recurrent_ppo", {**MARKOV, "action": "distribution"}),
        ("ICL-MultiConcept-v0", "ppo", {"observation": "context", "num_demos": 4}),
    ],
)  # fmt: skip
def test_agents_score_as_causal_predictors(tmp_path, env_id, algo, env_kwargs):
    """Every mode gives normalised laws at every position; position t reads only the sequence
    up to t (the env reveals nothing later), also through RecurrentPPO's LSTM state."""
    train_agent(
        AgentConfig(env_id, algo=algo, steps=256, n_steps=32, env_kwargs=env_kwargs), tmp_path
    )
    spec = {k: v for k, v in env_kwargs.items() if k not in ("observation", "window", "action")}
    task = make_task(env_id, **spec)
    predictor = SB3Predictor(tmp_path, task)
    batch = task.sample(8, generator=task.generator(0, "test"))
    out = predictor.predict(batch)
    assert out.shape == (8, task.seq_len, task.vocab_size)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(8, task.seq_len))
    if task.feature_dim == 0:
        t = task.seq_len // 2
        edited = batch.tokens.clone()
        edited[:, t + 1 :] = (edited[:, t + 1 :] + 1) % task.vocab_size
        later = predictor.predict(type(batch)(**{**batch.__dict__, "tokens": edited}))
        torch.testing.assert_close(later[:, : t + 1], out[:, : t + 1])
    held = HeldOut(task, split="test", seed=0, num_sequences=64, batch_size=64)
    assert np.isfinite(evaluate(predictor, held).excess_loss)


def test_command_lines_train_and_score_sb3_and_dpt(tmp_path, capsys):
    agent = tmp_path / "agent"
    main(["ICL-MarkovChain-v0", "--steps", "256", "--set", "seq_len=12", "observation=token",
          "--out", str(agent)])  # fmt: skip
    assert "sb3:" in capsys.readouterr().out
    run = tmp_path / "dpt"
    iclgym_main(["train", "--recipe", "lee2023", "--steps", "2", "--eval-every", "0",
                 "--eval-sequences", "16", "--set", "seq_len=12", "--out", str(run)])  # fmt: skip
    capsys.readouterr()
    iclgym_main(["eval", "ICL-MarkovChain-v0", "--set", "seq_len=12", "--num-sequences", "32",
                 "--predictor", f"sb3:{agent}", "--predictor", f"dpt:{run}"])  # fmt: skip
    text = capsys.readouterr().out
    assert f"sb3:{agent}" in text and f"dpt:{run}" in text
    other = tmp_path / "transformer"
    iclgym_main(["train", "ICL-MarkovChain-v0", "--set", "seq_len=12", "--steps", "1",
                 "--eval-every", "0", "--eval-sequences", "16", "--out", str(other)])  # fmt: skip
    capsys.readouterr()
    for bad, message in ((other, "not a DPT"), (agent, "does not exist")):
        status = iclgym_main(["eval", "ICL-MarkovChain-v0", "--set", "seq_len=12",
                              "--predictor", f"dpt:{bad}"])  # fmt: skip
        assert status == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("algo", ["ppo", "recurrent_ppo"])
def test_bandit_trained_agents_act_under_bandit_feedback(tmp_path, capsys, algo):
    """``--feedback bandit`` trains through BanditFeedback (its observation space has the
    HIDDEN id); the agent acts in ``iclgym regret`` on the observations it was trained on,
    greedy and sampled, over groups of unequal size (5 episodes, 3 at a time: RecurrentPPO's
    per-row states restart with each group); a full-information agent is refused when
    loaded."""
    spec = {"seq_len": 12}
    config = AgentConfig(
        "ICL-MarkovChain-v0",
        algo=algo,
        steps=256,
        n_envs=2,
        n_steps=64,
        batch_size=64,
        env_kwargs=spec,
        feedback="bandit",
    )
    record = train_agent(config, tmp_path / "bandit")
    assert record["config"]["feedback"] == "bandit"
    agent = SB3BanditAgent(tmp_path / "bandit", make_task("ICL-MarkovChain-v0", **spec))
    space = agent.agent.observation_space  # window (PPO) or token (RecurrentPPO) ids
    assert np.max(getattr(space, "nvec", getattr(space, "n", None))) == 3 + 2  # + PAD, HIDDEN
    argv = ["regret", "ICL-MarkovChain-v0", "--set", "seq_len=12", "--episodes", "5"]
    run = tmp_path / "bandit"
    agents = ["--agent", f"sb3:{run}", "--agent", f"sb3:{run}:sample", "--num-envs", "3"]
    assert iclgym_main([*argv, *agents, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = ["oracle (full information)", f"sb3:{run}", f"sb3:{run}:sample"]
    assert [r["agent"] for r in rows] == names
    assert all(len(r["episode_regrets"]) == 5 for r in rows)
    full = replace(config, feedback="full")
    train_agent(full, tmp_path / "full")
    assert iclgym_main([*argv, "--agent", f"sb3:{tmp_path / 'full'}"]) == 2
    assert "trained with full information" in capsys.readouterr().err
    with pytest.raises(ValueError, match="feedback='partial'"):
        replace(config, feedback="partial")
