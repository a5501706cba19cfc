"""Fixtures shared by several test files."""
import pytest

from tests import cdn_server


@pytest.fixture
def cdn():
  """A fresh scripted CDN on 127.0.0.1 (see tests/cdn_server.py)."""
  with cdn_server.CdnServer() as server:
    yield server
