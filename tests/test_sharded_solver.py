"""FSDP-sharded parameters stay sharded: a tracker update on 4 CPU devices keeps the solver's
vectors in the parameters' layout and sharding, and equals one device's result.

The check runs in a subprocess (tests/sharded_solver_check.py): the device count is fixed by
XLA_FLAGS before JAX is imported, and this process has imported JAX already.
"""

import json

import pytest

from tests import processes

TOLERANCE = 1e-5  # relative error of the eigenvalue, sharded against one device


@pytest.fixture(scope="module")
def checked() -> dict:
    (result,) = processes.run_processes([str(processes.ROOT / "tests" / "sharded_solver_check.py")],
                                        processes=1, devices_per_process=4, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_sharded_update_equals_one_device(checked):
    assert checked["device_count"] == 4
    assert max(checked["relative_errors"]) < TOLERANCE, checked["relative_errors"]
    assert checked["direction_alignment"] > 1 - TOLERANCE


def test_the_state_and_the_direction_keep_each_parameter_sharding(checked):
    params = checked["param_specs"]
    assert any("fsdp" in spec for spec in params) and any(spec == [None] for spec in params)
    expected_rows = [[None, *spec] for spec in params]  # the rows axis replicated
    assert checked["init_state_specs"] == expected_rows
    assert checked["state_specs"] == expected_rows
    assert checked["direction_specs"] == params


def test_the_compiled_update_gathers_no_vector_of_all_parameters(checked):
    assert checked["flat_shapes"] == []  # no f32[num_params] buffer, replicated or not
    # The products gather each weight, as FSDP does; never a whole vector of parameters.
    assert checked["largest_all_gather"] <= checked["largest_leaf"]


def test_per_device_temporaries_are_at_most_a_third_of_one_device(checked):
    assert checked["temp_bytes_sharded"] <= checked["temp_bytes_single"] / 3, checked
