"""Resuming from the newest orbax checkpoint that restores and holds only finite numbers.

A checkpoint can be damaged after it was written (a disk error, flipped bits, a truncated
file). Resuming from one either fails with an error that names no checkpoint or, worse,
succeeds and trains on NaN. `restore_newest` tries the kept steps newest first; a step that does
not restore, or restores with a NaN or infinite number in it, is moved aside into
`<checkpoints>-damaged/` with a warning naming it, and the next older step is tried.
"""

import math
import os
import shutil

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


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
    folder = os.path.join(os.fspath(manager.directory), str(step))
    if not os.path.isdir(folder) or jax.process_count() > 1:
        manager.delete(step)
        return None
    target = os.fspath(manager.directory).rstrip(os.sep) + "-damaged"
    os.makedirs(target, exist_ok=True)
    destination = os.path.join(target, str(step))
    shutil.rmtree(destination, ignore_errors=True)
    shutil.move(folder, destination)
    manager.reload()
    return destination


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
                    logging.warning("%s: resuming from checkpoint step %d, the newest that "
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
