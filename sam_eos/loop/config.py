"""A run's settings: `TrainConfig` and its output paths, each checked when it is made.

Every check raises `InputError` with the message the programs print for the matching flag
(`--rho must be >= 0 ...`), so code that builds a config directly gets the same checks as the
command line.
"""

import dataclasses
import math

import optax

from sam_eos import edge, eigensolver, power_iteration
from sam_eos.errors import InputError
from sam_eos.loop.measurements import SpectrumOptions
from sam_eos.reports.paths import PLOT_FIELDS, X_AXES

# The main check's solvers (--eigensolver): exact Lanczos, or the original's power iteration.
EIGENSOLVERS = ("lanczos", "power")
# Their defaults: products (Lanczos HVPs, power iterations) per check, and relative tolerance.
DEFAULT_BUDGET = {"lanczos": eigensolver.DEFAULT_NUM_MATVECS,
                  "power": power_iteration.DEFAULT_NUM_MATVECS}
DEFAULT_TOLERANCE = {"lanczos": eigensolver.DEFAULT_TOLERANCE,
                     "power": power_iteration.DEFAULT_TOLERANCE}

OPTIMIZERS = edge.OPTIMIZERS  # "sgd", "momentum", "nesterov", "adam"
SAM_VARIANTS = ("sam", "usam")


def require(condition: bool, message: str) -> None:
    """Raises InputError(message) unless condition holds."""
    if not condition:
        raise InputError(message)


def require_positive_int(name: str, value: int | None, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    require(isinstance(value, int) and value >= 1, f"--{name} must be at least 1 (got {value})")


def require_fraction(name: str, value: float) -> None:
    require(math.isfinite(value) and 0 <= value < 1, f"--{name} must be in [0, 1) (got {value})")


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Output paths; an empty string skips that output."""

    raw_data: str = ""
    eigs_curve: str = ""
    eigs_se_only: str = ""
    alignment_curve: str = ""
    loss_curve: str = ""
    density_curve: str = ""  # drawn only with TrainConfig.spectrum's densities
    layers_curve: str = ""  # drawn only with TrainConfig.spectrum's layer_sharpness
    tensorboard_dir: str = ""  # TensorBoard event files, one scalar per raw-data column

    def plots(self) -> dict[str, str]:
        """The four plots' paths by field name (the density and layers plots are drawn on
        their own)."""
        return {field: getattr(self, field) for field in PLOT_FIELDS}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the shared loop; validated on construction (raises InputError)."""

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
    # Vectors of num_params each Lanczos solve holds (None: `lanczos.default_basis_size`).
    eigensolver_basis_size: int | None = None
    eigensolver_warm_start: bool = True  # start each check from the previous one's Ritz vectors
    # Every this many checks (after the first), a warm check is also solved cold from a fresh
    # random vector, and the row keeps the larger top eigenvalue and says how far apart the two
    # were (column audit_error); 0: no audits.
    eigensolver_audit_every: int = 10
    seed: int = 0
    outputs: Outputs = Outputs()
    run_name: str = "sam_eos run"
    checkpoint_dir: str = ""  # empty: no checkpoints
    checkpoint_every_minutes: float = 10.0  # of training time
    plot_x: str = "steps"  # the plots' x-axis: "steps" or "hours"
    progress_every_seconds: float = 0.0  # of training time between progress lines; 0: off
    spectrum: SpectrumOptions = SpectrumOptions()  # optional measurements at each check
    optimizer: str = "sgd"  # the base optimizer: one of OPTIMIZERS
    momentum: float = 0.9  # beta of "momentum" and "nesterov"
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    sam_variant: str = "sam"  # "sam" (the paper's, normalised) or "usam" (unnormalised)

    def __post_init__(self):
        for name in ("rho", "step_size", "time_limit_in_hours"):
            value = getattr(self, name)
            require(math.isfinite(value), f"--{name} must be a finite number (got {value})")
        require(self.rho >= 0, f"--rho must be >= 0 (got {self.rho}); 0 gives gradient descent")
        require(self.step_size > 0, f"--step_size must be > 0 (got {self.step_size})")
        require(self.time_limit_in_hours > 0,
                f"--time_limit_in_hours must be > 0 (got {self.time_limit_in_hours})")
        gap = self.hessian_check_gap
        require(gap is None or (math.isfinite(gap) and gap >= 0),
                f"--hessian_check_gap must be >= 0 hours (got {gap}); leave it unset for no "
                "time-based checks")
        require_positive_int("hessian_check_every_steps", self.hessian_check_every_steps,
                             allow_none=True)
        require_positive_int("max_steps", self.max_steps, allow_none=True)
        self._check_eigensolver()
        minutes = self.checkpoint_every_minutes
        require(math.isfinite(minutes) and minutes > 0,
                f"--checkpoint_every_minutes must be > 0 (got {minutes})")
        require(0 <= self.seed < 2**32, f"--seed must be in [0, 2**32) (got {self.seed})")
        progress = self.progress_every_seconds
        require(math.isfinite(progress) and progress >= 0,
                f"--progress_every_seconds must be >= 0 (got {progress}); 0 turns progress off")
        require(self.plot_x in X_AXES,
                f"--plot_x must be one of {', '.join(X_AXES)} (got {self.plot_x!r})")
        self._check_optimizer()

    def _check_eigensolver(self) -> None:
        require(self.eigensolver in EIGENSOLVERS,
                f"--eigensolver must be one of {', '.join(EIGENSOLVERS)} "
                f"(got {self.eigensolver!r})")
        require_positive_int("eigensolver_max_iterations", self.eigensolver_max_iterations,
                             allow_none=True)
        tolerance = self.eigensolver_tolerance
        require(tolerance is None or (math.isfinite(tolerance) and tolerance > 0),
                f"--eigensolver_tolerance must be > 0 (got {tolerance})")
        require_positive_int("num_principal_components", self.num_principal_components)
        audit = self.eigensolver_audit_every
        require(isinstance(audit, int) and not isinstance(audit, bool) and audit >= 0,
                f"--eigensolver_audit_every must be an integer >= 0 (got {audit}); 0 turns the "
                "audits off")
        basis, k = self.eigensolver_basis_size, self.num_principal_components
        require(basis is None or (isinstance(basis, int) and not isinstance(basis, bool)
                                  and basis >= k + 3),
                f"--eigensolver_basis_size must be an integer >= k + 3 = {k + 3} "
                f"(--num_principal_components={k}; got {basis})")
        require(basis is None or self.eigensolver == "lanczos",
                "--eigensolver_basis_size sets the Lanczos basis; power iteration holds none")
        budget = self.solver_budget()
        require(self.num_principal_components <= budget,
                f"--num_principal_components={self.num_principal_components} exceeds the "
                f"eigensolver's budget of {budget} iterations; raise "
                "--eigensolver_max_iterations")

    def solver_budget(self, method: str | None = None) -> int:
        """Products (Lanczos HVPs or power iterations) a solve may use: the flag's, else the
        default of `method` (None: the run's eigensolver). The one place defaults resolve."""
        return (self.eigensolver_max_iterations
                or DEFAULT_BUDGET[method or self.eigensolver])

    def solver_tolerance(self, method: str | None = None) -> float:
        """The relative tolerance of a solve: the flag's, else `method`'s default."""
        return self.eigensolver_tolerance or DEFAULT_TOLERANCE[method or self.eigensolver]

    def _check_optimizer(self) -> None:
        require(self.optimizer in OPTIMIZERS,
                f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        require(self.sam_variant in SAM_VARIANTS,
                f"--sam_variant must be one of {', '.join(SAM_VARIANTS)} "
                f"(got {self.sam_variant!r})")
        require_fraction("momentum", self.momentum)
        require_fraction("adam_b1", self.adam_b1)
        require_fraction("adam_b2", self.adam_b2)
        require(math.isfinite(self.adam_eps) and self.adam_eps > 0,
                f"--adam_eps must be > 0 (got {self.adam_eps})")

    def audits(self) -> bool:
        """Whether checks are audited: warm Lanczos checks with eigensolver_audit_every > 0."""
        return (self.eigensolver == "lanczos" and self.eigensolver_warm_start
                and self.eigensolver_audit_every > 0)

    def is_default_method(self) -> bool:
        """Plain SGD with the paper's SAM: the run writes today's columns, at today's cost."""
        return self.optimizer == "sgd" and self.sam_variant == "sam"

    def stability_threshold(self) -> float:
        """The base optimizer's T (`sam_eos.edge.stability_threshold`)."""
        hyperparameters = {"momentum": {"momentum": self.momentum},
                           "nesterov": {"momentum": self.momentum},
                           "adam": {"b1": self.adam_b1}}.get(self.optimizer, {})
        return edge.stability_threshold(self.optimizer, self.step_size, **hyperparameters)

    def make_optimizer(self) -> optax.GradientTransformation:
        """The optax optimizer these settings name (a step is then the SAM variant's
        gradient through it)."""
        if self.optimizer == "adam":
            return optax.adam(self.step_size, b1=self.adam_b1, b2=self.adam_b2,
                              eps=self.adam_eps)
        if self.optimizer == "sgd":
            return optax.sgd(self.step_size)
        return optax.sgd(self.step_size, momentum=self.momentum,
                         nesterov=self.optimizer == "nesterov")
