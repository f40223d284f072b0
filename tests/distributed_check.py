"""Sharded against single-device results; prints one JSON object.

Run by tests/test_distributed.py in subprocesses, with OPENBLAS_NUM_THREADS=1 (four CPU
"devices" each running a threaded LAPACK eigh, as Lanczos does every step, can be a thousand
times slower on a small, busy machine) and XLA_FLAGS=--xla_force_host_platform_device_count=N,
which must be set before JAX is imported:

  distributed_check.py            one process, N = 4 devices;
  distributed_check.py multihost DIR  one of several processes (JAX_COORDINATOR_ADDRESS,
                                      JAX_NUM_PROCESSES, JAX_PROCESS_ID set), each loading
                                      only its own rows of every batch; DIR (shared by the
                                      processes) takes a checkpoint.
"""

import json
import os
import signal
import sys

from sam_eos.loop import distributed
from sam_eos.loop.distributed import local_copy

distributed.initialize_multihost()  # before any other JAX call; nothing in a plain run

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sam_eos  # noqa: E402
from sam_eos import hessian  # noqa: E402
from sam_eos.errors import InputError  # noqa: E402
from sam_eos.loop import train  # noqa: E402
from sam_eos.loop.feed import FullBatchFeed, StreamFeed  # noqa: E402
from sam_eos.loop.steps import make_train_steps  # noqa: E402
from sam_eos.loop.train import FullBatch, TrainConfig, run  # noqa: E402
from sam_eos.sam import loss_gradient_and_sam_gradient, sam_gradient, sam_update  # noqa: E402

BATCH = 64
SIZES = (16, 64, 32, 4)  # 3,300 parameters
STEP_SIZE = 0.1
RHO = 0.05
STEPS = 8


def init_params(seed):
    rng = np.random.default_rng(seed)
    return [
        {"w": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
         "b": np.full(b, 0.1, np.float32)}
        for a, b in zip(SIZES[:-1], SIZES[1:], strict=True)
    ]


def loss_fn(params, batch):
    x, y = batch["x"], batch["y"]
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    logits = x @ params[-1]["w"] + params[-1]["b"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def make_batch(seed, leading=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*leading, BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=(*leading, BATCH)).astype(np.int32)
    return {"x": x, "y": y}


def relative_error(a, b) -> float:
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(a))])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(b))])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def spans(tree) -> list[int]:
    return sorted({len(x.sharding.device_set) for x in jax.tree.leaves(tree)})


def main() -> None:
    out = {"device_count": jax.device_count()}
    mesh = distributed.make_mesh()
    single = distributed.make_mesh(1)
    out["describe"] = distributed.describe(mesh)
    params = init_params(0)
    host_batch = make_batch(1)

    batch4 = distributed.put_batch(host_batch, mesh)
    batch1 = distributed.put_batch(host_batch, single)
    params4 = distributed.put_replicated(params, mesh)
    params1 = distributed.put_replicated(params, single)
    out["batch_devices"] = len(batch4["x"].sharding.device_set)
    out["batch_shard_rows"] = sorted({s.data.shape[0] for s in batch4["x"].addressable_shards})
    out["batch_shard_starts"] = sorted(s.index[0].start for s in batch4["x"].addressable_shards)
    out["params_replicated"] = all(x.sharding.is_fully_replicated for x in jax.tree.leaves(params4))

    # One SAM step, jitted.
    step = jax.jit(lambda p, b: sam_update(loss_fn, p, b, STEP_SIZE, RHO))
    new4, new1 = step(params4, batch4), step(params1, batch1)
    out["sam_step_rel_error"] = relative_error(new4, new1)
    out["sam_step_moved"] = relative_error(new1, params)
    out["sam_step_output_devices"] = spans(new4)
    out["sam_step_output_replicated"] = all(
        x.sharding.is_fully_replicated for x in jax.tree.leaves(new4)
    )
    hlo = step.lower(params4, batch4).compile().as_text()
    out["sam_step_has_all_reduce"] = "all-reduce" in hlo
    # The per-device alternative (m-sharpness, m = 16): the mean of each shard's SAM gradient.
    # Far from the whole-batch SAM gradient, so the comparison above would notice it.
    sam_gradient_jit = jax.jit(sam_gradient, static_argnums=0)
    whole = sam_gradient_jit(loss_fn, params, host_batch, RHO)
    shards = [jax.tree.map(lambda x, i=i: x[16 * i: 16 * (i + 1)], host_batch) for i in range(4)]
    per_device = jax.tree.map(
        lambda *g: sum(g) / 4, *[sam_gradient_jit(loss_fn, params, s, RHO) for s in shards]
    )
    out["m_sharpness_rel_difference"] = relative_error(per_device, whole)
    # The sharded SAM gradient against the whole-batch one computed by hand on the host.
    grad4 = jax.jit(lambda p, b: loss_gradient_and_sam_gradient(loss_fn, p, b, RHO)[2])(
        params4, batch4
    )
    out["sam_gradient_rel_error"] = relative_error(grad4, whole)

    # Hessian-vector product.
    v = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape),
                     params)
    hvp = jax.jit(lambda p, b, v: hessian.hvp(loss_fn, p, b, v))
    hv4 = hvp(params4, batch4, distributed.put_replicated(v, mesh))
    hv1 = hvp(params1, batch1, distributed.put_replicated(v, single))
    out["hvp_rel_error"] = relative_error(hv4, hv1)

    # Top two eigenvalues (Lanczos).
    eig4, direction4, info4 = sam_eos.top_eigenvalues(loss_fn, params4, batch4,
                                                      jax.random.PRNGKey(0), 2)
    eig1, direction1, info1 = sam_eos.top_eigenvalues(loss_fn, params1, batch1,
                                                      jax.random.PRNGKey(0), 2)
    out["eigenvalues_sharded"] = np.asarray(eig4).tolist()
    out["eigenvalues_single"] = np.asarray(eig1).tolist()
    out["eigenvalues_rel_error"] = float(np.max(np.abs(np.asarray(eig4) - np.asarray(eig1))
                                                / np.abs(np.asarray(eig1))))
    out["eig_hvps"] = [int(info4.hessian_vector_products), int(info1.hessian_vector_products)]
    out["eig_converged"] = [bool(info4.converged), bool(info1.converged)]
    out["direction_alignment"] = float(abs(sum(
        np.vdot(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(direction4)),
                                      jax.tree.leaves(jax.device_get(direction1)), strict=True))))

    # make_train_steps: a fixed FullBatch and a stacked stream of batches.
    optimizer = optax.sgd(STEP_SIZE)
    full_steps = make_train_steps(loss_fn, optimizer, RHO, FullBatchFeed.select)
    train_steps = make_train_steps(loss_fn, optimizer, RHO, StreamFeed.select)
    state4 = distributed.put_replicated(optimizer.init(params), mesh)
    state1 = distributed.put_replicated(optimizer.init(params), single)
    full4 = full_steps(params4, state4, batch4, 0, STEPS)
    full1 = full_steps(params1, state1, batch1, 0, STEPS)
    out["full_batch_taken"] = [int(full4[0]), int(full1[0])]
    out["full_batch_rel_error"] = relative_error(full4[1], full1[1])
    out["full_batch_loss"] = [float(full4[3]), float(full1[3])]
    out["full_batch_output_replicated"] = all(
        x.sharding.is_fully_replicated for x in jax.tree.leaves(full4[1])
    )

    stack = make_batch(2, leading=(STEPS,))
    stack4 = distributed.put_batch(stack, mesh, stacked=True)
    stack1 = distributed.put_batch(stack, single, stacked=True)
    out["stack_shard_shape"] = list(stack4["x"].sharding.shard_shape(stack4["x"].shape))
    stream4 = train_steps(params4, state4, stack4, 0, STEPS)
    stream1 = train_steps(params1, state1, stack1, 0, STEPS)
    out["stream_taken"] = [int(stream4[0]), int(stream1[0])]
    out["stream_rel_error"] = relative_error(stream4[1], stream1[1])
    out["stream_moved"] = relative_error(stream1[1], params)

    # The whole loop as it stands: `run` keeps a FullBatch that is already sharded. (No
    # Hessian checks: their parts, the SAM gradient and the eigensolver, are compared above.)
    config = TrainConfig(step_size=STEP_SIZE, rho=RHO, max_steps=STEPS)
    result4 = run(loss_fn, params4, FullBatch(batch4), config)
    result1 = run(loss_fn, params1, FullBatch(batch1), config)
    out["run_steps"] = [result4.steps, result1.steps]
    out["run_params_rel_error"] = relative_error(result4.params, result1.params)
    out["run_matches_train_steps"] = relative_error(result4.params, full4[1])
    out["run_params_devices"] = spans(result4.params)

    # Per-process loading (one process here: every row is local).
    rows = distributed.process_rows(BATCH, mesh)
    out["process_rows_all"] = bool(np.array_equal(rows, np.arange(BATCH)))
    local = jax.tree.map(lambda x: x[rows], host_batch)
    global4 = distributed.make_global_batch(local, mesh)
    out["global_batch_equal"] = bool(
        all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(global4)),
                                                 jax.tree.leaves(host_batch), strict=True))
    )
    out["global_batch_sharding_equal"] = global4["x"].sharding == batch4["x"].sharding
    out["is_main_process"] = distributed.is_main_process()

    # Errors: a batch that does not split over 4 devices; more devices than there are.
    for name, call in [
        ("uneven_batch_error", lambda: distributed.put_batch({"x": np.zeros((30, 2))}, mesh)),
        ("uneven_stack_error", lambda: distributed.put_batch({"x": np.zeros((2, 6))}, mesh,
                                                             stacked=True)),
        ("too_many_devices_error", lambda: distributed.make_mesh(5)),
    ]:
        try:
            call()
            out[name] = None
        except InputError as error:
            out[name] = str(error)
    print("\n" + json.dumps(out))  # the last line (Gloo may print to stdout before it)


def multihost(directory: str) -> None:
    """Every process loads only its rows; the results equal one process on one device."""
    mesh = distributed.make_mesh()
    out = {
        "process": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "describe": distributed.describe(mesh),
        "is_main_process": distributed.is_main_process(),
    }
    params, host_batch = init_params(0), make_batch(1)
    stack = make_batch(2, leading=(STEPS,))
    rows = distributed.process_rows(BATCH, mesh)
    out["rows"] = rows.tolist()
    batch = distributed.make_global_batch(jax.tree.map(lambda x: x[rows], host_batch), mesh)
    out["batch_shape"] = list(batch["x"].shape)
    out["local_shard_starts"] = sorted(s.index[0].start for s in batch["x"].addressable_shards)
    stack_rows = distributed.process_rows(BATCH, mesh, stacked=True)
    stack_batch = distributed.make_global_batch(
        jax.tree.map(lambda x: x[:, stack_rows], stack), mesh, stacked=True
    )
    replicated = distributed.put_replicated(params, mesh)
    # References: the whole batch on this process's first device only.
    step = jax.jit(lambda p, b: sam_update(loss_fn, p, b, STEP_SIZE, RHO))
    out["sam_step_rel_error"] = relative_error(
        local_copy(step(replicated, batch)), step(params, host_batch)
    )
    optimizer = optax.sgd(STEP_SIZE)
    train_steps = make_train_steps(loss_fn, optimizer, RHO, StreamFeed.select)
    state = optimizer.init(params)
    sharded = train_steps(replicated, distributed.put_replicated(state, mesh), stack_batch,
                          0, STEPS)
    out["stream_rel_error"] = relative_error(
        local_copy(sharded[1]), train_steps(params, state, stack, 0, STEPS)[1]
    )
    # What train.run does: every process passes the whole batch to put_batch, which sends only
    # this process's rows to its devices.
    whole = distributed.put_batch(host_batch, mesh)
    out["whole_batch_shard_starts"] = sorted(
        s.index[0].start for s in whole["x"].addressable_shards
    )
    out["whole_batch_sam_step_rel_error"] = relative_error(
        local_copy(step(replicated, whole)), step(params, host_batch)
    )
    whole_stack = distributed.put_batch(stack, mesh, stacked=True)
    out["whole_stream_rel_error"] = relative_error(
        local_copy(train_steps(replicated, distributed.put_replicated(state, mesh), whole_stack,
                               0, STEPS)[1]),
        train_steps(params, state, stack, 0, STEPS)[1],
    )

    # Host values shared between processes.
    index = jax.process_index()
    out["gathered"] = distributed.gather_from_processes(np.array([index, 7], np.int32)).tolist()
    third = np.float64(1 / 3 + index * 1e-9)
    out["float64_sum_error"] = abs(float(distributed.sum_over_processes(third)) - (2 / 3 + 1e-9))
    out["int_sum"] = int(distributed.sum_over_processes(np.int32(10 + index)))
    out["int64_sum"] = distributed.sum_over_processes(np.array([10**8, index], np.int64)).tolist()
    # Only process 0 fails (as when it cannot open its raw-data file): both must stop.
    try:
        distributed.raise_if_any_process_failed(OSError("disk full") if index == 0 else None)
        out["failure"] = None
    except (OSError, InputError) as error:
        out["failure"] = f"{type(error).__name__}: {error}"
    # Each process's own clock, signal, dispatch size and output failure: all take process 0's
    # clock and dispatch size, and stop if any process got a signal or failed to write.
    out["agreed"] = list(train._agree(10.25 + 3 * index, signal.SIGTERM if index == 1 else None,
                                      4 + index, index == 0))
    out["mesh_of_two_processes"] = [d.process_index for d in distributed.make_mesh(2).devices.flat]
    try:
        distributed.make_mesh(3)
        out["mesh_of_three_error"] = None
    except InputError as error:
        out["mesh_of_three_error"] = str(error)
    out["local_copy_devices"] = [len(x.sharding.device_set)
                                 for x in jax.tree.leaves(local_copy(replicated))]

    # The loop with each process's rows (per_process): checks every 4 ms of training time as
    # process 0's clock says (each process must take them at the same steps), then a run to a
    # checkpoint after 4 steps and one resumed from it to 8 steps; both must end where one
    # device does. (Checks do not change the parameters; the other runs take none.)
    def config(steps, **kwargs):
        return TrainConfig(step_size=STEP_SIZE, rho=RHO, max_steps=steps, **kwargs)

    local = FullBatch(jax.tree.map(lambda x: x[rows], host_batch), per_process=True)
    timed = run(loss_fn, params, local, config(STEPS, hessian_check_gap=1e-6))
    out["timed_check_steps"] = [int(r["step"]) for r in timed.rows]
    reference = run(loss_fn, params, FullBatch(host_batch), config(STEPS))
    out["timed_run_rel_error"] = relative_error(local_copy(timed.params), reference.params)
    checkpoints = os.path.join(directory, "checkpoints")
    first = run(loss_fn, params, local, config(STEPS // 2, checkpoint_dir=checkpoints))
    resumed = run(loss_fn, params, local, config(STEPS, checkpoint_dir=checkpoints))
    out["resumed_steps"] = [first.steps, resumed.steps]
    out["resumed_rel_error"] = relative_error(local_copy(resumed.params), reference.params)
    # Process 0 cannot create its raw-data file (a path under a file); the others have none.
    unwritable = TrainConfig(step_size=STEP_SIZE, max_steps=1,
                             outputs=train.Outputs(raw_data=os.devnull + "/raw.txt"))
    try:
        run(loss_fn, params, local, unwritable)
        out["unwritable_raw_data"] = None
    except InputError:
        out["unwritable_raw_data"] = "InputError"
    except OSError:
        out["unwritable_raw_data"] = "OSError"
    print("\n" + json.dumps(out))  # the last line (Gloo may print to stdout before it)


if __name__ == "__main__":
    if sys.argv[1:2] == ["multihost"]:
        multihost(sys.argv[2])
    else:
        main()
