"""ASCII corpus loading, train/test split and batching for the character-level language model.

Pure numpy (no TensorFlow). Characters are their ASCII codes (0..127); code 0 (NUL) is reserved
as the pad token, so a corpus may not contain it. Training examples are non-overlapping crops of
`sequence_length + 1` characters: the model reads `crop[:-1]` and predicts `crop[1:]`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from sam_eos.errors import InputError

VOCAB_SIZE = 128
PAD_TOKEN = 0


def _position(buffer: np.ndarray, offset: int) -> str:
    """Describes byte `offset` of `buffer` (uint8) as 'byte offset N (line L, column C)', 1-based
    line and column, lines separated by '\\n'."""
    before = buffer[:offset]
    newlines = np.flatnonzero(before == ord("\n"))
    line = len(newlines) + 1
    column = offset - (int(newlines[-1]) + 1 if len(newlines) else 0) + 1
    return f"byte offset {offset} (line {line}, column {column})"


def read_ascii_text(path: str) -> str:
    """Reads an ASCII corpus file and returns its text.

    Raises InputError (naming the file) if it is missing, a directory or unreadable, if it holds
    a NUL byte (reserved for padding) or a byte >= 128 (not ASCII); the message gives the first
    offending byte's offset, line and column.
    """
    if os.path.isdir(path):
        raise InputError(f"Corpus file {path!r} is a directory, not a text file.")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"Corpus file {path!r} does not exist.") from None
    except OSError as e:
        raise InputError(f"Cannot read corpus file {path!r}: {e.strerror or e}.") from None
    buffer = np.frombuffer(data, dtype=np.uint8)
    bad = np.flatnonzero((buffer == PAD_TOKEN) | (buffer >= VOCAB_SIZE))
    if len(bad):
        offset = int(bad[0])
        where = _position(buffer, offset)
        if buffer[offset] == PAD_TOKEN:
            raise InputError(
                f"Corpus file {path!r} contains a NUL byte at {where}; NUL (code 0) is reserved "
                "for padding. Remove it from the corpus."
            )
        raise InputError(
            f"Corpus file {path!r} contains a non-ASCII byte 0x{int(buffer[offset]):02x} at "
            f"{where}; the model's vocabulary is the {VOCAB_SIZE} ASCII codes. Convert the "
            "corpus to plain ASCII."
        )
    return data.decode("ascii")


def _lines(text: str) -> list[str]:
    """Splits `text` on '\\n' only, keeping the line endings (a final line without '\\n' counts)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def split_corpus(text: str, test_lines: int = 10000) -> tuple[str, str]:
    """Splits a corpus as in the paper: the last `test_lines` lines are the test set, the rest
    the training set. Line endings are kept, so `train + test == text`."""
    if test_lines < 1:
        raise InputError(f"--test_lines must be at least 1, got {test_lines}.")
    lines = _lines(text)
    if len(lines) <= test_lines:
        raise InputError(
            f"The corpus has only {len(lines)} lines, but the last {test_lines} lines are held "
            "out for testing and at least one must remain for training. Lower --test_lines or "
            "use a longer corpus."
        )
    return "".join(lines[:-test_lines]), "".join(lines[-test_lines:])


def encode(text: str) -> np.ndarray:
    """ASCII codes of `text`: int32 [len(text)]."""
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError as e:
        raise InputError(f"Text is not ASCII at character {e.start}.") from None
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def _check_sizes(*, sequence_length: int, batch_size: int | None = None) -> None:
    if sequence_length < 1:
        raise InputError(f"--sequence_length must be at least 1, got {sequence_length}.")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {batch_size}.")


def make_crops(text: str, sequence_length: int) -> np.ndarray:
    """Non-overlapping crops of `sequence_length + 1` characters, in corpus order; the incomplete
    tail is dropped. int32 [num_crops, sequence_length + 1]."""
    _check_sizes(sequence_length=sequence_length)
    codes = encode(text)
    width = sequence_length + 1
    num_crops = len(codes) // width
    return codes[: num_crops * width].reshape(num_crops, width)


def split_crops(crops):
    """(inputs, targets) = (crops[..., :-1], crops[..., 1:]) of numpy or jax crops
    [..., sequence_length + 1]; jit-able (the training loop gathers crops on the device)."""
    return crops[..., :-1], crops[..., 1:]


def _split(crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) = (crops[..., :-1], crops[..., 1:]) as contiguous int32 arrays."""
    return np.ascontiguousarray(crops[..., :-1]), np.ascontiguousarray(crops[..., 1:])


def _shuffle_buffer_order(num_items: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Order in which items 0..num_items-1, streamed in order through a shuffle buffer of
    `buffer_size` (tf.data style), come out: fill the buffer, then repeatedly emit a uniformly
    random buffered item and put the next streamed item in its slot; once the stream is spent,
    drain the buffer in random order. Returns int64 [num_items], a permutation."""
    size = min(buffer_size, num_items)
    buffer = list(range(size))
    uniforms = rng.random(num_items).tolist()
    order = [0] * num_items
    next_item = size
    for t in range(num_items):
        j = int(uniforms[t] * size)
        order[t] = buffer[j]
        if next_item < num_items:
            buffer[j] = next_item
            next_item += 1
        else:
            size -= 1
            buffer[j] = buffer[size]
    return np.asarray(order, dtype=np.int64)


class TrainBatches:
    """Endless stream of shuffled training batches `(inputs, targets)`, int32 [batch_size,
    sequence_length] each, `targets` being `inputs` shifted left by one character.

    Each epoch streams the usable crops (the first `num_batches_per_epoch * batch_size` of
    `make_crops(text, sequence_length)`, so every batch is whole) in corpus order through a
    shuffle buffer of `shuffle_buffer_batches * batch_size` crops, and batches the result. The
    buffer drains at the end of each epoch, so every usable crop appears exactly once per epoch.
    The stream is a function of `seed` alone. The per-epoch order is computed on crop indices, so
    yielding a batch is just one gather. `rows` (e.g. `sam_eos.loop.distributed.process_rows`) keeps
    only those rows of every batch: a process's share of the same global stream.
    """

    def __init__(
        self,
        text: str,
        *,
        batch_size: int,
        sequence_length: int,
        seed: int,
        shuffle_buffer_batches: int = 10,
        rows: np.ndarray | None = None,
    ) -> None:
        _check_sizes(sequence_length=sequence_length, batch_size=batch_size)
        if shuffle_buffer_batches < 1:
            raise InputError(
                f"shuffle_buffer_batches must be at least 1, got {shuffle_buffer_batches}."
            )
        crops = make_crops(text, sequence_length)
        self._num_batches_per_epoch = len(crops) // batch_size
        if self._num_batches_per_epoch == 0:
            raise InputError(
                f"The training text ({len(text)} characters, {len(crops)} crops of "
                f"{sequence_length + 1} characters) does not fill one batch of {batch_size}. "
                "Lower --batch_size or --sequence_length, or use a longer corpus."
            )
        self._batch_size = batch_size
        self._sequence_length = sequence_length
        self._crops = crops[: self._num_batches_per_epoch * batch_size]
        self._buffer_size = shuffle_buffer_batches * batch_size
        self._rng = np.random.default_rng(seed)
        self._rows = np.arange(batch_size) if rows is None else np.asarray(rows)
        if self._rows.ndim != 1 or not np.all((0 <= self._rows) & (self._rows < batch_size)):
            raise InputError(f"rows must be indices below the batch size {batch_size}")
        self._order = np.zeros((0,), dtype=np.int64)  # crop indices not yet emitted
        self._position = 0

    @property
    def num_batches_per_epoch(self) -> int:
        """Whole batches in one pass over the training crops."""
        return self._num_batches_per_epoch

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def sequence_length(self) -> int:
        return self._sequence_length

    def _next_indices(self, count: int) -> np.ndarray:
        """The next `count` crop indices of the stream, starting new epochs as needed."""
        pieces = [np.zeros((0,), dtype=np.int64)]
        while count > 0:
            if self._position == len(self._order):
                self._order = _shuffle_buffer_order(len(self._crops), self._buffer_size, self._rng)
                self._position = 0
            piece = self._order[self._position : self._position + count]
            self._position += len(piece)
            count -= len(piece)
            pieces.append(piece)
        return pieces[-1] if len(pieces) <= 2 else np.concatenate(pieces)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch: (inputs, targets), int32 [batch_size, sequence_length] each (only
        `rows` of it when given)."""
        return _split(self._crops[self._next_indices(self._batch_size)[self._rows]])

    def skip(self, n: int) -> None:
        """Passes the next `n` batches without building them (a resumed run)."""
        self._next_indices(n * self._batch_size)

    @property
    def crops(self) -> np.ndarray:
        """The usable training crops, int32 [num_batches_per_epoch * batch_size,
        sequence_length + 1]: what `take_indices` indexes."""
        return self._crops

    def take_indices(self, n: int) -> np.ndarray:
        """Rows of `crops` of the next `n` batches, int32 [n, len(rows)]: the same batches
        `take(n)` gives, as `split_crops(crops[indices])`."""
        if n < 0:
            raise ValueError(f"take_indices(n) needs n >= 0, got {n}.")
        indices = self._next_indices(n * self._batch_size).reshape(n, self._batch_size)
        return indices[:, self._rows].astype(np.int32)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `n` batches stacked: (inputs, targets), int32 [n, batch_size,
        sequence_length] each; the same data `n` calls of `next` would give."""
        if n < 0:
            raise ValueError(f"take(n) needs n >= 0, got {n}.")
        indices = self._next_indices(n * self._batch_size).reshape(n, self._batch_size)
        return _split(self._crops[indices[:, self._rows]])


def test_batches(
    text: str, *, batch_size: int, sequence_length: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The test crops in order, each used once, as (inputs, targets) batches of int32
    [batch_size, sequence_length]; the last batch keeps the leftover crops (it may be smaller)."""
    _check_sizes(sequence_length=sequence_length, batch_size=batch_size)
    crops = make_crops(text, sequence_length)
    if len(crops) == 0:
        raise InputError(
            f"The test text ({len(text)} characters) is shorter than one crop of "
            f"{sequence_length + 1} characters. Lower --sequence_length or raise --test_lines."
        )
    return [_split(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)]


# Not a pytest test, despite the name.
test_batches.__test__ = False  # type: ignore[attr-defined]


def check_enough_batches(
    text: str,
    *,
    batch_size: int,
    sequence_length: int,
    path_or_name: str,
    minimum_batches: int = 4,
) -> None:
    """Raises InputError, before any training, if `text` yields fewer than `minimum_batches`
    whole batches of `batch_size` crops of `sequence_length + 1` characters, or if a size is < 1."""
    _check_sizes(sequence_length=sequence_length, batch_size=batch_size)
    width = sequence_length + 1
    num_crops = len(text) // width
    num_batches = num_crops // batch_size
    if num_batches < minimum_batches:
        needed = minimum_batches * batch_size * width
        raise InputError(
            f"{path_or_name}: {len(text)} characters yield {num_batches} whole batches "
            f"({num_crops} crops of {width} characters, {batch_size} crops per batch), but at "
            f"least {minimum_batches} batches ({needed} characters) are needed. Lower "
            "--batch_size or --sequence_length, or use a longer corpus."
        )


def fixed_hessian_batch(
    text: str, *, num_sequences: int, sequence_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded sample (without replacement) of `num_sequences` crops of `text`, so the
    Hessian is measured on the same data at every check: (inputs, targets), int32
    [num_sequences, sequence_length] each."""
    crops = make_crops(text, sequence_length)
    if num_sequences < 1:
        raise InputError(f"The Hessian batch needs at least 1 sequence, got {num_sequences}.")
    if num_sequences > len(crops):
        raise InputError(
            f"The Hessian batch needs {num_sequences} sequences, but the training text has only "
            f"{len(crops)} crops of {sequence_length + 1} characters. Use fewer Hessian "
            "sequences, a shorter --sequence_length, or a longer corpus."
        )
    indices = np.random.default_rng(seed).choice(len(crops), size=num_sequences, replace=False)
    return _split(crops[indices])
