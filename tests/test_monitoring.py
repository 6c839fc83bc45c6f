"""Watching a run: metric files and TensorBoard events, profiler windows, list-valued config
fields, and the prefetching thread of the input pipeline."""

import json
import struct
import threading

import jax
import jax.numpy as jnp
import pytest

from rsllm_jax import config_lists, monitoring
from rsllm_jax.data.pipeline import Prefetch


def _events(folder):
    """(tag, step, value) of every scalar in the TensorBoard event files under `folder`, read
    as TFRecords of Event protos."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length, ) = struct.unpack("<Q", data[offset:offset + 8])
            record = data[offset + 12:offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                out.append((value.tag, event.step, round(value.simple_value, 5)))
    return out


def test_metric_writer_writes_jsonl_and_tensorboard_and_drops_replayed_steps(tmp_path):
    with monitoring.MetricWriter(tmp_path) as writer:
        writer.write(10, dict(total=2.5, parts=dict(nip=2.0), name="skipped"), "train")
        writer.write(20, dict(total=2.0), "train")
        writer.write(30, dict(total=1.5, nan=float("nan")), "train")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/total"]) for r in lines] == [(10, 2.5), (20, 2.0), (30, 1.5)]
    assert lines[0]["train/parts/nip"] == 2.0 and "train/name" not in lines[0]
    assert "train/nan" not in lines[2]  # JSON has no NaN.
    assert ("train/total", 20, 2.0) in _events(tmp_path / "tensorboard")

    # Resumed from a checkpoint at step 20: step 30 will be run again, so its line goes.
    with monitoring.MetricWriter(tmp_path, resume_step=20) as writer:
        writer.write(30, dict(total=1.25), "train")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/total"]) for r in lines] == [(10, 2.5), (20, 2.0), (30, 1.25)]

    # A fresh run of the step starts the curves again.
    with monitoring.MetricWriter(tmp_path) as writer:
        writer.write(5, dict(total=9.0), "train")
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert _events(tmp_path / "tensorboard") == [("train/total", 5, 9.0)]


def test_curve_windows_average_the_written_lines_by_step(tmp_path):
    """benchmarks/curve_windows.py on what MetricWriter wrote: window (0, 20] holds steps 10
    and 20, (20, 40] step 30 (40 has no NIP), (40, 60] step 60; other keys are ignored."""
    from benchmarks import curve_windows

    with monitoring.MetricWriter(tmp_path) as writer:
        for step, nip in ((10, 0.75), (20, 0.65), (30, 0.5), (60, 0.25)):
            writer.write(step, dict(nip=nip), "train")
        writer.write(40, dict(nip=9.0), "val")
    means = curve_windows.window_means(tmp_path / "metrics.jsonl", "train/nip", 20)
    assert means == [(20, pytest.approx(0.7)), (40, 0.5), (60, 0.25)]


def test_profile_steps_parse_and_trace_the_window(tmp_path):
    assert monitoring.parse_profile_steps("") is None
    assert monitoring.parse_profile_steps("4, 6") == (4, 6)
    for bad in ("6,4", "3", "1,2,3", "a,b"):
        with pytest.raises(ValueError, match="config.train.profile_steps"):
            monitoring.parse_profile_steps(bad)
    profiler = monitoring.Profiler((2, 3), str(tmp_path))
    step_fn = jax.jit(lambda x: x * 2.0 + 1.0)
    x = jnp.ones((8, ))
    for step in range(1, 6):
        profiler.before_update(step)
        x = step_fn(x)
        profiler.after_update(step, x)
        assert profiler._active == (step == 2)  # pylint: disable=protected-access
    profiler.close()
    traces = list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_list_valued_config_fields_parse_in_one_way():
    assert config_lists.ints("256, 384,", "f") == (256, 384)
    assert config_lists.ints([1, "2"], "f") == (1, 2) and config_lists.ints(7, "f") == (7, )
    assert config_lists.ints("", "f") == ()
    assert config_lists.names(" q,k , v", "f") == ("q", "k", "v")
    with pytest.raises(ValueError, match=r"config.prompts.length_buckets='256,x'"):
        config_lists.ints("256,x", "config.prompts.length_buckets")


def test_prefetch_keeps_order_raises_in_place_and_pauses():
    produced = []

    def produce():
        if len(produced) == 5:
            raise StopIteration
        produced.append(len(produced))
        return produced[-1]

    with Prefetch(produce, depth=2) as batches:
        assert list(batches) == [0, 1, 2, 3, 4]

    calls = iter(range(3))

    def failing():
        value = next(calls)
        if value == 2:
            raise ValueError("row 7 is malformed")
        return value

    with Prefetch(failing, depth=2) as batches:
        assert next(batches) == 0 and next(batches) == 1
        with pytest.raises(ValueError, match="row 7"):
            next(batches)

    # Paused: the producer does not run while the block holds the pause.
    running = threading.Event()
    count = [0]

    def counting():
        count[0] += 1
        running.set()
        return count[0]

    with Prefetch(counting, depth=1) as batches:
        running.wait(5)
        with batches.paused():
            seen = count[0]
            assert next(batches) == 1
            # Up to one item produced before the pause took hold; none while paused.
            assert count[0] <= seen + 1
            frozen = count[0]
            threading.Event().wait(0.2)
            assert count[0] == frozen
    with Prefetch(produce, depth=0) as batches:  # In the caller's thread.
        produced.clear()
        assert list(batches) == [0, 1, 2, 3, 4]
