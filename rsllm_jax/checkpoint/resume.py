"""Resumable training runs: one checkpointer for `rec`, `pretrain` and the stages.

`RunCheckpointer` keeps a run's orbax checkpoints: the train state (arrays, sharded or not),
the input pipeline's position and the run's progress (JSON), restored together, so a killed
run continues with exactly the numbers an uninterrupted one would have produced. It also
turns SIGTERM (preemption) into a save at a step every process agrees on.

A checkpoint can be damaged after it was written (a disk error, flipped bits, a truncated
file). Resuming from one either fails with an error that names no checkpoint or, worse,
succeeds and trains on NaN. `restore_newest` tries the kept steps newest first; a step that does
not restore, or restores with a NaN or infinite number in it, is moved aside into
`<checkpoints>-damaged/` with a warning naming it, and the next older step is tried.
"""

import math
import os
import signal

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rsllm_jax import run_paths


def first_non_finite(tree):
    """The path (a string) of the first floating-point leaf of `tree` holding NaN or ±inf, or
    None. Leaves may be jax or NumPy arrays (sharded ones too) or Python numbers; an orbax
    `Composite` is read as the dict of its items."""
    if hasattr(tree, "keys") and not isinstance(tree, dict):
        tree = {key: tree[key] for key in tree.keys()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, float):
            finite = math.isfinite(leaf)
        elif hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            finite = bool(jnp.isfinite(leaf).all()) if isinstance(leaf, jax.Array) \
                else bool(np.isfinite(leaf).all())
        else:
            continue
        if not finite:
            return jax.tree_util.keystr(path)
    return None


def _move_aside(manager, step):
    """Moves a damaged step out of the manager's folder (kept for inspection)."""
    directory = run_paths.as_path(manager.directory)
    folder = directory / str(step)
    if not folder.is_dir() or jax.process_count() > 1:
        manager.delete(step)
        return None
    target = directory.with_name(directory.name + "-damaged")
    target.mkdir(parents=True, exist_ok=True)
    destination = target / str(step)
    destination.rmtree(missing_ok=True)
    # A rename within one file system; in an object store a copy, then the step is deleted.
    if run_paths.is_url(folder):
        run_paths.copy_tree(folder, destination)
        folder.rmtree()
    else:
        folder.rename(destination)
    manager.reload()
    return os.fspath(destination)


def restore_newest(manager, restore, what):
    """(step, restored) of the newest step of `manager` whose `restore(step)` succeeds with
    only finite numbers; (None, None) when there is none. Damaged newer steps are moved aside,
    so training continues from the good one and saves its own steps again. `what` names the run
    in the warnings."""
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            restored = restore(step)
        except Exception as e:  # pylint: disable=broad-except
            # orbax, tensorstore and json each raise their own types for a damaged file.
            problem = f"does not restore ({type(e).__name__}: {str(e)[:300]})"
        else:
            bad = first_non_finite(restored)
            if bad is None:
                if step != steps[0]:
                    logging.warning(
                        "%s: resuming from checkpoint step %d, the newest that "
                        "restores with finite values", what, step)
                return step, restored
            problem = f"holds NaN or infinite values (first in {bad})"
        moved = _move_aside(manager, step)
        logging.warning("%s: checkpoint step %d in %s %s; %s", what, step, manager.directory,
                        problem, f"moved to {moved}" if moved else "deleted")
    if steps:
        logging.warning("%s: no checkpoint in %s restores; starting from the beginning", what,
                        manager.directory)
    return None, None


class RunCheckpointer:
    """The checkpoints of one resumable run in `directory` (`what` names it in messages).

    Each checkpoint holds `state` (a pytree of arrays), `data` (the input iterator's state,
    JSON; optional) and `progress` (JSON). Use it as a context manager around the training
    loop: on entry SIGTERM is caught; `preempted(step)`, called by every process after each
    step (or epoch), says when to save and stop. On one process that is the first call after
    the signal; on several, JAX's preemption sync manager (started by
    jax.distributed.initialize, it receives the signal itself) and orbax's `reached_preemption`
    make all processes return True at the same step, as MaxText does.
    """

    def __init__(self, directory, what, max_to_keep=2):
        self.what = what
        self.manager = ocp.CheckpointManager(
            run_paths.absolute(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))
        self._signalled = False
        self._previous_handler = None

    @property
    def directory(self):
        return self.manager.directory

    def latest_step(self):
        return self.manager.latest_step()

    def restore(self, abstract_state, with_data=True):
        """(state, data, progress) of the newest good checkpoint (see `restore_newest`), with
        the state placed as `abstract_state` (ShapeDtypeStructs with shardings); (None, None,
        None) when there is none."""
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     progress=ocp.args.JsonRestore())
        if with_data:
            items["data"] = ocp.args.JsonRestore()
        _, restored = restore_newest(
            self.manager, lambda step: self.manager.restore(step, args=ocp.args.Composite(**items)),
            self.what)
        if restored is None:
            return None, None, None
        return restored.state, restored.data if with_data else None, restored.progress

    def save(self, step, state, progress, data=None, force=False):
        """Saves asynchronously (every process takes part); `force` even off the schedule.
        A step saved already is left as it is."""
        if force:
            self.manager.wait_until_finished()
        if step in self.manager.all_steps():
            return
        items = dict(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress))
        if data is not None:
            items["data"] = ocp.args.JsonSave(data)
        self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def preempted(self, step):
        """Whether to save `step` and stop because of SIGTERM (see the class docstring)."""
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return self._signalled

    def stop(self, step):
        """Waits for the save of `step` and ends the process: a rerun resumes from it."""
        self.manager.wait_until_finished()
        raise SystemExit(f"{self.what}: SIGTERM received, saved step {step} in "
                         f"{self.directory}; rerun to resume")

    def __enter__(self):
        # One process: a Python handler sets the flag. Several: the handler JAX's preemption
        # sync manager installed must stay in place.
        if jax.process_count() == 1:
            try:
                self._previous_handler = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # Not the main thread: no handler, SIGTERM just ends the run.
                self._previous_handler = None
        return self

    def _handle(self, signum, frame):
        self._signalled = True

    def __exit__(self, *exc):
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
        self.manager.wait_until_finished()
        self.manager.close()
