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
from absl import logging

from sam_eos.errors import InputError
from sam_eos.loop.schedule import Position
from sam_eos.reports.raw_data import RESUMABLE_CHANGES, settings_differences  # noqa: F401
from sam_eos.types import PyTree

# Entries of the loop's state (a dict) that checkpoints written before they existed lack: such
# a checkpoint restores without them, and they keep the template's value (for the eigensolver's
# Ritz vectors, zeros: the first check after the resume starts cold).
OPTIONAL_STATE = frozenset({"ritz_vectors"})
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

    def save(self, state: PyTree, position: Position) -> bool:
        """Writes a checkpoint of `state` (e.g. (params, opt_state)) at `position.step`, unless
        one of that step exists already (the state at a step is the same).

        A failed save (a full disk, a lost mount) is logged in one line and returns False: the
        run goes on, the previous checkpoint stays usable, and the next save tries again.
        """
        if position.step in self._manager.all_steps():
            return True
        meta = {"position": dataclasses.asdict(position), "settings": self.settings}
        try:
            self._manager.save(
                position.step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 - orbax raises many kinds; all mean "not saved"
            logging.error("Could not save the checkpoint of step %d in %s (%s); training goes "
                          "on and the next save tries again.", position.step, self.directory,
                          first_line(error))
            return False
        return True

    def restore(self, template: PyTree) -> tuple[PyTree, Position]:
        """The newest intact checkpoint's (state, position); `template` gives structure and
        placement. A checkpoint that fails to restore (damaged, half-deleted) is reported in
        one line and skipped for the one before it.

        Raises InputError when the checkpoint was made with different settings, or when no
        checkpoint in the directory can be restored.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        for step in steps:
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                self._refuse_other_settings(meta["settings"])
                return self._restore_state(step, template), Position(**meta["position"])
            except InputError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure means "not this one"
                logging.warning("The checkpoint of step %d in %s cannot be restored (%s); "
                                "trying the one before it.", step, self.directory,
                                first_line(error))
        raise InputError(
            f"no checkpoint in {self.directory} can be restored (steps {steps} are damaged); "
            "move the directory away to start afresh"
        )

    def _restore_state(self, step: int, template: PyTree) -> PyTree:
        """The state saved at `step`; one saved without the OPTIONAL_STATE entries of a dict
        `template` gets the template's values for them."""
        def restore(tree):
            return self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(tree)))["state"]

        try:
            return restore(template)
        except Exception:
            optional = set(template) & OPTIONAL_STATE if isinstance(template, dict) else set()
            if not optional:
                raise
            required = {name: value for name, value in template.items() if name not in optional}
            state = restore(required)
            logging.info("The checkpoint of step %d has no %s: kept as initialised.", step,
                         ", ".join(sorted(optional)))
            return {**state, **{name: template[name] for name in optional}}

    def _refuse_other_settings(self, saved_settings: dict[str, Any]) -> None:
        differences = settings_differences(saved_settings, self.settings)
        if differences:
            raise InputError(
                f"the checkpoint in {self.directory} is of a run with different settings ("
                + "; ".join(differences[:5])
                + "); use another --checkpoint_dir, or the same flags to resume"
            )

    def close(self) -> None:
        self._manager.close()


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`, for one-line log messages."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
