"""Fixtures shared by several test files, and the XLA setting every test process runs with."""

import os

import pytest

from tests.helpers import FAST_COMPILE

# Test programs are tiny and run for a few steps, so compiling them is most of the suite's time:
# LLVM level 0 compiles several times faster and runs slower (BUILD.md, "Compile time"). Set
# before any test imports jax; subprocesses inherit it (tests/helpers.cli_env). Real runs and
# tools/bench.py keep the default level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

from tests import cdn_server  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tests that train, export or browse through subprocesses (the CLI, the pipeline, several
# devices, jax2tf + Node, Chromium) are marked `slow`: `./run.sh test -m "not slow"` skips them.
SLOW_FIXTURES = {"cache_env", "runs"}
SLOW_MODULES = {
  "tests.test_export_tfjs",
  "tests.test_browser",
  "tests.test_multidevice",
  "tests.test_pipeline",
}


# The longest files, longest first: with two workers they start at once and the rest fills
# around them, instead of one long file running alone at the end.
LONGEST_FIRST = (
  "tests.test_pipeline",
  "tests.test_distill",
  "tests.test_train",
  "tests.test_bench",
  "tests.test_multidevice",
  "tests.test_browser",
  "tests.test_export_tfjs",
)


def pytest_collection_modifyitems(items):
  for item in items:
    if (
      SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__ in SLOW_MODULES
    ):
      item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))


@pytest.fixture
def cdn():
  """A fresh scripted CDN on 127.0.0.1 (see tests/cdn_server.py)."""
  with cdn_server.CdnServer() as server:
    yield server
