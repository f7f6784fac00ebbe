"""The contract grows once for continuous inputs (issue 12 item 1): a batch may carry features
(B, T, F) beside its tokens, and the trainer (one seed and many), ``evaluate``, ``check_model``,
named splits and both envs take them with no family-specific code. Checked here on a toy task
defined in this file (not a registered family), so nothing below can lean on a special case.

The toy task: T positions, one standard-normal feature per position (F = 1), and the label at
position t is the sign of the running sum of the features up to t (token 1 for > 0). The
label is a function of the features seen so far, so the Bayes predictor is a point mass and a
causal model w * cumsum(features) can reach it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torch import Tensor, nn

from iclgym.envs import ICLEnv, ICLVectorEnv
from iclgym.harness import build_model, evaluate
from iclgym.harness.model import ModelPredictor, check_model
from iclgym.harness.predictors import OraclePredictor
from iclgym.harness.train import RunOptions, TrainConfig, train
from iclgym.tasks.base import Batch, Task, TaskSpec, check_batch_size

LOG_FLOOR = 1e-6


@dataclass(frozen=True)
class RunningSignSpec(TaskSpec):
    seq_len: int = 6
    shift: float = 0.0
    """Mean of the features (a named split shifts it)."""


class RunningSignTask(Task):
    """A two-token task whose inputs are continuous: see the module docstring."""

    name = "running_sign"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(RunningSignSpec(**kwargs))

    @property
    def vocab_size(self) -> int:
        return 2

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    @property
    def feature_dim(self) -> int:
        return 1

    @property
    def named_splits(self) -> Mapping[str, str]:
        return {"shifted": "features with mean 0.5", "longer": "twice the positions"}

    def split_task(self, name: str) -> Task:
        if name == "shifted":
            return RunningSignTask(seq_len=self.seq_len, shift=0.5)
        if name == "longer":
            return RunningSignTask(seq_len=2 * self.seq_len, shift=self.spec.shift)
        return super().split_task(name)

    def sample(self, batch_size, *, generator, device=None) -> Batch:
        check_batch_size(batch_size)
        device = device or generator.device
        x = torch.randn(batch_size, self.seq_len, 1, generator=generator, device=device)
        x = x + self.spec.shift
        targets = (x[..., 0].cumsum(1) > 0).long()
        tokens = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], 1)
        return Batch(
            tokens=tokens,
            targets=targets,
            loss_mask=torch.ones_like(targets, dtype=torch.bool),
            params={},
            vocab_size=2,
            true_probs_fn=lambda b: nn.functional.one_hot(b.targets, 2).float(),
            features=x,
        )

    def oracle(self, batch: Batch) -> Tensor:
        return batch.true_probs.clamp_min(LOG_FLOOR).log()

    @property
    def strategies(self):
        def uniform(batch: Batch) -> Tensor:
            return torch.full((*batch.tokens.shape, 2), -math.log(2))

        return {"uniform": uniform}


class CumulativeSign(nn.Module):
    """logits (B, T, 2) = [0, w * cumsum(features)]: causal, reads the features."""

    def __init__(self, vocab_size: int, seq_len: int, feature_dim: int, future: bool = False):
        super().__init__()
        assert vocab_size == 2 and feature_dim == 1
        self.w = nn.Parameter(torch.tensor(0.1))
        self.future = future

    def forward(self, tokens: Tensor, features: Tensor) -> Tensor:
        x = features[..., 0]
        s = x.sum(1, keepdim=True).expand_as(x) if self.future else x.cumsum(1)
        return torch.stack([torch.zeros_like(s), self.w * s], -1)


FACTORY = f"{__name__}:CumulativeSign"
CONFIG = TrainConfig(
    steps=60, batch_size=32, lr=0.5, optimizer="sgd", weight_decay=0.0, momentum=0.0,
    eval_every=0, eval_sequences=256, eval_batch_size=256, schedule="constant", warmup_steps=0,
)  # fmt: skip
QUIET = RunOptions(checkpoint_every=1000, progress=False, plot=False)


@pytest.fixture
def task() -> RunningSignTask:
    return RunningSignTask()


def test_build_model_passes_feature_dim_and_check_model_probes_features(task):
    model = build_model(FACTORY, task)
    assert model.iclgym_factory["feature_dim"] == 1
    assert check_model(model, task).output == "logits"
    with pytest.raises(ValueError, match="reads future tokens"):
        check_model(CumulativeSign(2, task.seq_len, 1, future=True), task)


def test_the_trainer_fits_a_feature_model_and_evaluate_scores_it(tmp_path, task):
    model = build_model(FACTORY, task)
    before = evaluate(ModelPredictor(model), task, num_sequences=512).excess_loss
    summary = train(model, task, CONFIG, replace(QUIET, out=str(tmp_path / "run")))
    after = evaluate(ModelPredictor(model), task, num_sequences=512)
    assert summary["step"] == CONFIG.steps and summary["sequences"] == CONFIG.steps * 32
    # w grows from 0.1: a sharper sigmoid of the running sum, closer to the point-mass oracle
    assert model.w.item() > 1.0 and after.excess_loss < 0.5 * before
    assert after.accuracy > 0.97


def test_many_seeds_in_one_process_take_features(tmp_path, task):
    model = build_model(FACTORY, task)
    run = replace(QUIET, out=str(tmp_path / "seeds"), seeds=(0, 1))
    summary = train(model, task, replace(CONFIG, steps=10), run)
    assert len(summary["runs"]) == 2
    single = build_model(FACTORY, task, seed=1)
    train(
        single, task, replace(CONFIG, steps=10, seed=1), replace(QUIET, out=str(tmp_path / "one"))
    )
    from iclgym.harness import load_model

    copy = load_model(tmp_path / "seeds" / "seed1", task)
    assert copy.w.item() == pytest.approx(single.w.item(), abs=1e-5)


def test_named_splits_in_evaluate(task):
    model = build_model(FACTORY, task)
    base = evaluate(ModelPredictor(model), task, num_sequences=512)
    shifted = evaluate(ModelPredictor(model), task, split="shifted", num_sequences=512)
    assert shifted.split == "shifted" and shifted.task["shift"] == 0.5
    # shifted features move the running sums away from 0: the logistic w * s is surer
    assert shifted.cross_entropy < base.cross_entropy - 0.01
    longer = evaluate(OraclePredictor(task), task, split="longer", num_sequences=8)
    assert longer.task["seq_len"] == 2 * task.seq_len and longer.excess_loss == 0.0
    with pytest.raises(ValueError, match="split='nope' is invalid"):
        evaluate(OraclePredictor(task), task, split="nope")


def test_envs_observe_features_as_dict_or_box_and_pass_both_checkers(task):
    for observation in ("context", "window", "token", "features"):
        env = ICLEnv(task=task, observation=observation, window=3)
        check_env(env, skip_render_check=True)
        sb3_check_env(ICLEnv(task=task, observation=observation, window=3), warn=False)
        obs, _ = env.reset(seed=0)
        assert obs in env.observation_space
        vec = ICLVectorEnv(2, task=task, observation=observation, window=3)
        vobs, _ = vec.reset(seed=0)
        terminated = False
        while not terminated:  # every observation, the terminal one included, in the space
            obs, _, terminated, *_ = env.step(0)
            vobs, _, vterm, *_ = vec.step(np.zeros(2, dtype=np.int64))
            assert obs in env.observation_space and vobs in vec.observation_space
            assert vterm.all() == terminated
    env = ICLEnv(task=task)
    assert isinstance(env.observation_space, gym.spaces.Dict)
    obs, _ = env.reset(seed=3)
    feats = [obs["features"].copy()]
    for _ in range(task.seq_len):
        obs, *_ = env.step(0)
        feats.append(obs["features"].copy())
    full = feats[-1][:, 0]
    for t, f in enumerate(feats[:-1]):  # position t's features revealed at step t, not before
        assert np.array_equal(f[: t + 1, 0], full[: t + 1]) and not f[t + 1 :].any()
    # the label at every position is the running sign of the revealed features
    box = ICLEnv(task=task, observation="features")
    assert isinstance(box.observation_space, gym.spaces.Box)
    assert box.observation_space.shape == (task.seq_len, 1)


def test_vector_env_features_match_the_single_env_and_named_splits(task):
    single = ICLEnv(task=task, observation="context")
    vec = ICLVectorEnv(1, task=task, observation="context")
    a, _ = single.reset(seed=5)
    b, _ = vec.reset(seed=5)
    assert np.array_equal(a["features"], b["features"][0])
    for _ in range(task.seq_len):
        a, *_ = single.step(1)
        b, *_ = vec.step(np.array([1]))
        assert np.array_equal(a["features"], b["features"][0])
    vec4 = ICLVectorEnv(4, task=task, observation="window", window=2)
    obs, _ = vec4.reset(seed=0)
    assert obs in vec4.observation_space and obs["features"].shape == (4, 2, 1)
    # a same-shape named split by reset option; another length only at construction
    _shifted, info = vec4.reset(options={"split": "shifted"})
    assert (info["split"] == "shifted").all()
    env = ICLEnv(task=task)
    env.reset(seed=0, options={"split": "shifted"})
    means = [env.reset()[0]["features"][0, 0] for _ in range(400)]
    assert abs(np.mean(means) - 0.5) < 0.2  # 3.9 SE of 400 unit normals
    with pytest.raises(ValueError, match="changes the spaces"):
        env.reset(options={"split": "longer"})
    longer = ICLEnv(task=task, split="longer")
    assert longer.observation_space["features"].shape == (2 * task.seq_len, 1)
    check_env(longer, skip_render_check=True)


def test_the_trainer_scores_named_splits_during_training(tmp_path, task):
    model = build_model(FACTORY, task)
    config = replace(CONFIG, steps=5, eval_splits=("validation", "shifted", "longer"))
    summary = train(model, task, config, replace(QUIET, out=str(tmp_path / "run")))
    final = summary["final"]
    assert {"shifted_accuracy", "longer_excess_loss"} <= set(final)
    assert final["shifted_accuracy"] > 0.9  # a sign rule that started right (w > 0)
    bad = replace(CONFIG, steps=1, eval_splits=("validation", "nope"))
    with pytest.raises(ValueError, match="split='nope' is invalid"):
        train(build_model(FACTORY, task), task, bad, replace(QUIET, out=str(tmp_path / "x")))
