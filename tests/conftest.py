"""Shared pytest setup: the `slow` marker (long reference checks, e.g. SciFact with all-MiniLM-L6-v2)
runs only with --runslow or T2T_SLOW=1; the fixtures the reference-comparison modules share."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The models compared against references are small: threads only add overhead, and on a busy
    machine OpenMP contention makes each forward pass a hundred times slower. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (same as T2T_SLOW=1)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("T2T_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or T2T_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
