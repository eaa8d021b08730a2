"""Shared test fixtures."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests import helpers.py / _tiny_sd.py directly


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: on a shared 2-core machine an
    oversubscribed OpenMP pool makes them many times slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
