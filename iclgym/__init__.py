"""iclgym: a Gymnasium registry of synthetic in-context-learning tasks with Bayes oracles.

``import iclgym`` registers every env id (idempotently) without importing torch.
"""

import os
import sys

from iclgym.registry import describe, list_envs, make_task, register_iclgym_envs

register_iclgym_envs()


def _one_torch_thread_after_fork() -> None:
    """A forked child inherits torch's OpenMP pool without its threads: its first parallel op
    would wait for them forever (``gym.make_vec(..., vectorization_mode="async")`` after the
    parent used torch). One intra-op thread needs no pool. Set only if torch is loaded."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_torch_thread_after_fork)

__version__ = "0.1.0"
__all__ = ["describe", "list_envs", "make_task", "register_iclgym_envs"]
