import pytest

from fault_launch import Run


@pytest.fixture(autouse=True)
def _no_run_outlives_its_test():
    """A trainer started in the background by a failing test would go on using the machine's
    cores (and, under a bare deepspeed launcher, leave ranks behind) for every later test."""
    yield
    Run.kill_all()
