"""Shared pytest setup: the `slow` marker (long reference checks, e.g. SciFact with all-MiniLM-L6-v2)
runs only with --runslow or T2T_SLOW=1."""

import os

import pytest


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
