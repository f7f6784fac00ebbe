"""Task families: one module per family, each with a frozen spec, sampler, oracle, strategies."""

from iclgym.tasks.base import (
    SPLITS,
    Batch,
    OracleEstimate,
    Strategy,
    Task,
    TaskSpec,
    make_generator,
)
from iclgym.tasks.markov import MarkovChainSpec, MarkovChainTask
from iclgym.tasks.multi_concept import MultiConceptSpec, MultiConceptTask
from iclgym.tasks.priority_graph import PriorityGraphSpec, PriorityGraphTask
from iclgym.tasks.sparse_bigram import SparseContextualBigramSpec, SparseContextualBigramTask
from iclgym.tasks.templates import SymbolTemplateSpec, SymbolTemplateTask

TASK_FAMILIES: dict[str, type[Task]] = {
    MarkovChainTask.name: MarkovChainTask,
    SymbolTemplateTask.name: SymbolTemplateTask,
    SparseContextualBigramTask.name: SparseContextualBigramTask,
    PriorityGraphTask.name: PriorityGraphTask,
    MultiConceptTask.name: MultiConceptTask,
}
"""Family name -> task class; the registry builds envs and tasks from these names."""


def make_family_task(family: str, **spec_kwargs: object) -> Task:
    """Instantiate task family ``family`` with spec keyword arguments."""
    try:
        cls = TASK_FAMILIES[family]
    except KeyError:
        raise ValueError(
            f"unknown task family {family!r}; known: {sorted(TASK_FAMILIES)}"
        ) from None
    return cls(**spec_kwargs)


__all__ = [
    "SPLITS",
    "TASK_FAMILIES",
    "Batch",
    "MarkovChainSpec",
    "MarkovChainTask",
    "MultiConceptSpec",
    "MultiConceptTask",
    "OracleEstimate",
    "PriorityGraphSpec",
    "PriorityGraphTask",
    "SparseContextualBigramSpec",
    "SparseContextualBigramTask",
    "Strategy",
    "SymbolTemplateSpec",
    "SymbolTemplateTask",
    "Task",
    "TaskSpec",
    "make_family_task",
    "make_generator",
]
