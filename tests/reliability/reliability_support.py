"""Helpers of the reliability tests, taken from the test modules that own them (tests are not a
package: they are loaded by path, once, under a private name).

* ``tests/pretrain/conftest.py``: ``folders`` (two tiny built domains, once per session).
* ``tests/pretrain/test_engine.py``: ``config`` (the tiny config for an in-process run), ``clean_dist_env``.
* ``tests/shards/conftest.py``: ``write_domain`` (a hand-written built domain, broken where asked).
* ``tests/pretrain/test_evaluate.py``: ``tiny_config``, ``tiny_model`` (an untrained model for evaluation).
* ``tests/dist/test_pretrain_dist.py``: ``Launcher``/``finish`` (``torchrun -m pretrain`` with wall-clock limits),
  ``pretrain_args``, ``metrics``, and the ``deepspeed_comm_op`` build.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parents[1]


def borrow(relative: str) -> ModuleType:
    """The test module at ``tests/<relative>``, loaded once."""
    name = "reliability_borrowed_" + relative.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[name]


pretrain_fixtures = borrow("pretrain/conftest.py")
engine_tests = borrow("pretrain/test_engine.py")
shard_fixtures = borrow("shards/conftest.py")
dist_tests = borrow("dist/test_pretrain_dist.py")
evaluate_tests = borrow("pretrain/test_evaluate.py")
