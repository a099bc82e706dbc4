import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)   # small nets: one thread is fastest and leaves the other core to the torchrun test


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the slow quality checks")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long quality checks, run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def steps():
    """The optimizer steps taken while the test runs, in order (a list of tests.wiring.Step)."""
    from tests import wiring
    taken, stop = wiring.record_steps()
    yield taken
    stop()


@pytest.fixture
def updates():
    """The optimizer steps taken while the test runs, as dicts of lists (tests.wiring.record_updates)."""
    from tests import wiring
    record, stop = wiring.record_updates()
    yield record
    stop()
