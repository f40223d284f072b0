"""The absl flags both programs share, defined once, and their validation.

A program calls `define_shared_flags(...)` with its own defaults at import time, then
`train_config_from_flags(...)` in `main`, which checks every value (and that every output path
can be written) and raises `InputError` with a message naming the flag before any training.
"""

import os

import jax
from absl import flags, logging
from jax.sharding import Mesh

from sam_eos.cli.parsing import project_flag_values
from sam_eos.errors import InputError
from sam_eos.loop import distributed
from sam_eos.loop.config import (
    DEFAULT_TOLERANCE,
    EIGENSOLVERS,
    OPTIMIZERS,
    SAM_VARIANTS,
    Outputs,
    TrainConfig,
    require,
    require_positive_int,
)
from sam_eos.loop.measurements import TRACE_MIN_MATVECS, SpectrumOptions
from sam_eos.reports.figures import X_AXES, check_plot_format
from sam_eos.reports.paths import DENSITY_FILE_NAME, LAYERS_FILE_NAME, output_paths
from sam_eos.reports.raw_data import check_output_path
from sam_eos.reports.tensorboard_writer import MISSING_WRITER, writer_available

FLAGS = flags.FLAGS

# TrainConfig fields set from the flag of the same name.
CONFIG_FLAGS = (
    "step_size", "rho", "time_limit_in_hours", "hessian_check_gap", "hessian_check_every_steps",
    "max_steps", "num_principal_components", "eigensolver", "eigensolver_max_iterations",
    "eigensolver_tolerance", "eigensolver_warm_start", "eigensolver_audit_every",
    "eigensolver_basis_size", "seed",
    "checkpoint_dir", "checkpoint_every_minutes", "plot_x", "progress_every_seconds", "optimizer",
    "momentum", "adam_b1", "adam_b2", "adam_eps", "sam_variant",
)
OUTPUT_FLAGS = {  # TrainConfig.outputs field -> flag name
    "raw_data": "raw_data_output",
    "eigs_curve": "eigs_curve_output",
    "eigs_se_only": "eigs_se_only_output",
    "alignment_curve": "alignment_curve_output",
    "loss_curve": "loss_curve_output",
}


class _OptionalFloatParser(flags.FloatParser):
    """A float flag that can also be switched off from the command line: '' or 'none'."""

    def parse(self, argument):
        if argument is None or (isinstance(argument, str) and argument.strip().lower() in (
                "", "none")):
            return None
        return super().parse(argument)


def define_shared_flags(
    *,
    time_limit_in_hours: float,
    hessian_check_gap: float | None,
    step_size: float,
    batch_size: int,
) -> None:
    """Registers the shared flags with the calling program's defaults."""
    flags.DEFINE_float("rho", 0.0, "SAM radius; 0 gives gradient descent.")
    flags.DEFINE_float("step_size", step_size, "Step size eta.")
    flags.DEFINE_integer("batch_size", batch_size, "Examples (or sequences) per step.")
    flags.DEFINE_float(
        "time_limit_in_hours", time_limit_in_hours, "Stop after this much training time (hours)."
    )
    flags.DEFINE(
        _OptionalFloatParser(),
        "hessian_check_gap",
        hessian_check_gap,
        "Hours of training time between Hessian checks (0: every step; 'none' or empty: no "
        "time-based checks).",
    )
    flags.DEFINE_integer(
        "hessian_check_every_steps", None, "Also check the Hessian every this many steps."
    )
    flags.DEFINE_integer("max_steps", None, "Stop after this many steps (unset: no limit).")
    flags.DEFINE_integer("seed", 0, "Seed for initialisation, data order and the eigensolver.")
    flags.DEFINE_integer(
        "num_principal_components", 1, "How many top Hessian eigenvalues to measure."
    )
    flags.DEFINE_string(
        "eigensolver", "lanczos", f"One of {EIGENSOLVERS}: exact Lanczos (default) or the "
        "original's finite-difference power iteration."
    )
    flags.DEFINE_integer(
        "eigensolver_max_iterations", None,
        "Lanczos steps (HVPs) or power iterations per check (default 100).",
    )
    flags.DEFINE_float(
        "eigensolver_tolerance", None,
        "Relative tolerance (default "
        f"{DEFAULT_TOLERANCE['lanczos']:g} for Lanczos: its error estimate stops ten "
        "below the 1e-4 relative error asked of a check; under TF32 on GPUs the true error is "
        "about 5e-5 whatever the tolerance, and the error bound includes the products' measured "
        "noise floor, about 1e-3; "
        f"{DEFAULT_TOLERANCE['power']:g} for power iteration, as the original).",
    )
    flags.DEFINE_integer(
        "eigensolver_basis_size", None,
        "Parameter-sized vectors each Lanczos solve holds (at least k + 3; default 14 for k = "
        "1, 7 more per eigenvalue beyond the first): memory against products (README, Memory).",
    )
    flags.DEFINE_boolean(
        "eigensolver_warm_start", True,
        "Start each Lanczos check from the previous check's Ritz vectors (kept in checkpoints); "
        "false: every check starts cold, from a random vector.",
    )
    flags.DEFINE_integer(
        "eigensolver_audit_every", 10,
        "Every this many checks (warm Lanczos), also solve the check cold from a fresh random "
        "vector: a warm start can converge on the second eigenvalue of a turning cluster. The "
        "row keeps the larger top eigenvalue (Ritz values never exceed lambda_max) and column "
        "audit_error says how much larger the cold solve's was, relative (0: no audits).",
    )
    flags.DEFINE_integer(
        "num_devices", None, "Split each batch over this many devices (data parallel; unset: "
        "every device JAX sees)."
    )
    flags.DEFINE_string(
        "checkpoint_dir", "", "Save checkpoints here and resume from the latest one when the "
        "same command runs again (empty: no checkpoints)."
    )
    flags.DEFINE_float(
        "checkpoint_every_minutes", 10.0, "Minutes of training time between checkpoints."
    )
    flags.DEFINE_string(
        "compilation_cache_dir", default_compilation_cache_dir(), "JAX's persistent "
        "compilation cache: a second run of the same model loads its compiled step and check "
        "from here instead of compiling them (empty: off)."
    )
    defaults = {
        "eigs_curve_output": ("/tmp/eigs.pdf", "eigenvalues, SAM edge and 2/eta"),
        "eigs_se_only_output": ("/tmp/eigs_se_only.pdf", "eigenvalues and SAM edge"),
        "alignment_curve_output": ("/tmp/a.pdf", "alignment of the gradients"),
        "loss_curve_output": ("/tmp/ell.pdf", "training loss"),
        "raw_data_output": ("/tmp/raw.txt", "raw data, one row per Hessian check"),
    }
    for name, (default, what) in defaults.items():
        flags.DEFINE_string(name, default, f"Where to write the {what} (empty: skip; "
                            "default: inside --output_dir when set, else this /tmp path).")
    flags.DEFINE_string(
        "tensorboard_dir", "", "Also write TensorBoard event files here while the run goes: "
        "one scalar per raw-data column at x = the step, flushed after every check, and the "
        "settings as text (needs tensorboardX; empty: off)."
    )
    flags.DEFINE_string(
        "output_dir", None, "Write the five outputs under standard names in this folder "
        "(raw.txt, eigs.pdf, eigs_se_only.pdf, alignment.pdf, loss.pdf); an explicit "
        "--*_output flag still wins (unset: the /tmp paths of the --*_output flags)."
    )
    flags.DEFINE_enum("plot_x", "steps", list(X_AXES),
                      "The plots' x-axis: steps, or hours of training time.")
    _define_spectrum_flags()
    _define_optimizer_flags()
    flags.DEFINE_float(
        "progress_every_seconds", 30.0, "Seconds of training time between progress lines "
        "(a live bar instead on a terminal; 0: off)."
    )


def _define_spectrum_flags() -> None:
    """The optional measurements of each check, all off by default."""
    flags.DEFINE_integer(
        "hessian_trace_matvecs", 0, "Estimate tr H at each check with this many Hessian-vector "
        f"products (XTrace; at least {TRACE_MIN_MATVECS}): columns trace, "
        "trace_standard_error (0: off).")
    flags.DEFINE_integer(
        "spectral_density_every_checks", 0, "Every this many checks, the spectral density by "
        "stochastic Lanczos quadrature (256 products), saved in <raw stem>_density.npz and "
        "drawn into --density_output (0: off).")
    flags.DEFINE_bool(
        "batch_sharpness", False, "Column batch_sharpness: the mean of g_B^T H_B g_B / "
        "||g_B||^2 over training minibatches, until its standard error is 1 % of it (at most "
        "64 batches).")
    flags.DEFINE_bool(
        "sam_point_sharpness", False, "Column sam_point_sharpness: the top Hessian eigenvalue "
        "at the SAM point w + rho g/||g|| (Lanczos, warm-started from the previous check).")
    flags.DEFINE_bool(
        "layer_sharpness", False, "Columns layer_sharpness/<layer> and layer_share/<layer> for "
        "each layer (the first level of the params: Haiku's module names): the top eigenvalue "
        "of the layer's diagonal Hessian block (Lanczos, warm-started per layer) and the share "
        "of the check's top eigenvector in the layer; drawn into --layers_output.")
    flags.DEFINE_string(
        "layers_output", "/tmp/layers.pdf", "Where to draw the layers' sharpness and shares "
        f"(with --layer_sharpness; default: {LAYERS_FILE_NAME} inside --output_dir when set, "
        "else this /tmp path; empty: skip).")
    flags.DEFINE_string(
        "density_output", "/tmp/density.pdf", "Where to draw the spectral densities (with "
        f"--spectral_density_every_checks; default: {DENSITY_FILE_NAME} inside --output_dir "
        "when set, else this /tmp path; empty: skip).")


def _define_optimizer_flags() -> None:
    """The base optimizer and the SAM variant; each is measured against its own edge."""
    flags.DEFINE_enum(
        "optimizer", "sgd", list(OPTIMIZERS), "The base optimizer: sgd (the paper's), "
        "momentum (heavy ball), nesterov (optax's) or adam. Other than sgd, each check also "
        "writes the optimizer's stability_threshold and the effective_sharpness measured "
        "against it.")
    flags.DEFINE_float("momentum", 0.9, "beta of --optimizer=momentum or nesterov.")
    flags.DEFINE_float("adam_b1", 0.9, "b1 of --optimizer=adam.")
    flags.DEFINE_float("adam_b2", 0.999, "b2 of --optimizer=adam.")
    flags.DEFINE_float("adam_eps", 1e-8, "eps of --optimizer=adam.")
    flags.DEFINE_enum(
        "sam_variant", "sam", list(SAM_VARIANTS), "sam: the paper's w - eta grad L(w + rho "
        "g/||g||); usam: unnormalised, w - eta grad L(w + rho g).")


def _refuse_unused_optimizer_flags() -> None:
    """A hyperparameter given for an optimizer that does not use it is an error."""
    used = {"sgd": (), "momentum": ("momentum",), "nesterov": ("momentum",),
            "adam": ("adam_b1", "adam_b2", "adam_eps")}[FLAGS.optimizer] if (
        FLAGS.optimizer in OPTIMIZERS) else ()
    for name in ("momentum", "adam_b1", "adam_b2", "adam_eps"):
        require(not FLAGS[name].present or name in used,
                f"--{name} is not used by --optimizer={FLAGS.optimizer}; "
                + ("--momentum goes with momentum or nesterov" if name == "momentum"
                   else f"--{name} goes with --optimizer=adam"))


def spectrum_options_from_flags() -> SpectrumOptions:
    """The optional measurements' flags, checked; raises InputError."""
    return SpectrumOptions(hessian_trace_matvecs=FLAGS.hessian_trace_matvecs,
                           spectral_density_every_checks=FLAGS.spectral_density_every_checks,
                           batch_sharpness=FLAGS.batch_sharpness,
                           sam_point_sharpness=FLAGS.sam_point_sharpness,
                           layer_sharpness=FLAGS.layer_sharpness)


def optional_plot_from_flags(flag_name: str, file_name: str, enabled: bool) -> str:
    """An optional plot's path: --<flag_name> when given, else `file_name` inside
    --output_dir when set, else the flag's default; '' when its measurement is off."""
    if not enabled:
        return ""
    if FLAGS[flag_name].using_default_value and FLAGS.output_dir:
        return os.path.join(FLAGS.output_dir, file_name)
    return FLAGS[flag_name].value


def default_compilation_cache_dir() -> str:
    """$XDG_CACHE_HOME/sam_eos/jax, or ~/.cache/sam_eos/jax."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sam_eos", "jax")


def use_compilation_cache() -> None:
    """Turns JAX's persistent compilation cache on in `--compilation_cache_dir` (empty: off).
    Call it before anything is compiled."""
    directory = FLAGS.compilation_cache_dir
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        logging.info("Compilation cache: %s.", directory)


def train_config_from_flags(run_name: str,
                            input_paths: dict[str, str | None] | None = None) -> TrainConfig:
    """Validates the shared flags and returns the loop's config; raises InputError.
    `input_paths` (flag name -> path): the program's input files, which no output may be."""
    _refuse_huge_integers()
    require_positive_int("batch_size", FLAGS.batch_size)
    _refuse_unused_optimizer_flags()
    if FLAGS.checkpoint_dir:
        check_output_path(os.path.join(FLAGS.checkpoint_dir, "probe"), "checkpoint_dir")
    spectrum = spectrum_options_from_flags()
    outputs = {}
    for field, (name, path) in output_paths_from_flags().items():
        check_output_path(path, name)
        if path and field != "raw_data":
            check_plot_format(path, name)
        outputs[field] = path
    density = optional_plot_from_flags("density_output", DENSITY_FILE_NAME,
                                       bool(spectrum.spectral_density_every_checks))
    layers = optional_plot_from_flags("layers_output", LAYERS_FILE_NAME,
                                      spectrum.layer_sharpness)
    for name, path in (("density_output", density), ("layers_output", layers)):
        check_output_path(path, name)
        if path:
            check_plot_format(path, name)
    _refuse_aliases({**{f"--{OUTPUT_FLAGS[field]}": path for field, path in outputs.items()},
                     "--density_output": density, "--layers_output": layers},
                    {f"--{name}": path for name, path in (input_paths or {}).items()})
    return TrainConfig(**{name: FLAGS[name].value for name in CONFIG_FLAGS},
                       outputs=Outputs(**outputs, density_curve=density, layers_curve=layers,
                                       tensorboard_dir=tensorboard_dir_from_flags()),
                       run_name=run_name,
                       spectrum=spectrum)


def tensorboard_dir_from_flags() -> str:
    """--tensorboard_dir, checked writable, with tensorboardX there to write it."""
    directory = FLAGS.tensorboard_dir
    if directory:
        if not writer_available():
            raise InputError(MISSING_WRITER)
        check_output_path(os.path.join(directory, "probe"), "tensorboard_dir")
    return directory


def output_paths_from_flags() -> dict[str, tuple[str, str]]:
    """Each output's (flag that names it, path): `choose_output_paths` of the flags."""
    return choose_output_paths(
        {field: FLAGS[name].value for field, name in OUTPUT_FLAGS.items()},
        {field for field, name in OUTPUT_FLAGS.items() if not FLAGS[name].using_default_value},
        FLAGS.output_dir,
    )


def choose_output_paths(flag_paths: dict[str, str], given: set[str],
                        output_dir: str | None) -> dict[str, tuple[str, str]]:
    """Each output's (flag that names it, path): its --*_output flag's path when `given` on the
    command line, else the standard name inside `output_dir` when set, else the flag's default
    (`flag_paths`: output field -> the flag's value)."""
    inside = output_paths(output_dir) if output_dir else {}
    return {
        field: ("output_dir", inside[field]) if field in inside and field not in given
        else (OUTPUT_FLAGS[field], path)
        for field, path in flag_paths.items()
    }


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file: by resolved path (`d/./r.pdf`, symlinks), or by inode
    when both exist (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _refuse_aliases(outputs: dict[str, str], inputs: dict[str, str | None]) -> None:
    """No output may be another output or an input (flag -> path; empty paths are skipped)."""
    named = [(flag, path) for flag, path in outputs.items() if path]
    for i, (flag, path) in enumerate(named):
        for other_flag, other in named[:i]:
            require(not _same_file(path, other), f"{other_flag} and {flag} are the same file "
                    f"({path}); give each output its own path")
        for input_flag, input_path in inputs.items():
            require(not (input_path and _same_file(path, input_path)),
                    f"{flag}={path} would overwrite the input {input_flag}={input_path}; "
                    "choose another output path")


INT64_MAX = 2**63 - 1


def _refuse_huge_integers() -> None:
    """Integer flags must fit in int64 (TensorFlow and numpy take them as such)."""
    for name, value in project_flag_values().items():
        if isinstance(value, int) and not isinstance(value, bool):
            require(-INT64_MAX <= value <= INT64_MAX,
                    f"--{name}={value} is beyond the largest supported integer 2**63 - 1")


def mesh_from_flags(batch_sizes: dict[str, int]) -> Mesh | None:
    """The device mesh for `--num_devices` (None on a single device); every size in
    `batch_sizes` (what -> size) must divide evenly over it."""
    mesh = distributed.make_mesh(FLAGS.num_devices)
    if mesh.size == 1:
        return None
    for what, size in batch_sizes.items():
        distributed.check_divisible(size, mesh, what=what)
    return mesh


def check_principal_components(config: TrainConfig, num_params: int) -> None:
    """The model must have at least k parameters for k eigenvalues."""
    require(config.num_principal_components <= num_params,
            f"--num_principal_components={config.num_principal_components} exceeds the model's "
            f"{num_params} parameters")

