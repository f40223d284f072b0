"""Data parallelism over every device JAX sees, with JAX's own sharding machinery.

A 1-D `jax.sharding.Mesh` with axis "batch" spans the devices. Batches are placed sharded along
their batch axis (`put_batch`), parameters and optimiser state replicated (`put_replicated`),
and the jit-compiled functions of `sam_eos.sam`, `sam_eos.hessian` and `sam_eos.loop.train` are
used unchanged: GSPMD propagates the shardings and inserts the all-reduces. Since `loss_fn`
averages over the *global* batch, every gradient -- and so the SAM perturbation
`rho * g / ||g||` -- is that of the whole batch (the paper's SAM), not per-device m-sharpness.
Results equal the single-device ones up to float rounding.

A batch must divide evenly over the devices (`check_divisible` says which sizes work); nothing
is padded, since padding would change the loss.

Several CPU "devices" (XLA_FLAGS=--xla_force_host_platform_device_count=N, for tests): set
OPENBLAS_NUM_THREADS=1 too, before the process starts. Otherwise each device's LAPACK `eigh`
(Lanczos calls one every step) spawns threads that fight over the cores: on 2 busy cores a
100-step Lanczos went from 0.15 s to 4-27 s.

Several hosts (processes): call `initialize_multihost()` first thing, before any other JAX call.
It calls `jax.distributed.initialize()` only when the environment asks for it:

  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator service (read by JAX itself);
  JAX_NUM_PROCESSES        how many processes take part (read here, passed to JAX);
  JAX_PROCESS_ID           this process's index, 0 .. JAX_NUM_PROCESSES - 1 (read here);
  JAX_LOCAL_DEVICE_IDS     optional: comma-separated local devices this process uses (JAX);
  JAX_COORDINATOR_PORT     optional: the port JAX picks under SLURM / Open MPI (JAX);

or, without JAX_COORDINATOR_ADDRESS, a cluster launcher JAX detects by itself: SLURM (`srun`
with SLURM_NTASKS > 1) or Open MPI (`mpirun`, OMPI_MCA_orte_hnp_uri with OMPI_COMM_WORLD_SIZE
> 1). SAM_EOS_MULTIHOST=0 turns the detection off. Then `jax.devices()` lists every host's
devices and the mesh spans them all; either every host passes the same global batch to
`put_batch`, or each host loads only its rows (`process_rows`) and `make_global_batch` joins
them. Only the main process (`is_main_process`) should write files. Small host values (counts,
clocks, partial sums) travel with `gather_from_processes` / `sum_over_processes`; work a host
does alone (its share of a test set) uses `local_copy` of the replicated parameters.
"""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sam_eos.errors import InputError
from sam_eos.types import PyTree

BATCH_AXIS = "batch"
MULTIHOST_SWITCH = "SAM_EOS_MULTIHOST"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh, axis "batch", over `num_devices` of `jax.devices()` (None = all).

    On one process: the first `num_devices`. On several: the same number of each process's
    first local devices, so `num_devices` must be a multiple of the process count (every
    process holds part of every batch).
    """
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)):
        raise InputError(f"the number of devices must be a whole number, not {num_devices!r}")
    if not 1 <= num_devices <= len(devices):
        raise InputError(
            f"cannot use {num_devices} devices: JAX sees {len(devices)} "
            f"({devices[0].platform}); choose 1 to {len(devices)}"
        )
    processes = jax.process_count()
    if processes == 1:
        return Mesh(np.array(devices[:num_devices]), (BATCH_AXIS,), axis_types=(AxisType.Auto,))
    if num_devices % processes:
        raise InputError(
            f"cannot use {num_devices} devices over {processes} processes: every process "
            f"needs the same number, so use a multiple of {processes}"
        )
    per_process = num_devices // processes
    chosen = [
        device
        for index in range(processes)
        for device in [d for d in devices if d.process_index == index][:per_process]
    ]
    if len(chosen) != num_devices:
        raise InputError(f"some process has fewer than {per_process} devices")
    return Mesh(np.array(chosen), (BATCH_AXIS,), axis_types=(AxisType.Auto,))


def describe(mesh: Mesh) -> str:
    """E.g. "4 cpu devices over 1 process", for the log."""
    platforms = sorted({d.platform for d in mesh.devices.flat})
    processes = len({d.process_index for d in mesh.devices.flat})
    return (f"{mesh.size} {'/'.join(platforms)} device{'s' * (mesh.size != 1)} over "
            f"{processes} process{'es' * (processes != 1)}")


def check_divisible(batch_size: int, mesh: Mesh, *, what: str = "batch size") -> None:
    """Raises InputError, naming sizes that work, unless `batch_size` splits evenly over `mesh`."""
    n = mesh.size
    if batch_size % n == 0 and batch_size > 0:
        return
    lower, upper = (batch_size // n) * n, (batch_size // n + 1) * n
    multiples = f"{lower} or {upper}" if lower > 0 else f"{upper}"
    counts = [d for d in range(1, n + 1) if batch_size % d == 0]
    raise InputError(
        f"the {what} {batch_size} does not divide evenly over {n} devices: use a multiple of "
        f"{n} such as {multiples}, or a device count that divides {batch_size} "
        f"({', '.join(map(str, counts))})"
    )


def batch_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """Split along the batch axis: axis 0, or axis 1 of a stack of batches [n, B, ...]."""
    spec = PartitionSpec(None, BATCH_AXIS) if stacked else PartitionSpec(BATCH_AXIS)
    return NamedSharding(mesh, spec)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def _batch_axis_sizes(batch: PyTree, axis: int) -> set[int]:
    sizes = set()
    for leaf in jax.tree.leaves(batch):
        shape = np.shape(leaf)
        if len(shape) <= axis:
            raise InputError(f"a batch array of shape {shape} has no batch axis {axis}")
        sizes.add(shape[axis])
    return sizes


def put_batch(batch: PyTree, mesh: Mesh, *, stacked: bool = False) -> PyTree:
    """`batch` (numpy or jax arrays) on `mesh`, every leaf split along its batch axis.

    The batch axis is 0, or 1 when `stacked` (a stack of batches [n, B, ...] as `make_train_steps`
    takes them). With several processes every process passes the same whole batch and sends only
    its own rows (`process_rows`) to its devices; see `make_global_batch` for a process that
    loads only its rows.
    """
    axis = 1 if stacked else 0
    sizes = _batch_axis_sizes(batch, axis)
    for size in sizes:
        check_divisible(size, mesh)
    if jax.process_count() > 1:
        rows = process_rows(sizes.pop(), mesh, stacked=stacked)
        local = jax.tree.map(lambda x: np.take(np.asarray(x), rows, axis=axis), batch)
        return make_global_batch(local, mesh, stacked=stacked)
    return jax.device_put(batch, batch_sharding(mesh, stacked=stacked))


def put_replicated(tree: PyTree, mesh: Mesh) -> PyTree:
    """`tree` (parameters, optimiser state, a key) copied whole onto every device of `mesh`."""
    return jax.device_put(tree, replicated_sharding(mesh))


def process_rows(global_batch_size: int, mesh: Mesh, *, stacked: bool = False) -> np.ndarray:
    """Indices of the rows of a global batch that this process holds, in the order that
    `make_global_batch` expects its `local_batch` (all rows on a single process)."""
    check_divisible(global_batch_size, mesh)
    shape = (1, global_batch_size) if stacked else (global_batch_size,)
    indices = batch_sharding(mesh, stacked=stacked).addressable_devices_indices_map(shape)
    ranges = set()
    for index in indices.values():
        rows = index[1 if stacked else 0]
        ranges.add((rows.start or 0, global_batch_size if rows.stop is None else rows.stop))
    return np.concatenate([np.arange(a, b) for a, b in sorted(ranges)])


def make_global_batch(local_batch: PyTree, mesh: Mesh, *, stacked: bool = False) -> PyTree:
    """One global batch, sharded over `mesh`, from each process's own rows.

    `local_batch` holds this process's rows (`process_rows`) of the global batch, so no host
    loads the whole batch; the global batch size is the local one times the number of
    processes. On a single process this is `put_batch`.
    """
    axis = 1 if stacked else 0
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    for size in _batch_axis_sizes(local_batch, axis):
        if local_devices == 0 or size % local_devices:
            raise InputError(
                f"this process's batch of {size} rows does not divide evenly over its "
                f"{local_devices} devices in the mesh"
            )
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, stacked=stacked), local_batch
    )


def _whole_number(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise InputError(f"{name}={value!r} must be a non-negative whole number")
    return number


def _launcher_size() -> int:
    """How many processes a SLURM or Open MPI launch started (1 when neither)."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(name in os.environ for name in slurm):
        return _whole_number("SLURM_NTASKS", os.environ["SLURM_NTASKS"])
    if "OMPI_MCA_orte_hnp_uri" in os.environ and "OMPI_COMM_WORLD_SIZE" in os.environ:
        return _whole_number("OMPI_COMM_WORLD_SIZE", os.environ["OMPI_COMM_WORLD_SIZE"])
    return 1


def initialize_multihost() -> bool:
    """Joins a multi-process run when the environment says so (see the module docstring).

    Call it before any other JAX call. Returns whether `jax.distributed` is initialised; does
    nothing (False) in an ordinary single-process run.
    """
    if jax.distributed.is_initialized():
        return True
    if os.environ.get(MULTIHOST_SWITCH, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        num_processes = os.environ.get("JAX_NUM_PROCESSES")
        process_id = os.environ.get("JAX_PROCESS_ID")
        if (num_processes is None or process_id is None) and _launcher_size() == 1:
            raise InputError(
                "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must "
                "be set too (or launch with srun / mpirun)"
            )
        kwargs = {}
        if num_processes is not None:
            kwargs["num_processes"] = _whole_number("JAX_NUM_PROCESSES", num_processes)
            if kwargs["num_processes"] < 1:
                raise InputError("JAX_NUM_PROCESSES must be at least 1")
        if process_id is not None:
            kwargs["process_id"] = _whole_number("JAX_PROCESS_ID", process_id)
        if len(kwargs) == 2 and kwargs["process_id"] >= kwargs["num_processes"]:
            raise InputError(
                f"JAX_PROCESS_ID={process_id} must be below JAX_NUM_PROCESSES={num_processes}"
            )
        jax.distributed.initialize(coordinator_address=coordinator, **kwargs)
        return True
    if _launcher_size() > 1:
        jax.distributed.initialize()  # JAX reads the launcher's variables itself
        return True
    return False


def is_main_process() -> bool:
    """Whether this is process 0, the one that logs, writes raw data and draws plots."""
    return jax.process_index() == 0


def gather_from_processes(values: np.ndarray) -> np.ndarray:
    """`values` of every process stacked, [process_count, *shape], on every process.

    Shapes must match across processes. For small host values (counts, clocks, flags); one
    collective across processes, nothing at all on a single process. 64-bit values are refused
    (JAX would carry them as 32-bit ones); `sum_over_processes` takes float64.
    """
    values = np.asarray(values)
    if values.dtype.itemsize > 4 and not jax.config.jax_enable_x64:
        raise ValueError(f"cannot gather {values.dtype} values exactly; use 32-bit ones")
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values))


def raise_if_any_process_failed(error: BaseException | None) -> None:
    """Re-raises this process's `error`, or raises InputError if another process had one.

    For a step that only some processes can fail (process 0 opening its files): each reports
    whether it failed, so all stop together instead of waiting for a failed process in a later
    collective. Every process must call it.
    """
    failed = gather_from_processes(np.int32(error is not None))
    if error is not None:
        raise error
    if failed.any():
        first = int(np.flatnonzero(failed)[0])
        raise InputError(f"process {first} failed to start the run: see its error message")


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """The sum over processes of `values` (numbers or an array), on every process.

    float64 input stays float64 to about 1e-14 relative: it travels as two float32 halves,
    since JAX carries 32-bit floats by default.
    """
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    if values.dtype.kind in "iu" and values.dtype.itemsize > 4:
        if np.abs(values).max(initial=0) >= 2**31 // jax.process_count():
            raise ValueError("integers summed over processes must fit in 32 bits")
        return sum_over_processes(values.astype(np.int32)).astype(values.dtype)
    if values.dtype == np.float64:
        high = values.astype(np.float32)
        low = (values - high).astype(np.float32)
        parts = gather_from_processes(np.stack([high, low])).astype(np.float64)
        return parts.sum(axis=(0, 1))
    return gather_from_processes(values).sum(axis=0).astype(values.dtype)


def local_copy(tree: PyTree) -> PyTree:
    """This process's copy of replicated arrays (e.g. trained parameters), on one of its own
    devices, for work a process does by itself (evaluating its share of a test set)."""
    return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)
