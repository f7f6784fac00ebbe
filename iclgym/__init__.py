"""iclgym: a Gymnasium registry of synthetic in-context-learning tasks with Bayes oracles.

``import iclgym`` registers every env id (idempotently) without importing torch.
"""

from iclgym.registry import describe, list_envs, make_task, register_iclgym_envs

register_iclgym_envs()

__version__ = "0.1.0"
__all__ = ["describe", "list_envs", "make_task", "register_iclgym_envs"]
