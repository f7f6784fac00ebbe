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
from iclgym.harness import RECIPES, build_model, check_model
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
