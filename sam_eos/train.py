"""The training loop shared by both programs: SAM (or GD) steps with Hessian checks.

At each check (before that step's update, on that step's batch, or on a fixed Hessian batch)
it measures the loss, the plain and SAM gradients, the top eigenvalue(s) and principal
direction, both alignments, ||g|| and the SAM edge; logs one line; writes one raw-data row; then
updates. Steps between checks run several to a dispatch inside one compiled `lax.while_loop`, so
a tiny model is not slowed by Python. The run stops at the time limit, at `max_steps`, when the
loss stops being finite (exit code EXIT_DIVERGED), or on SIGINT/SIGTERM (rows are on disk
already; the plots are drawn from what exists).

Time: "training time" is the wall-clock time spent in the loop (steps and checks), in seconds
internally and in hours in flags and raw data. On several processes (hosts) process 0's clock
decides for all of them, so each takes the same checks, checkpoints and steps.
"""

import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sam_eos import checkpoint, distributed, errors, hessian, tree
from sam_eos.edge import sam_edge
from sam_eos.plots import draw_plots
from sam_eos.records import RawDataWriter, column_names, keep_first_rows, read_raw_data
from sam_eos.sam import loss_gradient_and_sam_gradient

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

SECONDS_PER_HOUR = 3600.0
# A dispatch of several steps aims at this many seconds: long enough to hide Python's
# per-dispatch cost, short enough for the time limit and time-based checks to stay on time.
DISPATCH_TARGET_SECONDS = 0.25
MAX_STEPS_PER_DISPATCH = 1024


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Output paths; an empty string skips that output."""

    raw_data: str = ""
    eigs_curve: str = ""
    eigs_se_only: str = ""
    alignment_curve: str = ""
    loss_curve: str = ""

    def plots(self) -> dict[str, str]:
        return {
            "eigs_curve": self.eigs_curve,
            "eigs_se_only": self.eigs_se_only,
            "alignment_curve": self.alignment_curve,
            "loss_curve": self.loss_curve,
        }


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the shared loop (validated by `sam_eos.flags`)."""

    step_size: float
    rho: float = 0.0
    time_limit_in_hours: float = 1.0
    hessian_check_gap: float | None = None  # hours between checks; 0 = every step; None = off
    hessian_check_every_steps: int | None = None  # None = off
    max_steps: int | None = None
    num_principal_components: int = 1
    eigensolver: str = "lanczos"
    eigensolver_max_iterations: int | None = None
    eigensolver_tolerance: float | None = None
    seed: int = 0
    outputs: Outputs = Outputs()
    run_name: str = "sam_eos run"
    checkpoint_dir: str = ""  # empty: no checkpoints
    checkpoint_every_minutes: float = 10.0  # of training time


@dataclasses.dataclass(frozen=True)
class FullBatch:
    """One batch used at every step; it goes to the device once and stays there.

    `per_process`: on several processes (hosts), `batch` holds only this process's rows of the
    global batch (`sam_eos.distributed.make_global_batch`); otherwise every process passes the
    whole batch and sends its own rows. The same on a single process.
    """

    batch: PyTree
    per_process: bool = False


@dataclasses.dataclass(frozen=True)
class BatchStream:
    """A never-ending iterator of host batches (pytrees of numpy arrays), one per step.

    Optional methods of the iterator make it faster: `take(n)` returns the next n batches
    stacked along a new leading axis, `skip(n)` passes n batches (when a run resumes).
    `per_process` as for `FullBatch`: each batch holds only this process's rows.
    """

    batches: Iterator[PyTree]
    per_process: bool = False

    def take(self, n: int) -> PyTree:
        if hasattr(self.batches, "take"):
            return self.batches.take(n)
        return jax.tree.map(lambda *xs: np.stack(xs), *[next(self.batches) for _ in range(n)])

    def skip(self, n: int) -> None:
        if hasattr(self.batches, "skip"):
            self.batches.skip(n)
        else:
            for _ in range(n):
                next(self.batches)


@dataclasses.dataclass
class RunResult:
    params: PyTree
    opt_state: PyTree
    steps: int  # updates taken
    training_seconds: float
    status: str  # "time_limit", "max_steps", "diverged" or "interrupted"
    exit_code: int
    rows: list[dict[str, float]]


class _StopFlag:
    """Turns SIGINT/SIGTERM into a polite request to stop, checked between dispatches.

    A second signal stops at once: a KeyboardInterrupt on one process, or on several processes
    an immediate exit with the signal's code (the others, maybe mid-collective, could not
    follow a KeyboardInterrupt; JAX's coordination service then ends them). The last
    checkpoint stays usable either way.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal_number is not None:  # a second signal: stop now
            if jax.process_count() > 1:
                logging.error("A second signal (%d): exiting now without a checkpoint.", number)
                logging.flush()
                os._exit(_finish("interrupted", number, []))
            raise KeyboardInterrupt
        self.signal_number = number
        logging.warning("Received signal %d: stopping after the current step.", number)

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def make_train_steps(loss_fn: LossFn, optimizer: optax.GradientTransformation, rho: float):
    """A jitted `(params, opt_state, batches, num_steps, fixed) -> (params, opt_state, taken,
    loss, finite)` running up to `num_steps` SAM steps in one `lax.while_loop`.

    `batches` is one batch (used at every step) when `fixed` is true, else a stack of at least
    `num_steps` batches along a new leading axis. The loop stops early, without updating, at the
    first step whose loss or gradient is not finite; `loss` is the loss at the last step it
    evaluated.
    """

    @functools.partial(jax.jit, static_argnames="fixed")
    def train_steps(params, opt_state, batches, num_steps, fixed):
        def body(carry):
            i, params, opt_state, _, _ = carry
            batch = batches if fixed else jax.tree.map(lambda x: x[i], batches)
            loss, _, sam_grad = loss_gradient_and_sam_gradient(loss_fn, params, batch, rho)
            finite = jnp.isfinite(loss) & jnp.isfinite(tree.norm(sam_grad))
            updates, new_opt_state = optimizer.update(sam_grad, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(  # noqa: E731
                lambda a, b: jnp.where(finite, a, b), new, old
            )
            return (
                i + jnp.where(finite, 1, 0),
                keep(new_params, params),
                keep(new_opt_state, opt_state),
                loss.astype(jnp.float32),
                finite,
            )

        def cond(carry):
            i, _, _, _, finite = carry
            return (i < num_steps) & finite

        start = (jnp.int32(0), params, opt_state, jnp.float32(0), jnp.bool_(True))
        return jax.lax.while_loop(cond, body, start)

    return train_steps


def make_measure(loss_fn: LossFn, config: TrainConfig):
    """A jitted `(params, batch, key) -> dict of scalars` taking one Hessian check."""
    k = config.num_principal_components

    @jax.jit
    def measure(params, batch, key):
        loss, gradient, sam_grad = loss_gradient_and_sam_gradient(
            loss_fn, params, batch, config.rho
        )
        eigenvalues, direction, info = hessian.top_eigenvalues(
            loss_fn,
            params,
            batch,
            k,
            method=config.eigensolver,
            max_iterations=config.eigensolver_max_iterations,
            tolerance=config.eigensolver_tolerance,
            key=key,
            return_info=True,
        )
        grad_norm = tree.norm(gradient)
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "sam_edge": sam_edge(grad_norm, jnp.float32(config.step_size), config.rho),
            "g_alignment": tree.alignment(gradient, direction),
            "sg_alignment": tree.alignment(sam_grad, direction),
            "eigenvalues": eigenvalues,
            "lambda_min": info.bottom_eigenvalue,
            "hessian_vector_products": info.matrix_vector_products,
            "error_bound": info.error_bound,
            "converged": info.converged,
        }

    return measure


def _row(config: TrainConfig, step: int, seconds: float, m: dict[str, Any]) -> dict[str, float]:
    """One raw-data row from a measurement; eigenvalue columns are nan when it failed."""
    eigenvalues = np.asarray(m["eigenvalues"], np.float64)
    lambda_min = float(m["lambda_min"])
    if not bool(m["converged"]):
        eigenvalues = np.full_like(eigenvalues, np.nan)
        lambda_min = math.nan
    lambda_max = float(eigenvalues[0])
    magnitudes = [abs(lambda_max)] + ([] if math.isnan(lambda_min) else [abs(lambda_min)])
    if config.eigensolver == "power":  # the eigenvalues of largest magnitude
        magnitudes = list(np.abs(eigenvalues))
    row = {
        "time_hours": seconds / SECONDS_PER_HOUR,
        "hessian_norm": max(magnitudes),
        "two_over_eta": 2.0 / config.step_size,
        "sam_edge": float(m["sam_edge"]),
        "grad_norm": float(m["grad_norm"]),
        "loss": float(m["loss"]),
        "g_alignment": float(m["g_alignment"]),
        "sg_alignment": float(m["sg_alignment"]),
        "step": float(step),
        "lambda_max": lambda_max,
        "lambda_min": lambda_min,
        "hessian_vector_products": float(m["hessian_vector_products"]),
    }
    for i in range(1, len(eigenvalues)):
        row[f"eig_{i + 1}"] = float(eigenvalues[i])
    return row


def _failed_row(config: TrainConfig, step: int, seconds: float) -> dict[str, float]:
    names = column_names(config.num_principal_components)
    row = dict.fromkeys(names, math.nan)
    row.update(time_hours=seconds / SECONDS_PER_HOUR, two_over_eta=2.0 / config.step_size,
               step=float(step))
    return row


def _log_row(row: dict[str, float], seconds_taken: float) -> None:
    logging.info(
        "check at step %d, %.4f h: loss %.6g | sharpness %.6g | SAM edge %.6g | 2/eta %.6g | "
        "||g|| %.4g | alignment g %.3f, SAM g %.3f | %d HVPs in %.2f s",
        row["step"], row["time_hours"], row["loss"], row["hessian_norm"], row["sam_edge"],
        row["two_over_eta"], row["grad_norm"], row["g_alignment"], row["sg_alignment"],
        row["hessian_vector_products"], seconds_taken,
    )


def settings_record(config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The run's settings as written into the raw-data header."""
    settings = dataclasses.asdict(config)
    settings.update(extra)
    return settings


class _Placement:
    """Where arrays go: the default device, or sharded over a mesh (data parallel)."""

    def __init__(self, mesh):
        self.mesh = mesh

    def batch(self, batch: PyTree, stacked: bool = False, per_process: bool = False) -> PyTree:
        if self.mesh is None:
            return jax.device_put(batch)
        if per_process:
            return distributed.make_global_batch(batch, self.mesh, stacked=stacked)
        return distributed.put_batch(batch, self.mesh, stacked=stacked)

    def replicated(self, tree: PyTree) -> PyTree:
        return tree if self.mesh is None else distributed.put_replicated(tree, self.mesh)


def run(
    loss_fn: LossFn,
    params: PyTree,
    data: FullBatch | BatchStream,
    config: TrainConfig,
    *,
    hessian_batch: PyTree | None = None,
    optimizer: optax.GradientTransformation | None = None,
    settings: dict[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> RunResult:
    """Trains with SAM (GD at rho = 0) under `config`, taking Hessian checks on the way.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`.
      params: initial parameters.
      data: `FullBatch` or `BatchStream`.
      config: loop settings, output paths and checkpointing.
      hessian_batch: measure every check on this fixed batch instead of the step's batch.
      optimizer: the outer step; default `optax.sgd(config.step_size)`, which makes each step
        exactly `sam_eos.sam.sam_update`.
      settings: extra settings to record in the raw-data header (e.g. the program's flags).
      mesh: shard every batch over this mesh's devices (`sam_eos.distributed.make_mesh`),
        parameters replicated; None: the default device, or on several processes every
        device of every process.
    Returns:
      A `RunResult`; plots and raw data are written before it returns. With
      `config.checkpoint_dir` holding a checkpoint of the same run, the run resumes from it.
    """
    if mesh is None and jax.process_count() > 1:
        mesh = distributed.make_mesh()  # one run over all processes, not one per process
    place = _Placement(mesh)
    optimizer = optimizer or optax.sgd(config.step_size)
    train_steps = make_train_steps(loss_fn, optimizer, config.rho)
    measure = make_measure(loss_fn, config)
    fixed = isinstance(data, FullBatch)
    full_batch = place.batch(data.batch, per_process=data.per_process) if fixed else None
    if hessian_batch is not None:
        hessian_batch = place.batch(hessian_batch)
    state = place.replicated((params, optimizer.init(params)))
    settings = settings_record(config, settings or {})
    columns = column_names(config.num_principal_components)
    main_process = distributed.is_main_process()
    outputs = config.outputs if main_process else Outputs()
    checkpointer = None
    position = checkpoint.Position()
    rows: list[dict[str, float]] = []
    resumed = False
    if config.checkpoint_dir:
        checkpointer = checkpoint.Checkpointer(config.checkpoint_dir, settings)
        if checkpointer.latest_step() is not None:
            state, position = checkpointer.restore(state)
            resumed = True
            logging.info("Resumed from the checkpoint at step %d (%.4f h of training).",
                         position.step, position.training_seconds / SECONDS_PER_HOUR)
            if not fixed:
                data.skip(position.batches_taken)
    # Only process 0 touches the raw-data file, so only it can fail here; every process must
    # hear of it, or the others would wait for it in the loop's first collective.
    writer = failure = None
    try:
        if resumed:
            rows = _resume_raw_data(outputs.raw_data, settings, columns, position.rows_written)
        writer = RawDataWriter(outputs.raw_data, columns, settings, append=bool(rows))
    except (errors.InputError, OSError) as error:
        failure = error
    distributed.raise_if_any_process_failed(failure)
    if mesh is not None:
        logging.info("Data parallel over %s.", distributed.describe(mesh))
    logging.info("Run %r: seed %d, rho %g, step size %g.", config.run_name, config.seed,
                 config.rho, config.step_size)

    key = jax.random.PRNGKey(config.seed)
    time_limit_s = config.time_limit_in_hours * SECONDS_PER_HOUR
    gap_s = None if config.hessian_check_gap is None else config.hessian_check_gap * 3600
    every = config.hessian_check_every_steps
    checkpoint_s = config.checkpoint_every_minutes * 60
    last_checkpoint_s = position.training_seconds
    steps_per_dispatch = 1
    status = "time_limit"
    hard_stop = False
    signal_number = None
    start = time.perf_counter() - position.training_seconds

    if gap_s is None and every is None:
        logging.warning("No Hessian checks scheduled: set --hessian_check_gap (hours) or "
                        "--hessian_check_every_steps to measure the sharpness.")

    def check_due() -> bool:
        if position.step == position.last_checked_step:  # e.g. the last check before a resume
            return False
        return (every is not None and position.step % every == 0) or (
            gap_s is not None and position.training_seconds >= position.next_check_seconds
        )

    with _StopFlag() as stop:
        try:
            while True:
                position.training_seconds, signal_number, steps_per_dispatch = _agree(
                    time.perf_counter() - start, stop.signal_number, steps_per_dispatch
                )
                if checkpointer and position.training_seconds - last_checkpoint_s >= checkpoint_s:
                    checkpointer.save(state, position)
                    last_checkpoint_s = position.training_seconds
                if signal_number is not None:
                    status = "interrupted"
                    break
                if position.training_seconds >= time_limit_s:
                    status = "time_limit"
                    break
                # At max_steps a check that is due is still taken (it measures the final state).
                at_max_steps = config.max_steps is not None and position.step >= config.max_steps
                pending = None  # a stream's batch drawn for a check; its step uses it next
                if check_due():
                    if gap_s is not None:
                        position.next_check_seconds = position.training_seconds + gap_s
                    if not fixed:
                        pending = data.take(1)
                    if hessian_batch is not None:
                        check_batch = hessian_batch
                    elif fixed:
                        check_batch = full_batch
                    else:
                        check_batch = place.batch(jax.tree.map(lambda x: x[0], pending),
                                                  per_process=data.per_process)
                    row, measured = _check(
                        measure, config, state[0], check_batch,
                        jax.random.fold_in(key, position.step), position.step,
                        position.training_seconds, writer,
                    )
                    rows.append(row)
                    position.rows_written += 1
                    position.last_checked_step = position.step
                    if measured and not math.isfinite(row["loss"]):
                        logging.error("Diverged: the loss is %s at step %d.", row["loss"],
                                      position.step)
                        writer.note(f"diverged at step {position.step}: loss {row['loss']}")
                        status = "diverged"
                        break
                if at_max_steps:
                    status = "max_steps"
                    break
                # How many steps this dispatch: up to the next step-based check / max_steps.
                limit = 1 if gap_s == 0 else steps_per_dispatch
                if every is not None:
                    limit = min(limit, every - position.step % every)
                if config.max_steps is not None:
                    limit = min(limit, config.max_steps - position.step)
                dispatch_start = time.perf_counter()
                if fixed:
                    batches = full_batch
                elif pending is not None:
                    limit = 1
                    batches = place.batch(pending, stacked=True, per_process=data.per_process)
                else:
                    limit = 1 << (limit.bit_length() - 1)  # a power of two: few compiles
                    batches = place.batch(data.take(limit), stacked=True,
                                          per_process=data.per_process)
                taken, params, opt_state, loss, finite = train_steps(
                    *state, batches, limit, fixed
                )
                state = (params, opt_state)
                position.step += int(taken)
                position.batches_taken += 0 if fixed else limit
                if not bool(finite):
                    logging.error("Diverged: the training loss or gradient is not finite at "
                                  "step %d (loss %s).", position.step, float(loss))
                    writer.note(f"diverged at step {position.step}: training loss {float(loss)}")
                    status = "diverged"
                    break
                took = time.perf_counter() - dispatch_start
                if took < DISPATCH_TARGET_SECONDS / 2 and limit == steps_per_dispatch:
                    steps_per_dispatch = min(2 * steps_per_dispatch, MAX_STEPS_PER_DISPATCH)
                elif took > 2 * DISPATCH_TARGET_SECONDS and steps_per_dispatch > 1:
                    steps_per_dispatch //= 2
        except KeyboardInterrupt:  # a second signal: the position may be mid-update
            status = "interrupted"
            hard_stop = True
        finally:
            position.training_seconds = time.perf_counter() - start
            writer.close()
    if checkpointer is not None:
        if status != "diverged" and not hard_stop:  # keep the last consistent state
            checkpointer.save(state, position)
        checkpointer.close()
    exit_code = _finish(status, signal_number or stop.signal_number, rows)
    logging.info("Stopped (%s) after %d steps and %.4f h of training.", status, position.step,
                 position.training_seconds / SECONDS_PER_HOUR)
    _draw(rows, columns, config, outputs)
    return RunResult(*state, position.step, position.training_seconds, status, exit_code, rows)


def _agree(seconds: float, signal_number: int | None,
           steps_per_dispatch: int) -> tuple[float, int | None, int]:
    """Process 0's clock (seconds) and dispatch size, and any process's stop signal, on every
    process. Several processes must take the same checks, saves and steps, or their collectives
    deadlock; their own clocks and dispatch timings differ. One small collective per dispatch,
    nothing on a single process."""
    if jax.process_count() == 1:
        return seconds, signal_number, steps_per_dispatch
    microseconds = round(seconds * 1e6)
    table = distributed.gather_from_processes(np.array(
        [microseconds // 10**6, microseconds % 10**6, signal_number or 0, steps_per_dispatch],
        np.int32,
    ))
    whole, micro, _, steps = (int(v) for v in table[0])
    signals = [int(s) for s in table[:, 2] if s]
    return whole + micro * 1e-6, (signals[0] if signals else None), steps


def _finish(status: str, signal_number: int | None, rows: list[dict[str, float]]) -> int:
    """The exit code of a run that stopped with `status`; logs the last finite check."""
    if status == "diverged":
        finite_rows = [r for r in rows if math.isfinite(r["loss"])]
        if finite_rows:
            last = finite_rows[-1]
            logging.error("Last finite check: step %d, loss %.6g, sharpness %.6g.",
                          last["step"], last["loss"], last["hessian_norm"])
        return errors.EXIT_DIVERGED
    if status == "interrupted":
        if signal_number == signal.SIGTERM:
            return errors.EXIT_INTERRUPTED_SIGTERM
        return errors.EXIT_INTERRUPTED_SIGINT
    return errors.EXIT_OK


def _resume_raw_data(path: str, settings: dict[str, Any], columns: list[str],
                     rows_written: int) -> list[dict[str, float]]:
    """The rows a resumed run had written (the file cut back to them); checks the header."""
    if not path:
        return []
    if not os.path.exists(path):
        logging.warning("The raw-data file %s is gone; the resumed run starts it afresh.", path)
        return []
    saved_settings, saved_columns, _ = read_raw_data(path)
    differences = checkpoint.settings_differences(saved_settings, json.loads(
        json.dumps(settings, default=str)))
    if differences or saved_columns != columns:
        raise errors.InputError(
            f"{path} holds another run's raw data ({'; '.join(differences[:3]) or 'columns'}); "
            "move it away or pass the original --raw_data_output to resume"
        )
    keep_first_rows(path, rows_written)
    _, _, table = read_raw_data(path)
    return [dict(zip(columns, map(float, row), strict=True)) for row in table]


def _check(measure, config, params, batch, key, step, elapsed, writer):
    """Takes, logs and records one Hessian check: (row, whether it was measured).

    A check that raises is logged and recorded as a nan row with a note; training goes on.
    """
    started = time.perf_counter()
    try:
        measured = jax.device_get(measure(params, batch, key))
    except Exception as error:  # noqa: BLE001 - one failed check must not end the run
        logging.exception("Hessian check at step %d failed.", step)
        row = _failed_row(config, step, elapsed)
        writer.note(f"check at step {step} failed: {type(error).__name__}: {error}")
        writer.row(row)
        return row, False
    row = _row(config, step, elapsed, measured)
    if not bool(measured["converged"]):
        message = (
            f"check at step {step}: the eigensolver did not converge in "
            f"{int(measured['hessian_vector_products'])} products (error bound "
            f"{float(measured['error_bound']):.3g}); last estimate "
            f"{np.asarray(measured['eigenvalues']).tolist()} recorded as nan"
        )
        logging.warning(message)
        writer.note(message)
    writer.row(row)
    _log_row(row, time.perf_counter() - started)
    return row, True


def _draw(rows: list[dict[str, float]], columns: list[str], config: TrainConfig,
          outputs: Outputs) -> None:
    table = np.array([[r[name] for name in columns] for r in rows]) if rows else np.zeros((0, 0))
    try:
        draw_plots(table, columns, {"run_name": config.run_name}, outputs.plots())
    except Exception:  # noqa: BLE001 - drawing must not hide the run's result
        logging.exception("Drawing the plots failed; the raw data is complete.")
