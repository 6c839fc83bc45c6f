"""Resuming from the newest checkpoint that restores with finite numbers; SIGTERM saves."""

import os
import signal

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rsllm_jax.checkpoint.resume import RunCheckpointer, first_non_finite, restore_newest


def _manager(path):
    return ocp.CheckpointManager(str(path),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True))


def _save(manager, step, weights):
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave({"w": weights}),
                                progress=ocp.args.JsonSave({"step": step, "loss": 1.0 / step})))
    manager.wait_until_finished()


def _restore(manager):
    return lambda step: manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore({"w": jnp.zeros(4)}), progress=
                                      ocp.args.JsonRestore()))


def test_falls_back_past_damaged_steps_and_moves_them_aside(tmp_path):
    manager = _manager(tmp_path / "checkpoints")
    _save(manager, 1, jnp.ones(4))
    _save(manager, 2, jnp.array([1.0, np.nan, 1.0, 1.0]))
    _save(manager, 3, jnp.ones(4) * 3)
    progress = tmp_path / "checkpoints" / "3" / "progress" / "metadata"
    progress.write_bytes(progress.read_bytes()[:10])  # A truncated JSON.
    step, restored = restore_newest(manager, _restore(manager), "test")
    assert step == 1 and restored.progress == {"step": 1, "loss": 1.0}
    np.testing.assert_array_equal(restored.state["w"], np.ones(4))
    assert sorted(p.name for p in (tmp_path / "checkpoints-damaged").iterdir()) == ["2", "3"]
    assert manager.all_steps() == [1]
    _save(manager, 2, jnp.ones(4) * 2)  # Training goes on and saves its own step 2 again.
    assert restore_newest(manager, _restore(manager), "test")[0] == 2


def test_nothing_restores(tmp_path):
    manager = _manager(tmp_path / "checkpoints")
    _save(manager, 1, jnp.full(4, np.inf))
    assert restore_newest(manager, _restore(manager), "test") == (None, None)
    assert restore_newest(_manager(tmp_path / "empty"), None, "test") == (None, None)


def test_first_non_finite_names_the_leaf():
    tree = {"a": np.zeros(2), "b": {"c": jnp.array([0.0, -np.inf])}, "n": 3, "x": float("nan")}
    assert first_non_finite(tree) == "['b']['c']"
    assert first_non_finite({"ok": jnp.arange(3), "f": 0.5}) is None


def test_sigterm_saves_the_step_and_a_rerun_resumes_it(tmp_path):
    """The run loop's preemption: SIGTERM sets the flag, the step is saved even off the save
    schedule (every 2 steps here), the run exits naming it; a new checkpointer restores state,
    data and progress."""
    directory = tmp_path / "checkpoints"
    state, handler = {"w": jnp.zeros(4)}, signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match=r"run: SIGTERM received, saved step 3"):
        with RunCheckpointer(directory, "run") as checkpoints:
            for step in range(1, 10):
                state = {"w": state["w"] + 1.0}
                if step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)  # Arrives during step 3.
                if step % 2 == 0:
                    checkpoints.save(step, state, {"step": step}, data={"position": step})
                if checkpoints.preempted(step):
                    checkpoints.save(step, state, {"step": step}, data={"position": step},
                                     force=True)
                    checkpoints.stop(step)
    assert signal.getsignal(signal.SIGTERM) is handler  # The previous handler is back.
    with RunCheckpointer(directory, "run") as checkpoints:
        assert checkpoints.manager.all_steps() == [2, 3]
        restored, data, progress = checkpoints.restore({"w": jnp.zeros(4)})
        assert not checkpoints.preempted(4)
    np.testing.assert_array_equal(restored["w"], np.full(4, 3.0))
    assert progress == {"step": 3} and data == {"position": 3}
