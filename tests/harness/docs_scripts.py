"""What the repro tests built on ``docs/scripts`` share: loading a script as a module, and
running each test on one torch thread with its seconds printed (``pytest -m repro -s``)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "docs" / "scripts"


def load_script(name: str) -> ModuleType:
    """``docs/scripts/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread_timed():
    """One torch thread during the test (the scripts' setting); prints the seconds taken."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    yield
    print(f" [{time.perf_counter() - start:.1f} s]")
    torch.set_num_threads(before)
