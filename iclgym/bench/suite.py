"""The versioned benchmark suite ``iclgym-suite-v0``: which (env id, spec, split, training
budget, seeds) a benchmarked model is trained and scored on, declared as data, each entry with
the reason it is in the suite. Changing any entry changes the data or the budget a score means,
so it bumps :data:`SUITE_VERSION` (and the entries' fingerprints change with it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from iclgym.registry import make_task

SUITE_VERSION = "iclgym-suite-v0"


@dataclass(frozen=True)
class SuiteEntry:
    """One suite entry.

    Attributes:
        name: unique within the suite (``family/what``).
        env_id: a registered id (its ``-vN`` is part of the fingerprint).
        spec: spec overrides of the id's defaults.
        split: the scored split: a seed-stream split or one of the task's named splits.
        steps: training steps of the full budget (stream regime, batch 64).
        quick_steps: the ``--quick`` budget (CI and newcomers).
        seeds: training seeds.
        eval_sequences: held-out sequences per seed (evaluation seed 0).
        reason: why the entry is in the suite.
    """

    name: str
    env_id: str
    spec: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    split: str = "test"
    steps: int = 2000
    quick_steps: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_sequences: int = 1024
    reason: str = ""

    def task(self):
        """The entry's task (the env id's defaults with ``spec``)."""
        return make_task(self.env_id, **self.spec)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["spec"] = dict(self.spec)
        return out


def _entry(name: str, env_id: str, reason: str, **kwargs: Any) -> SuiteEntry:
    spec = MappingProxyType(dict(kwargs.pop("spec", {})))
    return SuiteEntry(name, env_id, spec, reason=reason, **kwargs)


SUITE: tuple[SuiteEntry, ...] = (
    _entry(
        "markov/bigram", "ICL-MarkovChain-v0",
        "the statistical induction head (Edelman et al. 2024): in-context bigram statistics of "
        "a fresh Dirichlet(1) chain, k=3, T=100; the unigram plateau then the switch",
        spec={"num_states": 3, "seq_len": 100},
    ),
    _entry(
        "markov/trigram", "ICL-NGram-v0",
        "order-3 in-context chains: needs two-token contexts (a deeper induction circuit)",
    ),
    _entry(
        "templates/aba-abb-unseen", "ICL-SymbolTemplate-v0",
        "abstract symbols (Boix-Adsera et al. 2024): ABA vs ABB on symbols never seen in "
        "training, the relational-reasoning probe",
    ),
    _entry(
        "templates/copy-unseen", "ICL-SymbolCopy-v0",
        "copy an unseen symbol: the inverse-scaling probe of Boix-Adsera et al. 2024",
    ),
    _entry(
        "sparse-bigram/default", "ICL-SparseContextualBigram-v0",
        "sparse contextual bigrams (Ren, Wang, Lee 2024): a fixed transition matrix read at a "
        "few query-dependent positions; retrieval learned in the weights",
    ),
    _entry(
        "priority-graph/planted", "ICL-PriorityGraph-v0",
        "token-priority graphs (Li et al. 2024): hard retrieval of the highest-priority tokens, "
        "then soft composition",
    ),
    _entry(
        "multi-concept/iid", "ICL-MultiConcept-v0",
        "multi-concept prompts (after Bu et al. 2024): continuous word and label vectors, the "
        "task concept read from the context",
        split="iid",
    ),
    _entry(
        "multi-concept/switched", "ICL-MultiConcept-v0",
        "the same model scored with the mapping switched: fails when it took the fixed "
        "mapping's shortcut (a mechanism probe, reported beside iid)",
        split="ood_switched",
    ),
    _entry(
        "multi-concept/random-mapping", "ICL-MultiConcept-Random-v0",
        "the label mapping drawn per prompt: it must be copied from the demonstrations",
    ),
    _entry(
        "multi-concept/long-context", "ICL-MultiConcept-Random-v0",
        "length generalisation: trained on 16 demonstrations, scored on 64",
        split="ood_length_64",
    ),
)  # fmt: skip
"""The entries of :data:`SUITE_VERSION`: every registered family, and held-out splits where the
family has them (the named splits of each family's env page)."""


def fingerprint(entry: SuiteEntry) -> str:
    """sha256 (hex) of what an entry's scores are computed on: the suite version, the env id
    (with its ``-vN``), the fully resolved spec (defaults included, so a changed default
    changes it), the split, the seeds and the evaluation set's size and seed."""
    task = entry.task()
    payload = {
        "suite": SUITE_VERSION,
        "env_id": entry.env_id,
        "spec": task.spec.to_dict(),
        "split": entry.split,
        "seeds": list(entry.seeds),
        "eval_sequences": entry.eval_sequences,
        "eval_seed": 0,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
