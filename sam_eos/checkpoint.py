"""Checkpoints of a training run (orbax-checkpoint), so a preempted run resumes where it was.

A checkpoint holds the parameters and optimiser state (an orbax pytree checkpoint) and the
loop's position as JSON: step, training time, time of the next time-based check, batches taken
from the data stream, raw-data rows written, and the run's settings. Orbax writes each
checkpoint into a temporary directory and renames it when complete, so a kill during a save
leaves the previous checkpoint usable. Resuming with different settings is refused, naming the
differences; `RESUMABLE_CHANGES` may differ (a resumed run may be given more time or steps).
"""

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp

from sam_eos.errors import InputError

PyTree = Any
RESUMABLE_CHANGES = frozenset(
    {"time_limit_in_hours", "max_steps", "checkpoint_every_minutes", "checkpoint_dir"}
)


@dataclasses.dataclass
class Position:
    """Where a run is, beside its parameters (all JSON-friendly)."""

    step: int = 0
    training_seconds: float = 0.0
    next_check_seconds: float = 0.0
    batches_taken: int = 0
    rows_written: int = 0
    last_checked_step: int = -1


def settings_differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Human-readable differences between two settings records, ignoring RESUMABLE_CHANGES."""
    if isinstance(saved, dict) and isinstance(current, dict):
        differences = []
        for key in sorted(set(saved) | set(current)):
            if key in RESUMABLE_CHANGES:
                continue
            name = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in current:
                differences.append(f"{name} only in the {'checkpoint' if key in saved else 'run'}")
            else:
                differences += settings_differences(saved[key], current[key], name)
        return differences
    if saved != current:
        return [f"{path}: checkpoint {saved!r}, now {current!r}"]
    return []


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists, etc.)."""
    return json.loads(json.dumps(settings, default=str))


class Checkpointer:
    """Saves and restores one run's checkpoints in `directory` (keeps the latest two)."""

    def __init__(self, directory: str, settings: dict[str, Any]):
        self.directory = os.path.abspath(directory)
        self.settings = _normalise(settings)
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: PyTree, position: Position) -> None:
        """Writes a checkpoint of `state` (e.g. (params, opt_state)) at `position.step`, unless
        one of that step exists already (the state at a step is the same)."""
        if position.step in self._manager.all_steps():
            return
        meta = {"position": dataclasses.asdict(position), "settings": self.settings}
        self._manager.save(
            position.step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, template: PyTree) -> tuple[PyTree, Position]:
        """The latest checkpoint's (state, position); `template` gives structure and placement.

        Raises InputError when the checkpoint was made with different settings.
        """
        step = self._manager.latest_step()
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        differences = settings_differences(meta["settings"], self.settings)
        if differences:
            raise InputError(
                f"the checkpoint in {self.directory} is of a run with different settings ("
                + "; ".join(differences[:5])
                + "); use another --checkpoint_dir, or the same flags to resume"
            )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(template))
        )
        return restored["state"], Position(**meta["position"])

    def close(self) -> None:
        self._manager.close()
