"""The CUDA path (``device="cuda"``): samplers, oracles, evaluation, training and resume give
what the CPU gives. Skipped where torch sees no GPU (CI runs on CPU); the template trainer's
CUDA test is in ``tests/harness/test_template_train.py``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from iclgym.harness import OraclePredictor, evaluate
from iclgym.harness.train import TrainConfig, build_model, train
from iclgym.registry import make_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TASKS = [
    ("ICL-MarkovChain-v0", {}),
    ("ICL-NGram-v0", {"num_states": 2}),
    ("ICL-SymbolTemplate-v0", {"preset": "majority4"}),
    ("ICL-SymbolCopy-v0", {}),
]


@pytest.mark.parametrize(("env_id", "kwargs"), TASKS)
def test_sampler_and_oracle_on_cuda_match_the_law_and_the_cpu_oracle(env_id, kwargs):
    task = make_task(env_id, **kwargs)
    gen = task.generator(0, "test", "cuda")
    batch = task.sample(512, generator=gen)
    again = task.sample(512, generator=task.generator(0, "test", "cuda"))
    assert batch.tokens.is_cuda and torch.equal(batch.tokens, again.tokens)  # seeded on CUDA
    assert int(batch.tokens.max()) < task.vocab_size and int(batch.tokens.min()) >= 0
    oracle = task.oracle(batch)
    assert oracle.is_cuda
    cpu = task.oracle(batch.to("cpu"))
    torch.testing.assert_close(oracle.cpu().exp(), cpu.exp(), atol=1e-5, rtol=1e-4)
    true = batch.true_probs
    assert true.is_cuda
    torch.testing.assert_close(true.sum(-1), torch.ones_like(true[..., 0]))
    torch.testing.assert_close(true.cpu(), batch.to("cpu").true_probs, atol=1e-6, rtol=1e-5)


def test_evaluate_on_cuda_equals_cpu_on_the_same_data():
    task = make_task("ICL-MarkovChain-v0")
    kwargs = {"num_sequences": 256, "batch_size": 128}
    cpu = evaluate(OraclePredictor(task), task, **kwargs)
    gpu = evaluate(OraclePredictor(task), task, device="cuda", **kwargs)
    # the data come from a CUDA generator on CUDA: same law, other draws; excess loss is 0
    assert gpu.excess_loss == pytest.approx(0.0, abs=1e-5)
    assert cpu.excess_loss == pytest.approx(0.0, abs=1e-5)
    assert gpu.cross_entropy == pytest.approx(cpu.cross_entropy, abs=0.05)


def test_training_on_cuda_runs_and_resumes(tmp_path):
    task = make_task("ICL-MarkovChain-v0", seq_len=32)
    tiny = TrainConfig(
        steps=40,
        batch_size=16,
        eval_every=10,
        eval_sequences=64,
        eval_batch_size=64,
        checkpoint_every=10,
        progress=False,
        plot=False,
        device="cuda",
    )
    straight = train(build_model(task, 0), task, replace(tiny, run_dir=str(tmp_path / "a")))
    half = replace(tiny, steps=20, run_dir=str(tmp_path / "b"))
    train(build_model(task, 0), task, half)
    resumed = train(build_model(task, 0), task, replace(half, steps=40, resume=True))
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 40 and a["cuda_rng"] is not None
    # CUDA's embedding backward sums with atomics, so runs agree to rounding, not bit for bit
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], atol=1e-5, rtol=1e-4)
    assert straight["final"]["kl_last"] == pytest.approx(resumed["final"]["kl_last"], abs=1e-4)
