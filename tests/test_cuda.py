"""The CUDA path (``device="cuda"``): samplers, oracles and evaluation give what the CPU gives.
Skipped where torch sees no GPU (CI runs on CPU); the trainer's CUDA tests are in
``tests/harness/test_train.py``."""

from __future__ import annotations

import pytest
import torch

from iclgym.harness import OraclePredictor, evaluate
from iclgym.registry import make_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TASKS = [
    ("ICL-MarkovChain-v0", {}),
    ("ICL-NGram-v0", {"num_states": 2}),
    ("ICL-SymbolTemplate-v0", {"preset": "majority4"}),
    ("ICL-SymbolCopy-v0", {}),
    ("ICL-SparseContextualBigram-v0", {}),  # the torch sampler (CPU: a compiled pass)
    ("ICL-PriorityGraph-v0", {}),
    ("ICL-MultiConcept-v0", {}),
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
