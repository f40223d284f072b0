"""Training data for the loop: what goes to the device, when, and how a step finds its batch.

Three kinds of data, each placed so that the compiled step has one shape for the whole run:

- `FullBatch`: one batch at every step; it goes to the device once.
- `DeviceData`: a training set (e.g. token crops, or images and labels) that goes to the device
  once, sharded over the mesh; each step gathers its minibatch there by row indices. The
  indices come from the program's seeded order, `chunk_rows` batches at a time, as one small
  int32 array [chunk_rows, B].
- `BatchStream`: host batches for a training set too large for the device, sent
  `chunk_batches` at a time as one stack [chunk_batches, B, ...].

A `Feed` holds the device arrays and a pure `select(arrays, row) -> batch`; the compiled loop
calls `select` with a traced row, so the number of steps per dispatch never becomes a shape.
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from sam_eos.loop import distributed
from sam_eos.types import PyTree

Select = Callable[[PyTree, jax.Array], PyTree]

# Index rows (batches) per chunk of `DeviceData`, and their most int32 entries (16 MiB).
MAX_CHUNK_ROWS = 1024
MAX_CHUNK_INDICES = 2**22
# A training set larger than this (bytes per device) stays on the host (`fits_on_device`):
# a quarter of the device's memory when JAX reports it, else (CPU) this many bytes.
HOST_DEVICE_DATA_BYTES = 4 * 2**30
DEVICE_MEMORY_FRACTION = 0.25


class BatchOrder(Protocol):
    """A seeded, endless order of minibatches as row indices into a training set."""

    def take_indices(self, n: int) -> np.ndarray:
        """Rows of the next `n` batches: int [n, B_p] (this process's share of each batch)."""

    def skip(self, n: int) -> None:
        """Passes `n` batches (a resumed run)."""


@dataclasses.dataclass(frozen=True)
class FullBatch:
    """One batch used at every step; it goes to the device once and stays there.

    `per_process`: on several processes (hosts), `batch` holds only this process's rows of the
    global batch (`sam_eos.loop.distributed.make_global_batch`); otherwise every process passes the
    whole batch and sends its own rows. The same on a single process.
    """

    batch: PyTree
    per_process: bool = False


@dataclasses.dataclass(frozen=True)
class DeviceData:
    """A training set kept on the device; step t's batch is `to_batch(examples[rows_t])`.

    `examples`: a pytree of host arrays [N, ...]. `order.take_indices(n)` gives rows into it.
    `to_batch`: a pure, jit-able function from gathered examples to the loss's batch (e.g.
    crops [B, L + 1] -> (inputs, targets)). `per_process`: on several processes, `examples`
    holds only this process's rows and `order` indexes them; otherwise every process passes
    the whole set (and `order` gives global rows).
    """

    examples: PyTree
    order: BatchOrder
    to_batch: Callable[[PyTree], PyTree] = lambda examples: examples
    per_process: bool = False


@dataclasses.dataclass(frozen=True)
class BatchStream:
    """A never-ending iterator of host batches (pytrees of numpy arrays), one per step.

    For a training set too large for the device. Optional methods of the iterator make it
    faster: `take(n)` returns the next n batches stacked along a new leading axis, `skip(n)`
    passes n batches (when a run resumes). `per_process` as for `FullBatch`. The loop sends
    `chunk_batches` batches at a time (a fixed shape: one compile).
    """

    batches: Iterator[PyTree]
    per_process: bool = False
    chunk_batches: int = 32

    def take_up_to(self, n: int) -> tuple[PyTree, int]:
        """The next `n` batches stacked [n, B, ...], and how many the iterator had: the rows
        past its end (if it ends) are zeros, never used."""
        if hasattr(self.batches, "take"):
            return self.batches.take(n), n
        batches = []
        for batch in self.batches:
            batches.append(batch)
            if len(batches) == n:
                break
        if not batches:
            return None, 0
        zeros = jax.tree.map(np.zeros_like, batches[0])
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches,
                               *[zeros] * (n - len(batches)))
        return stacked, len(batches)

    def skip(self, n: int) -> None:
        if hasattr(self.batches, "skip"):
            self.batches.skip(n)
        else:
            for _ in range(n):
                next(self.batches)


Data = FullBatch | DeviceData | BatchStream


def fits_on_device(num_bytes: int, num_devices: int = 1) -> bool:
    """Whether a training set of `num_bytes`, split over `num_devices`, should live on the
    device: at most a quarter of one device's memory (`HOST_DEVICE_DATA_BYTES` when JAX does
    not say, as on CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    budget = DEVICE_MEMORY_FRACTION * limit if limit else HOST_DEVICE_DATA_BYTES
    return num_bytes / max(num_devices, 1) <= budget


class Placement:
    """Where arrays go: the default device, or sharded over a mesh (data parallel)."""

    def __init__(self, mesh: jax.sharding.Mesh | None):
        self.mesh = mesh

    def batch(self, batch: PyTree, stacked: bool = False, per_process: bool = False) -> PyTree:
        """`batch` split along its batch axis (1 when `stacked`) over the mesh."""
        if self.mesh is None:
            return jax.device_put(batch)
        if per_process:
            return distributed.make_global_batch(batch, self.mesh, stacked=stacked)
        return distributed.put_batch(batch, self.mesh, stacked=stacked)

    def replicated(self, tree: PyTree) -> PyTree:
        return tree if self.mesh is None else distributed.put_replicated(tree, self.mesh)

    def local_devices(self) -> int:
        """This process's devices in the mesh (1 without one)."""
        if self.mesh is None:
            return 1
        return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)


def _pad_rows(tree: PyTree, multiple: int) -> PyTree:
    """Zero rows appended so axis 0 is a multiple of `multiple` (they are never gathered)."""
    def pad(x):
        extra = -len(x) % multiple
        return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]) if extra else x
    return jax.tree.map(pad, tree)


class Feed:
    """The device arrays of one kind of data and how a step selects its batch from them.

    `arrays()` are the current device arrays, `select(arrays, row)` (pure, traced) the batch of
    row `row` of the current chunk. `rows_left()` batches remain in the chunk (None: no
    limit); `advance(n)` consumes n of them; `batches_taken` counts consumed batches (what a
    resumed run skips).
    """

    select: Select
    chunk_rows: int | None = None  # rows per chunk (None: one batch, no chunks)

    def __init__(self, batches_taken: int = 0):
        self.batches_taken = batches_taken

    def arrays(self) -> PyTree:
        raise NotImplementedError

    def row(self) -> int:
        return 0

    def rows_left(self) -> int | None:
        return None

    def advance(self, n: int) -> None:
        del n


class FullBatchFeed(Feed):
    def __init__(self, data: FullBatch, place: Placement):
        super().__init__()
        self._batch = place.batch(data.batch, per_process=data.per_process)

    @staticmethod
    def select(arrays: PyTree, row: jax.Array) -> PyTree:
        del row
        return arrays

    def arrays(self) -> PyTree:
        return self._batch


class _ChunkedFeed(Feed):
    """Batches in fixed-size chunks of `chunk_rows` rows; a new chunk when one is used up."""

    def __init__(self, chunk_rows: int, batches_taken: int):
        super().__init__(batches_taken)
        self.chunk_rows = chunk_rows
        self._offset = self._filled = 0  # rows used, rows that hold batches
        self._chunk = None

    def _next_chunk(self) -> tuple[PyTree, int]:
        """The next chunk's device arrays and how many of its rows hold batches."""
        raise NotImplementedError

    def _ensure_chunk(self) -> None:
        if self._offset == self._filled:
            self._chunk, self._filled = self._next_chunk()
            self._offset = 0
            if self._filled == 0:
                raise StopIteration(f"the training data ended after {self.batches_taken} "
                                    "batches")

    def row(self) -> int:
        self._ensure_chunk()
        return self._offset

    def rows_left(self) -> int:
        self._ensure_chunk()
        return self._filled - self._offset

    def advance(self, n: int) -> None:
        self._offset += n
        self.batches_taken += n


class DeviceDataFeed(_ChunkedFeed):
    """`DeviceData`: the examples on the device once; index chunks [chunk_rows, B]."""

    def __init__(self, data: DeviceData, place: Placement, batches_taken: int = 0):
        self._data, self._place = data, place
        examples = data.examples
        self._to_global = None
        if place.mesh is not None:
            examples = _pad_rows(examples, place.local_devices() if data.per_process
                                 else place.mesh.size)
            if data.per_process:  # local row r is global row to_global[r]
                local_rows = len(jax.tree.leaves(examples)[0])
                self._to_global = distributed.process_rows(
                    local_rows * jax.process_count(), place.mesh)
        self._examples = place.batch(examples, per_process=data.per_process)
        data.order.skip(batches_taken)
        batch_size = np.shape(data.order.take_indices(0))[1] * jax.process_count()
        super().__init__(int(np.clip(MAX_CHUNK_INDICES // batch_size, 1, MAX_CHUNK_ROWS)),
                         batches_taken)

    def _next_chunk(self) -> PyTree:
        rows = np.asarray(self._data.order.take_indices(self.chunk_rows))
        if self._to_global is not None:
            rows = self._to_global[rows]
        multi = self._place.mesh is not None and jax.process_count() > 1
        return self._place.batch(rows.astype(np.int32), stacked=True,
                                 per_process=multi), self.chunk_rows

    def select(self, arrays: PyTree, row: jax.Array) -> PyTree:
        examples, rows = arrays
        picked = jax.lax.dynamic_index_in_dim(rows, row, keepdims=False)
        return self._data.to_batch(
            jax.tree.map(lambda x: jnp.take(x, picked, axis=0, mode="clip"), examples))

    def arrays(self) -> PyTree:
        self._ensure_chunk()
        return self._examples, self._chunk


class StreamFeed(_ChunkedFeed):
    """`BatchStream`: host batches sent `chunk_batches` at a time."""

    def __init__(self, data: BatchStream, place: Placement, batches_taken: int = 0):
        super().__init__(data.chunk_batches, batches_taken)
        self._data, self._place = data, place
        data.skip(batches_taken)

    def _next_chunk(self) -> tuple[PyTree, int]:
        batches, count = self._data.take_up_to(self.chunk_rows)
        if count == 0:
            return None, 0
        return self._place.batch(batches, stacked=True,
                                 per_process=self._data.per_process), count

    @staticmethod
    def select(arrays: PyTree, row: jax.Array) -> PyTree:
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, row, keepdims=False),
                            arrays)

    def arrays(self) -> PyTree:
        self._ensure_chunk()
        return self._chunk


def make_feed(data: Data, place: Placement, batches_taken: int = 0) -> Feed:
    """The feed for `data`, `batches_taken` batches into its order (a resumed run)."""
    if isinstance(data, FullBatch):
        return FullBatchFeed(data, place)
    if isinstance(data, DeviceData):
        return DeviceDataFeed(data, place, batches_taken)
    return StreamFeed(data, place, batches_taken)
