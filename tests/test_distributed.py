"""Data parallelism: sharded over 4 CPU devices equals a single device; the helpers' errors.

The 4-device checks run in a subprocess (tests/distributed_check.py): the device count is fixed
by XLA_FLAGS before JAX is imported, and this process has imported JAX already.
"""

import json
import pathlib
import types

import jax
import numpy as np
import pytest

from sam_eos.errors import InputError
from sam_eos.loop import distributed
from tests import processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # relative error, sharded against single device


CHECK = [str(ROOT / "tests" / "distributed_check.py")]


def _last_json(finished: processes.Finished) -> dict:
    assert finished.returncode == 0, finished.stderr[-4000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])  # Gloo may print before it


@pytest.fixture(scope="module")
def sharded():
    """One process, four devices."""
    (result,) = processes.run_processes(CHECK, processes=1, devices_per_process=4, timeout=300)
    return _last_json(result)


@pytest.fixture(scope="module")
def multihost(tmp_path_factory):
    """Two processes with two devices each, joined by jax.distributed over localhost."""
    directory = tmp_path_factory.mktemp("multihost")
    return [_last_json(result) for result in processes.run_processes(
        [*CHECK, "multihost", str(directory)], processes=2, devices_per_process=2, timeout=180
    )]


def test_the_batch_is_split_over_four_devices_and_params_replicated(sharded):
    assert sharded["device_count"] == 4
    assert sharded["describe"] == "4 cpu devices over 1 process"
    assert sharded["batch_devices"] == 4
    assert sharded["batch_shard_rows"] == [16]
    assert sharded["batch_shard_starts"] == [0, 16, 32, 48]
    assert sharded["params_replicated"]
    assert sharded["stack_shard_shape"] == [8, 16, 16]  # [steps, rows per device, features]


def test_sam_step_sharded_equals_single_device(sharded):
    assert sharded["sam_step_rel_error"] < TOLERANCE
    assert sharded["sam_step_moved"] > 1e-3  # the step did something
    assert sharded["sam_step_output_devices"] == [4]
    assert sharded["sam_step_output_replicated"]
    assert sharded["sam_step_has_all_reduce"]  # one SPMD program, gradients all-reduced


def test_sam_perturbs_along_the_whole_batch_gradient_not_per_device(sharded):
    # Sharded = the whole-batch SAM gradient; the per-device (m-sharpness) average differs
    # by far more than the tolerance, so the equality above could not hide it.
    assert sharded["sam_gradient_rel_error"] < TOLERANCE
    assert sharded["m_sharpness_rel_difference"] > 100 * TOLERANCE


def test_hessian_vector_product_and_top_eigenvalues_sharded_equal_single_device(sharded):
    assert sharded["hvp_rel_error"] < TOLERANCE
    assert sharded["eig_converged"] == [True, True]
    assert len(sharded["eigenvalues_sharded"]) == 2
    assert sharded["eigenvalues_rel_error"] < TOLERANCE
    assert sharded["direction_alignment"] > 1 - 1e-4


def test_train_steps_full_batch_and_stacked_stream_sharded_equal_single_device(sharded):
    assert sharded["full_batch_taken"] == [8, 8]
    assert sharded["full_batch_rel_error"] < TOLERANCE
    assert sharded["full_batch_output_replicated"]
    assert sharded["stream_taken"] == [8, 8]
    assert sharded["stream_rel_error"] < TOLERANCE
    assert sharded["stream_moved"] > 1e-3


def test_run_with_a_sharded_full_batch_equals_single_device(sharded):
    assert sharded["run_steps"] == [8, 8]
    assert sharded["run_params_rel_error"] < TOLERANCE
    assert sharded["run_matches_train_steps"] < TOLERANCE
    assert sharded["run_params_devices"] == [4]


def test_per_process_loading_on_one_process_is_the_whole_batch(sharded):
    assert sharded["process_rows_all"]
    assert sharded["global_batch_equal"]
    assert sharded["global_batch_sharding_equal"]
    assert sharded["is_main_process"]


def test_uneven_batches_and_too_many_devices_are_input_errors(sharded):
    assert "30 does not divide evenly over 4 devices" in sharded["uneven_batch_error"]
    assert "28 or 32" in sharded["uneven_batch_error"]
    assert "6 does not divide evenly over 4 devices" in sharded["uneven_stack_error"]
    assert "JAX sees 4" in sharded["too_many_devices_error"]


def test_two_processes_each_load_their_own_rows_and_match_one_device(multihost):
    first, second = multihost
    for i, out in enumerate(multihost):
        assert out["process"] == i
        assert out["process_count"] == 2
        assert out["device_count"] == 4 and out["local_device_count"] == 2
        assert out["describe"] == "4 cpu devices over 2 processes"
        assert out["batch_shape"] == [64, 16]
        assert out["sam_step_rel_error"] < TOLERANCE
        assert out["stream_rel_error"] < TOLERANCE
        assert out["whole_batch_sam_step_rel_error"] < TOLERANCE
        assert out["whole_stream_rel_error"] < TOLERANCE
    assert first["whole_batch_shard_starts"] == [0, 16]
    assert second["whole_batch_shard_starts"] == [32, 48]
    assert first["is_main_process"] and not second["is_main_process"]
    assert first["rows"] == list(range(32)) and second["rows"] == list(range(32, 64))
    assert first["local_shard_starts"] == [0, 16] and second["local_shard_starts"] == [32, 48]


def test_processes_share_host_values(multihost):
    for out in multihost:
        assert out["gathered"] == [[0, 7], [1, 7]]
        # float64 survives the trip: each value (~1/3) travels as two float32 halves, which
        # keep it to half an ulp of the low half, 2^-50 ~ 9e-16; with the float64 sum's
        # rounding, the two values' sum is within ~2e-15 (measured: 4.4e-16). Float32
        # alone would be off by ~1e-8.
        assert out["float64_sum_error"] < 4e-15
        assert out["int_sum"] == 21
        assert out["int64_sum"] == [2 * 10**8, 1]
        assert out["local_copy_devices"] == [1] * 6  # 3 layers x (w, b), on one local device


def test_a_failure_on_one_process_stops_every_process(multihost):
    first, second = multihost
    assert first["failure"] == "OSError: disk full"
    assert second["failure"] == (
        "InputError: process 0 failed to start the run: see its error message"
    )
    # In the loop: process 0 cannot lock (create) its raw-data file, and neither process trains.
    assert first["unwritable_raw_data"] == "InputError"
    assert second["unwritable_raw_data"] == "InputError"


def test_64_bit_values_are_not_gathered_as_32_bit_ones():
    with pytest.raises(ValueError, match="cannot gather float64"):
        distributed.gather_from_processes(np.float64(1.0))
    assert distributed.sum_over_processes(np.int64(5)) == 5  # one process: itself


def test_processes_agree_on_process_zeros_clock_and_any_stop_signal(multihost):
    # Process 0 passed (10.25 s, no signal, 4 steps), process 1 (13.25 s, SIGTERM, 5 steps).
    for out in multihost:
        assert out["agreed"] == [10.25, 15, 4, True]


def test_a_mesh_over_several_processes_takes_the_same_number_from_each(multihost):
    for out in multihost:
        assert out["mesh_of_two_processes"] == [0, 1]
        assert "over 2 processes" in out["mesh_of_three_error"]
        assert "multiple of 2" in out["mesh_of_three_error"]


def test_run_on_own_rows_with_time_based_checks_and_a_resume_matches_one_device(multihost):
    first, second = multihost
    assert first["timed_check_steps"] == second["timed_check_steps"]  # the same checks
    assert len(first["timed_check_steps"]) >= 2
    for out in multihost:
        assert out["timed_run_rel_error"] < TOLERANCE
        assert out["resumed_steps"] == [4, 8]
        assert out["resumed_rel_error"] < TOLERANCE


# In this process: one device (or whatever the caller's JAX sees).


def test_make_mesh_is_one_dimensional_over_the_first_devices():
    mesh = distributed.make_mesh()
    assert mesh.axis_names == ("batch",)
    assert mesh.size == len(jax.devices())
    assert list(distributed.make_mesh(1).devices) == jax.devices()[:1]


@pytest.mark.parametrize("count", [0, -1, "all", 2.0, True])
def test_make_mesh_rejects_bad_counts(count):
    with pytest.raises(InputError):
        distributed.make_mesh(count)


def test_make_mesh_rejects_more_devices_than_visible_and_says_how_many():
    visible = len(jax.devices())
    with pytest.raises(InputError, match=f"JAX sees {visible} "):
        distributed.make_mesh(visible + 1)


def test_check_divisible_names_sizes_that_work():
    mesh = types.SimpleNamespace(size=8)  # only the size matters
    distributed.check_divisible(64, mesh)
    with pytest.raises(InputError) as error:
        distributed.check_divisible(100, mesh)
    assert "100 does not divide evenly over 8 devices" in str(error.value)
    assert "96 or 104" in str(error.value)
    assert "(1, 2, 4, 5)" in str(error.value)  # device counts that would work
    with pytest.raises(InputError, match="such as 8,"):  # no multiple below a tiny batch
        distributed.check_divisible(5, mesh)


def test_put_batch_and_put_replicated_keep_values():
    mesh = distributed.make_mesh(1)
    batch = {"x": np.arange(12.0).reshape(6, 2), "y": np.arange(6)}
    placed = distributed.put_batch(batch, mesh)
    np.testing.assert_array_equal(placed["x"], batch["x"])
    assert placed["x"].sharding.spec == jax.sharding.PartitionSpec("batch")
    stacked = distributed.put_batch({"x": np.zeros((3, 6, 2))}, mesh, stacked=True)
    assert stacked["x"].sharding.spec == jax.sharding.PartitionSpec(None, "batch")
    params = distributed.put_replicated({"w": np.ones((2, 3))}, mesh)
    assert params["w"].sharding.is_fully_replicated
    with pytest.raises(InputError, match="no batch axis 1"):
        distributed.put_batch({"x": np.zeros(6)}, mesh, stacked=True)


MULTIHOST_VARIABLES = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SAM_EOS_MULTIHOST",
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
)


@pytest.fixture
def fake_initialize(monkeypatch):
    """Records calls to jax.distributed.initialize instead of making them."""
    for name in MULTIHOST_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def test_initialize_multihost_does_nothing_in_a_plain_run(fake_initialize):
    assert distributed.initialize_multihost() is False
    assert fake_initialize == []
    assert distributed.is_main_process()


def test_initialize_multihost_from_jax_variables(fake_initialize, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert distributed.initialize_multihost() is True
    assert fake_initialize == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    ]


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID must be set"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "must be below"),
        ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "whole number"),
        ({"JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"}, "at least 1"),
    ],
)
def test_initialize_multihost_rejects_incomplete_variables(
    fake_initialize, monkeypatch, variables, message
):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=message):
        distributed.initialize_multihost()
    assert fake_initialize == []


@pytest.mark.parametrize("tasks, expected", [("2", [{}]), ("1", [])])
def test_initialize_multihost_under_slurm_only_with_several_tasks(
    fake_initialize, monkeypatch, tasks, expected
):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": tasks,
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert distributed.initialize_multihost() is bool(expected)
    assert fake_initialize == expected


def test_initialize_multihost_can_be_switched_off(fake_initialize, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("SAM_EOS_MULTIHOST", "0")
    assert distributed.initialize_multihost() is False
    assert fake_initialize == []
