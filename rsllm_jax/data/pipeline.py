"""The input pipeline: deterministic, resumable, host-sharded batches of one split, and a
thread that prepares the next ones while the devices compute (`Prefetch`).

Plain indexing over the TFDS data source (no TensorFlow, no worker processes): the order of
epoch e is a permutation drawn from (seed, e), global batch s takes positions
[s·B, (s+1)·B) of it, and host p of P reads only its contiguous B/P slice of that batch. The
last batch of an epoch is padded to the fixed shape with `mask == False` rows, so every step
has the same shapes. Train candidates are redrawn per epoch from (seed, epoch, row id). The
whole position is (epoch, step): `get_state()` / `set_state()` restore it exactly, and the
global batches do not depend on the number of hosts.
"""

import contextlib
import queue
import threading

import numpy as np

from rsllm_jax.data import candidates as candidates_lib, storage

IN_MEMORY_MAX_ROWS = 1_000_000


class BatchIterator:
    """Iterates fixed-shape batches of one split of a `PreparedDataset` for this host.

    Each batch is a dict of NumPy arrays with leading dimension `global_batch_size //
    process_count`: history (b, 10), history_len, target, row_id, sequence, candidates (b, 20),
    and mask (b,) — False for the padding rows of an epoch's last batch.
    """

    def __init__(self, dataset, split, global_batch_size, *, seed=0, shuffle=None, num_epochs=None,
                 drop_remainder=False, in_memory=None, with_candidates=True, process_index=None,
                 process_count=None):
        """
        Args:
          dataset: a `storage.PreparedDataset`.
          split: "train", "val", "test" or "world" (storage.SPLITS).
          global_batch_size: rows per step over all hosts; divisible by process_count.
          seed: seeds the epoch permutations and the train candidates.
          shuffle: permute rows each epoch; default: only for the training splits (train,
            world).
          num_epochs: stop after this many epochs; default: 1 for val/test, unbounded for the
            training splits.
          drop_remainder: skip an epoch's last partial batch instead of padding it.
          in_memory: read the whole split once and index arrays (8x faster per row), or read
            only this host's rows of each batch from the data source. Default: in memory for
            splits up to IN_MEMORY_MAX_ROWS rows (LLaRA's datasets have under 100k).
          with_candidates: redraw the train candidates (False leaves the stored -1s, for
            consumers such as the recommenders' training that never look at them).
          process_index, process_count: this host's place; default: jax.process_index/count().
        """
        if process_index is None or process_count is None:
            import jax  # Only for the host's place; the data layer is otherwise JAX-free.
            process_index, process_count = jax.process_index(), jax.process_count()
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"{process_count} processes")
        self._dataset = dataset
        self._split = split
        self._source = dataset.source(split)
        self.num_rows = len(self._source)
        if self.num_rows == 0:
            raise ValueError(f"split {split!r} of {dataset.data_dir} has no rows")
        self.global_batch_size = global_batch_size
        self.host_batch_size = global_batch_size // process_count
        self._host_offset = process_index * self.host_batch_size
        self._seed = seed
        training = split in storage.TRAINING_SPLITS
        self._shuffle = training if shuffle is None else shuffle
        self._num_epochs = (None if training else 1) if num_epochs is None else num_epochs
        self._drop_remainder = drop_remainder
        self._resample_candidates = training and with_candidates
        self._draw_rules = candidates_lib.draw_rules(dataset.catalogue,
                                                     dataset.manifest["settings"])
        if in_memory is None:
            in_memory = self.num_rows <= IN_MEMORY_MAX_ROWS
        self._rows = dataset.read(split) if in_memory else None
        if drop_remainder:
            self.steps_per_epoch = self.num_rows // global_batch_size
        else:
            self.steps_per_epoch = -(-self.num_rows // global_batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"split {split!r} has {self.num_rows} rows, fewer than one batch of "
                             f"{global_batch_size} with drop_remainder")
        self._epoch, self._step = 0, 0
        self._order_epoch, self._order = None, None

    # --- state -------------------------------------------------------------------------------

    def get_state(self):
        """A JSON-serialisable position; restoring it replays exactly the same batches."""
        return dict(split=self._split, epoch=self._epoch, step=self._step, seed=self._seed,
                    global_batch_size=self.global_batch_size, num_rows=self.num_rows,
                    shuffle=self._shuffle, drop_remainder=self._drop_remainder)

    def set_state(self, state):
        """Restores a position from `get_state()`; refuses one made for a different stream."""
        mine = self.get_state()
        for key in ("split", "seed", "global_batch_size", "num_rows", "shuffle", "drop_remainder"):
            if state.get(key) != mine[key]:
                raise ValueError(f"iterator state was saved with {key}={state.get(key)!r} but "
                                 f"this iterator has {key}={mine[key]!r}")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    @property
    def epoch(self):
        return self._epoch

    # --- iteration ---------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self):
        if self._step >= self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        if self._num_epochs is not None and self._epoch >= self._num_epochs:
            raise StopIteration
        batch = self._batch(self._epoch, self._step)
        self._step += 1
        return batch

    def _epoch_order(self, epoch):
        if self._order_epoch != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, epoch]))
            self._order = rng.permutation(self.num_rows) if self._shuffle else np.arange(
                self.num_rows)
            self._order_epoch = epoch
        return self._order

    def _batch(self, epoch, step):
        start = step * self.global_batch_size + self._host_offset
        positions = np.arange(start, start + self.host_batch_size)
        mask = positions < self.num_rows
        # Padding rows repeat the epoch's first row: real values, masked out.
        indices = self._epoch_order(epoch)[np.where(mask, positions, 0)]
        if self._rows is not None:
            batch = {field: column[indices] for field, column in self._rows.items()}
        else:
            batch = self._dataset.read(self._split, indices)
        if self._resample_candidates:
            batch["candidates"] = candidates_lib.candidates_for_rows(
                batch["history"], batch["history_len"], batch["target"], batch["row_id"],
                self._dataset.catalogue.num_items,
                (self._seed, candidates_lib.SPLIT_STREAM[self._split], epoch), **self._draw_rules)
        batch["mask"] = mask
        return batch


class Prefetch:
    """Calls `produce()` in a background thread, up to `depth` results ahead of the consumer,
    so the next batch is read, tokenized and collated while the devices run the current step.

    Results come back in order; an exception raised by `produce` (StopIteration included) is
    raised by `__next__` at the position it happened. `paused()` blocks production (e.g. while
    validation uses the same tokenizer: fast tokenizers must not encode from two threads at
    once). depth 0: `produce` runs on demand in the caller's thread. Close it (or use it as a
    context manager) to stop the thread.
    """

    def __init__(self, produce, depth=2):
        self._produce = produce
        self._depth = depth
        self._busy = threading.Lock()
        if depth > 0:
            self._queue = queue.Queue(maxsize=depth)
            self._closed = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self):
        while not self._closed.is_set():
            with self._busy:
                if self._closed.is_set():
                    return
                try:
                    item = (self._produce(), None)
                except BaseException as error:  # pylint: disable=broad-except  (re-raised)
                    item = (None, error)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None:
                return

    def __iter__(self):
        return self

    def __next__(self):
        if self._depth == 0:
            with self._busy:
                return self._produce()
        item, error = self._queue.get()
        if error is not None:
            raise error
        return item

    @contextlib.contextmanager
    def paused(self):
        """Holds production for the duration of the block."""
        with self._busy:
            yield

    def close(self):
        if self._depth > 0 and not self._closed.is_set():
            self._closed.set()
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
