"""The training loop shared by both programs: SAM (or GD) steps with Hessian checks.

At each check (before that step's update, on that step's batch, or on a fixed Hessian batch)
it measures the loss, the plain and SAM gradients, the top eigenvalue(s) and principal
direction, both alignments, ||g|| and the SAM edge; logs one line; writes one raw-data row; then
updates. The run stops at the time limit, at `max_steps`, when the loss stops being finite (exit
code EXIT_DIVERGED), when its raw data cannot be written (EXIT_OUTPUT_FAILED), or on
SIGINT/SIGTERM, also during compiling (rows are on disk already; the plots are drawn from what
exists). Process 0 holds exclusive locks on the raw-data file and the checkpoint directory for
the whole run (`sam_eos.loop.locks`): a second run on them fails before training.

The loop is split along the way data flows: `schedule` decides (pure: check? save? stop? how
many steps?), `feed` places the data, `steps` and `check` hold the step and check (compiled
once per run, before the clock starts), and `recorder` writes rows, notes, checkpoints and
plots (all in `sam_eos.loop`). `run` wires them together.

Time: "training time" is the wall-clock time spent in the loop (steps and checks, not start-up
or compiling), in seconds internally and in hours in flags and raw data. On several processes
(hosts) process 0's clock decides for all of them, so each takes the same checks, checkpoints
and steps.
"""

import dataclasses
import enum
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from absl import logging

from sam_eos import errors, units
from sam_eos.loop import check, distributed, locks, schedule, steps
from sam_eos.loop.check import HessianCheck
from sam_eos.loop.config import Outputs, TrainConfig  # noqa: F401 - re-exported
from sam_eos.loop.feed import (  # noqa: F401 - the data kinds, re-exported for the programs
    BatchStream,
    Data,
    DeviceData,
    Feed,
    FullBatch,
    FullBatchFeed,
    Placement,
    make_feed,
)
from sam_eos.loop.measurements import compile_spectrum_checks, extra_column_names, layer_names
from sam_eos.loop.progress import Progress
from sam_eos.loop.recorder import Recorder
from sam_eos.loop.state import LoopState
from sam_eos.reports.raw_data import METHOD_COLUMNS
from sam_eos.types import LossFn, PyTree

MAX_STEPS_PER_DISPATCH = 1024


class Status(enum.StrEnum):
    """How a run ended (`RunResult.status`; equal to its string, e.g. "max_steps")."""

    TIME_LIMIT = "time_limit"
    MAX_STEPS = "max_steps"
    DIVERGED = "diverged"  # a loss that is not finite (exit code errors.EXIT_DIVERGED)
    INTERRUPTED = "interrupted"  # a signal (SIGINT or SIGTERM)
    OUTPUT_FAILED = "output_failed"  # the raw data could not be written


@dataclasses.dataclass
class RunResult:
    params: PyTree
    opt_state: PyTree
    steps: int  # updates taken
    training_seconds: float
    status: Status
    exit_code: int
    rows: list[dict[str, float]]
    # This process's wall-clock seconds by part: "compile", "steps" and "checks".
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    raw_data: str = ""  # the raw-data path written on this process ("" : none)
    files: list[str] = dataclasses.field(default_factory=list)  # every output written


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
        self._depth = 0  # entered again (compiling, then the loop): handlers installed once

    def requested(self) -> bool:
        return self.signal_number is not None

    def __enter__(self):
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal_number is not None:  # a second signal: stop now
            if jax.process_count() > 1:
                logging.error("A second signal (%d): exiting now without a checkpoint.", number)
                logging.flush()
                os._exit(_finish(Status.INTERRUPTED, number, []))
            raise KeyboardInterrupt
        self.signal_number = number
        logging.warning("Received signal %d: stopping after the current step.", number)

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth:
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def settings_record(config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """The run's settings as written into the raw-data header."""
    settings = dataclasses.asdict(config)
    settings.update(extra)
    return settings


def run_extra_columns(config: TrainConfig, params: PyTree) -> list[str]:
    """The raw-data columns beyond the paper's: the METHOD_COLUMNS (for any method but plain SGD
    with the paper's SAM), then the optional measurements'."""
    method = [] if config.is_default_method() else list(METHOD_COLUMNS)
    layers_named = layer_names(params) if config.spectrum.layer_sharpness else []
    return method + extra_column_names(config.spectrum, layers_named)


def make_schedule(config: TrainConfig) -> schedule.Schedule:
    return schedule.Schedule.from_hours(
        time_limit_in_hours=config.time_limit_in_hours,
        hessian_check_gap=config.hessian_check_gap,
        hessian_check_every_steps=config.hessian_check_every_steps,
        max_steps=config.max_steps,
        checkpoint_every_minutes=config.checkpoint_every_minutes if config.checkpoint_dir
        else None,
    )


@dataclasses.dataclass(frozen=True)
class Program:
    """The run's compiled functions: `train_steps(params, opt_state, arrays, start, n)`; the
    check's batch `check_batch(arrays, row)`; the Hessian check (`sam_eos.loop.check`) and
    the optional spectrum measurements (`sam_eos.loop.measurements`, None when off)."""

    train_steps: Callable
    check_batch: Callable
    check: HessianCheck
    spectrum: Any = None


def compile_program(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    config: TrainConfig, feed: Feed, state: LoopState,
                    hessian_batch: PyTree | None, key: jax.Array, with_checks: bool,
                    place: Placement,
                    stop_requested: Callable[[], bool] = lambda: False) -> Program:
    """Compiles the step and (`with_checks`) the check for this run's shapes and placement,
    logging each compile's seconds. A check that cannot be compiled fails at every check (a
    nan row and a note), as a check that raises does; training goes on. A compile cannot be
    interrupted: `stop_requested` is asked after each, and once it is true the rest is skipped
    (their stand-ins fail; the loop stops before calling them)."""
    logging.info("Compiling the step%s for this run's shapes.",
                 " and the Hessian check" if with_checks else "")
    arrays, row = feed.arrays(), np.int32(feed.row())
    train_steps = steps.compile_ahead(
        "the SAM step", steps.make_train_steps(loss_fn, optimizer, config.rho, feed.select,
                                               config.sam_variant),
        state.params, state.opt_state, arrays, row, np.int32(1),
    )
    if stop_requested():
        return _not_compiled(train_steps, state.ritz_vectors)
    if hessian_batch is not None:
        check_batch = lambda arrays, row: hessian_batch  # noqa: E731
    elif isinstance(feed, FullBatchFeed):
        check_batch = feed.select
    else:
        check_batch = steps.compile_ahead("the check's batch", steps.make_batch_at(feed.select),
                                          arrays, row)
    hessian_check = check.not_compiled(check.cold_like(state.ritz_vectors),
                                       "no checks are scheduled")
    if with_checks and not stop_requested():
        hessian_check = check.compile_check(loss_fn, config, state, check_batch(arrays, row),
                                            key, place)
    extra = None
    if with_checks and config.spectrum.enabled() and not stop_requested():
        extra = compile_spectrum_checks(
            loss_fn, config.spectrum, rho=config.rho,
            num_matvecs=config.solver_budget("lanczos"),
            tolerance=config.solver_tolerance("lanczos"), feed=feed, params=state.params,
            batch=check_batch(arrays, row), key=key,
            sam_point_vectors=state.sam_point_ritz_vectors,
            layer_vectors=state.layer_ritz_vectors, direction=state.ritz_vectors[0],
            variant=config.sam_variant, basis_size=config.eigensolver_basis_size)
    return Program(train_steps, check_batch, hessian_check, spectrum=extra)


def _not_compiled(train_steps: Callable, cold_start: jax.Array) -> Program:
    """The program of a run stopped while compiling: no check can be taken."""
    skipped = check.not_compiled(check.cold_like(cold_start), "stopped while compiling")
    return Program(train_steps, skipped.measure, skipped)


def _holding_output_locks(run_function: Callable[..., "RunResult"]) -> Callable[..., "RunResult"]:
    """`run` holding exclusive locks on its raw-data file and checkpoint directory (process 0)
    from before anything is read or written until it returns or raises."""

    @functools.wraps(run_function)
    def locked(loss_fn: LossFn, params: PyTree, data: Data, config: TrainConfig,
               **options: Any) -> RunResult:
        held, failure = [], None
        if distributed.is_main_process():  # only process 0 writes raw data
            try:
                held = locks.lock_run_outputs(config.outputs.raw_data, config.checkpoint_dir)
            except errors.InputError as error:
                failure = error
            except OSError as error:
                failure = errors.InputError(
                    f"--raw_data_output={config.outputs.raw_data} or --checkpoint_dir="
                    f"{config.checkpoint_dir} cannot be written ({error.strerror or error})")
        # Every process hears of a failure, or the others would wait for process 0 forever.
        distributed.raise_if_any_process_failed(failure)
        try:
            return run_function(loss_fn, params, data, config, **options)
        finally:
            for lock in held:
                lock.release()

    return locked


@_holding_output_locks
def run(
    loss_fn: LossFn,
    params: PyTree,
    data: Data,
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
      data: `FullBatch`, `DeviceData` (a training set kept on the device) or `BatchStream`
        (host batches, for a training set too large for the device).
      config: loop settings, output paths and checkpointing.
      hessian_batch: measure every check on this fixed batch instead of the step's batch.
      optimizer: the outer step, any optax optimizer, with `config.optimizer` "sgd" (no method
        columns are then written: the run's threshold is unknown); default
        `config.make_optimizer()`, e.g. `optax.sgd(config.step_size)`, which makes each step
        exactly `sam_eos.sam_update`.
      settings: extra settings to record in the raw-data header (e.g. the program's flags).
      mesh: shard every batch over this mesh's devices (`sam_eos.loop.distributed.make_mesh`),
        parameters replicated; None: the default device, or on several processes every
        device of every process.
    Returns:
      A `RunResult`; plots and raw data are written before it returns. With
      `config.checkpoint_dir` holding a checkpoint of the same run, the run resumes from it.
    """
    if mesh is None and jax.process_count() > 1:
        mesh = distributed.make_mesh()  # one run over all processes, not one per process
    place = Placement(mesh)
    if optimizer is not None and config.optimizer != "sgd":
        raise ValueError(f"give either an optax optimizer or config.optimizer="
                         f"{config.optimizer!r}, not both: the threshold and Adam's "
                         "preconditioner follow config.optimizer")
    optimizer = optimizer or config.make_optimizer()
    outputs = config.outputs if distributed.is_main_process() else Outputs()
    recorder = Recorder(config, outputs, settings_record(config, settings or {}),
                        run_extra_columns(config, params))
    state = place.replicated(check.initial_state(params, optimizer.init(params), config))
    position = schedule.Position()
    restored = recorder.restore(state)
    if restored is not None:
        state, position = restored
        logging.info("Resumed from the checkpoint at step %d (%.4f h of training).",
                     position.step, position.training_seconds / units.SECONDS_PER_HOUR)
    recorder.open(position, resumed=restored is not None)
    feed = make_feed(data, place, position.batches_taken)
    if hessian_batch is not None:
        hessian_batch = place.batch(hessian_batch)
    if mesh is not None:
        logging.info("Data parallel over %s.", distributed.describe(mesh))
    logging.info("Run %r: seed %d, rho %g, step size %g.", config.run_name, config.seed,
                 config.rho, config.step_size)
    plan = make_schedule(config)
    if not plan.has_checks:
        logging.warning("No Hessian checks scheduled: set --hessian_check_gap (hours) or "
                        "--hessian_check_every_steps to measure the sharpness.")
    key = jax.random.PRNGKey(config.seed)
    compile_started = time.perf_counter()
    with _StopFlag() as stop:  # a signal while compiling stops the run before its first step
        program = compile_program(loss_fn, optimizer, config, feed, state, hessian_batch, key,
                                  plan.has_checks, place, stop.requested)
        if plan.has_checks and config.eigensolver == "lanczos" and not stop.requested():
            program.check.measure_noise_floor(
                loss_fn, config, state, program.check_batch(feed.arrays(), np.int32(feed.row())),
                key, recorder.note)
            if program.spectrum is not None:
                program.spectrum.noise_floor = program.check.noise_floor
        compile_seconds = time.perf_counter() - compile_started
        progress = Progress(every_seconds=config.progress_every_seconds,
                            time_limit_seconds=plan.time_limit_seconds,
                            max_steps=plan.max_steps, enabled=distributed.is_main_process())
        started_seconds = position.training_seconds
        state, status, signal_number, check_seconds, consistent = _loop(
            program, feed, state, position, plan, recorder, key, progress, stop)
    exit_code = _finish(status, signal_number, recorder.rows)
    logging.info("Stopped (%s) after %d steps and %.4f h of training.", status, position.step,
                 position.training_seconds / units.SECONDS_PER_HOUR)
    plots = recorder.finish(state if consistent else None, position)
    seconds = {"compile": compile_seconds,
               "steps": position.training_seconds - started_seconds - check_seconds,
               "checks": check_seconds}
    densities = recorder.densities.path if recorder.densities is not None else ""
    densities = densities if os.path.exists(densities) else ""
    files = [path for path in (outputs.raw_data, densities, *plots, config.checkpoint_dir,
                               outputs.tensorboard_dir) if path]
    return RunResult(state.params, state.opt_state, position.step,
                     position.training_seconds, status, exit_code, recorder.rows,
                     seconds=seconds, raw_data=outputs.raw_data, files=files)


def _take_check(program: Program, feed: Feed, state: LoopState,
                position: schedule.Position, recorder: Recorder, key: jax.Array,
                stop_requested: Callable[[], bool]) -> tuple[LoopState, Status | None, float]:
    """Takes and records the check at `position`: (the state with the check's Ritz vectors,
    the status that ends the run or None to go on, the check's seconds). DIVERGED: a measured
    loss that is not finite; INTERRUPTED: a stop requested mid-check (no row, a note). A check
    that raises gives a nan row and a note, and the next check starts cold."""
    started = time.perf_counter()
    try:
        measurement, checked = _measure(program, feed, state, position, key, stop_requested)
    except Exception as error:  # noqa: BLE001 - one failed check must not end the run
        measurement = check.Measurement(error=error)
        checked = state._replace(ritz_vectors=program.check.cold_start)
    measurement.seconds = seconds = time.perf_counter() - started
    if measurement.interrupted:
        message = (f"check at step {position.step} interrupted mid-check after "
                   f"{measurement.products} HVPs ({seconds:.2f} s): no row")
        logging.warning(message[0].upper() + message[1:] + ".")
        recorder.note(message)
        return state, Status.INTERRUPTED, seconds
    row = recorder.check(position.step, position.training_seconds, measurement)
    if recorder.output_failed:  # not on disk: a resume takes this check again
        return state, None, seconds
    position.rows_written += 1
    position.last_checked_step = position.step
    if measurement.error is not None or np.isfinite(row["loss"]):
        return checked, None, seconds
    logging.error("Diverged: the loss is %s at step %d.", row["loss"], position.step)
    recorder.note(f"diverged at step {position.step}: loss {row['loss']}")
    return checked, Status.DIVERGED, seconds


def _measure(program: Program, feed: Feed, state: LoopState, position: schedule.Position,
             key: jax.Array, stop_requested: Callable[[], bool]
             ) -> tuple[check.Measurement, LoopState]:
    """The check at `position`, then its spectrum measurements (when on and not interrupted):
    (the measurement, the state with every solve's Ritz vectors)."""
    batch = program.check_batch(feed.arrays(), np.int32(feed.row()))
    measurement, checked = program.check.take(state, batch, key, position.step,
                                              stop_requested, position.rows_written)
    if measurement.interrupted or not program.spectrum:
        return measurement, checked
    starts = (None if getattr(checked, name) is None
              else check.start_block(checked, name, program.check.warm_start)
              for name in ("sam_point_ritz_vectors", "layer_ritz_vectors"))
    extra = program.spectrum.measure(checked.params, batch, feed, key, position.step,
                                     position.rows_written, *starts,
                                     direction=checked.ritz_vectors[0])
    measurement.extra = extra
    if extra.sam_point_vectors is not None:
        checked = checked._replace(sam_point_ritz_vectors=extra.sam_point_vectors)
    if extra.layer_vectors is not None:
        checked = checked._replace(layer_ritz_vectors=extra.layer_vectors)
    return measurement, checked


def _loop(program: Program, feed: Feed, state: LoopState,
          position: schedule.Position, plan: schedule.Schedule, recorder: Recorder,
          key: jax.Array, progress: Progress,
          stop: _StopFlag) -> tuple[LoopState, Status, int | None, float, bool]:
    """Steps and checks until `plan` says stop: (state, status, signal number, seconds spent
    in checks, whether the state is consistent: not after a divergence, nor after a second
    signal, which may stop it mid-update). The clock starts here, after compiling."""
    start = time.perf_counter() - position.training_seconds
    clock = lambda: time.perf_counter() - start  # noqa: E731
    last_saved = position.training_seconds
    dispatch_size, signal_number, status, consistent = 1, None, Status.TIME_LIMIT, True
    check_seconds, just_checked = 0.0, False
    with stop:
        try:
            while True:
                # The loop's one agreement per iteration: every process takes the same branches.
                position.training_seconds, signal_number, dispatch_size, failed = _agree(
                    clock(), stop.signal_number, dispatch_size, recorder.output_failed)
                if failed:
                    status = Status.OUTPUT_FAILED
                    break
                if just_checked:  # the next check's gap counts from this one's end
                    position.next_check_seconds = schedule.next_check_after(
                        plan, position.training_seconds)
                    progress.checked(position.step, position.training_seconds,
                                     recorder.rows[-1])
                    just_checked = False
                    if schedule.reached_max_steps(plan, position):  # the last check taken
                        status = Status.MAX_STEPS
                        break
                # Periodic saves come before a step's check, never after it (one state a step).
                elif schedule.checkpoint_due(plan, position, last_saved):
                    recorder.save(state, position)
                    last_saved = position.training_seconds
                if signal_number is not None:
                    status = Status.INTERRUPTED
                    break
                if schedule.out_of_time(plan, position):
                    status = Status.TIME_LIMIT
                    break
                if schedule.check_due(plan, position):
                    progress.clear()
                    state, ended, seconds = _take_check(
                        program, feed, state, position, recorder, key,
                        lambda: _agree(0.0, stop.signal_number, 1)[1] is not None)
                    check_seconds += seconds
                    if ended is not None:
                        status, consistent = ended, ended is not Status.DIVERGED
                        signal_number = stop.signal_number
                        break
                    just_checked = True
                    continue
                if schedule.reached_max_steps(plan, position):
                    status = Status.MAX_STEPS
                    break
                state, dispatch_size, diverged = _dispatch(
                    program, feed, state, position, plan, recorder, dispatch_size)
                if diverged:
                    status, consistent = Status.DIVERGED, False
                    break
                progress.update(position.step, clock())
        except KeyboardInterrupt:  # a second signal: the position may be mid-update
            status, consistent = Status.INTERRUPTED, False
        finally:
            position.training_seconds = clock()
            progress.close()
            recorder.close()
    return state, status, signal_number or stop.signal_number, check_seconds, consistent


def _dispatch(program: Program, feed: Feed, state: LoopState,
              position: schedule.Position, plan: schedule.Schedule, recorder: Recorder,
              dispatch_size: int) -> tuple[LoopState, int, bool]:
    """Runs the next steps in one call: (new state, next dispatch size, whether diverged)."""
    count = schedule.steps_next(plan, position, dispatch_size, feed.rows_left())
    started = time.perf_counter()
    taken, params, opt_state, loss, finite = program.train_steps(
        state.params, state.opt_state, feed.arrays(), np.int32(feed.row()),
        np.int32(count))
    state = state._replace(params=params, opt_state=opt_state)
    position.step += int(taken)
    feed.advance(count)
    position.batches_taken = feed.batches_taken
    if not bool(finite):
        logging.error("Diverged: the training loss or gradient is not finite at step %d "
                      "(loss %s).", position.step, float(loss))
        recorder.note(f"diverged at step {position.step}: training loss {float(loss)}")
        return state, dispatch_size, True
    size = schedule.adapt_dispatch_size(dispatch_size, count, time.perf_counter() - started,
                                        feed.chunk_rows or MAX_STEPS_PER_DISPATCH)
    return state, size, False


def _agree(seconds: float, signal_number: int | None, steps_per_dispatch: int,
           output_failed: bool = False) -> tuple[float, int | None, int, bool]:
    """Process 0's clock (seconds) and dispatch size, and any process's stop signal and output
    failure, on every process. Several processes must take the same checks, saves and steps,
    or their collectives deadlock; their own clocks and dispatch timings differ. One small
    collective per loop iteration and one per eigensolver chunk of a check (its stop poll),
    nothing on a single process."""
    if jax.process_count() == 1:
        return seconds, signal_number, steps_per_dispatch, output_failed
    microseconds = round(seconds * 1e6)
    table = distributed.gather_from_processes(np.array(
        [microseconds // 10**6, microseconds % 10**6, signal_number or 0, steps_per_dispatch,
         int(output_failed)], np.int32,
    ))
    whole, micro, _, steps, _ = (int(v) for v in table[0])
    signals = [int(s) for s in table[:, 2] if s]
    return whole + micro * 1e-6, (signals[0] if signals else None), steps, bool(table[:, 4].any())


def _finish(status: Status, signal_number: int | None, rows: list[dict[str, float]]) -> int:
    """The exit code of a run that stopped with `status`; logs the last finite check."""
    if status is Status.DIVERGED:
        finite_rows = [r for r in rows if math.isfinite(r["loss"])]
        if finite_rows:
            last = finite_rows[-1]
            logging.error("Last finite check: step %d, loss %.6g, sharpness %.6g.",
                          last["step"], last["loss"], last["hessian_norm"])
        return errors.EXIT_DIVERGED
    if status is Status.OUTPUT_FAILED:
        return errors.EXIT_OUTPUT_FAILED
    if status is Status.INTERRUPTED:
        if signal_number == signal.SIGTERM:
            return errors.EXIT_INTERRUPTED_SIGTERM
        return errors.EXIT_INTERRUPTED_SIGINT
    return errors.EXIT_OK


