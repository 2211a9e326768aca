"""Fixtures for the control/ tests: smoke-scale datasets built once per session."""

import pytest


@pytest.fixture(scope="session")
def control_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("control_data")


@pytest.fixture(scope="session")
def smoke_dataset(control_data_dir):
    """Build (or load from the session cache) the smoke dataset of a task."""
    from control.data import load_or_build

    cache = {}

    def get(task: str):
        if task not in cache:
            cache[task] = load_or_build(task, "smoke", seed=0, data_dir=control_data_dir, command="pytest")
        return cache[task]

    return get
