"""Image classification data from TensorFlow Datasets (TFDS), held in memory as NumPy arrays.

Any TFDS data set with fixed-size `image` and class `label` features and "train" and "test"
splits works (mnist, cifar10, fashion_mnist, ...). Pixels are scaled to [0, 1) and both sets are
centred by the mean image of the first training batch. On several hosts each loads only its
own shard of both splits.
"""

import dataclasses
import os

import numpy as np

from sam_eos.errors import InputError
from sam_eos.loop import distributed

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class ImageData:
    """Training and test sets: `N` training and `M` test images of shape `[H, W, C]` (this
    process's shard of them on several processes: see `load`)."""

    train_images: np.ndarray  # float32 [N, H, W, C], centred
    train_labels: np.ndarray  # float32 [N, num_classes], one-hot
    test_images: np.ndarray  # float32 [M, H, W, C], centred like the training images
    test_labels: np.ndarray  # int32 [M]
    num_classes: int
    name: str
    train_size: int  # N: training examples over all processes (= len(train_images) on one)
    test_size: int  # M: test examples over all processes


def _import_tfds():
    """Import TensorFlow and TFDS (slow, so only when data is loaded), keeping TF off the GPU."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        tf.config.set_visible_devices([], "GPU")  # JAX owns the accelerator.
    except RuntimeError:  # TensorFlow already initialised its devices.
        pass
    return tfds


def _builder(tfds, dataset: str, data_dir: str | None):
    """The TFDS builder for `dataset`, its features checked and its data prepared on disk."""
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise InputError(
            f"Unknown dataset {dataset!r}: TFDS has no data set of that name "
            "(for example 'mnist' or 'cifar10')."
        ) from None
    except (ValueError, AssertionError) as error:  # A bad config or version in the name.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        reason = reason.partition('": ')[2] or reason  # Drop TFDS's "Failed to construct ...".
        raise InputError(f"Cannot use dataset {dataset!r}: {reason}") from None

    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise InputError(
            f"Dataset {dataset!r} is not an image classification data set: it needs 'image' "
            f"and 'label' features, and has {', '.join(features.keys())}."
        )
    if not isinstance(features["label"], tfds.features.ClassLabel):
        raise InputError(f"Dataset {dataset!r}: its 'label' feature is not a class label.")
    if None in features["image"].shape:
        raise InputError(f"Dataset {dataset!r}: its images are not all of one size.")

    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as error:
            reason = (str(error).splitlines() or [""])[0]
            raise InputError(
                f"The {dataset!r} data is not in {builder.data_dir} and could not be downloaded "
                f"({type(error).__name__}: {reason}). Pass --data_dir or set TFDS_DATA_DIR to a "
                "directory that holds prepared TFDS data (downloading needs network access)."
            ) from error
    splits = builder.info.splits  # Empty only when TFDS does not know them (its test mocks).
    missing = [split for split in SPLITS if splits and split not in splits]
    if missing:
        raise InputError(f"Dataset {dataset!r} has no {' or '.join(missing)} split.")
    return builder


READ_CHUNK = 4096  # examples per tf.data batch while reading a split


def _read_split(tfds, builder, split: str, limit: int | None, shard_index: int,
                num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of `split`: the first `limit` examples (None: all), and of those only
    rows shard_index, shard_index + num_shards, ... (`tf.data.Dataset.shard`), so a process
    holds only its own rows in memory."""
    data = builder.as_dataset(split=split, shuffle_files=False)
    if limit is not None:
        data = data.take(limit)
    if num_shards > 1:
        data = data.shard(num_shards, shard_index)
    data = data.map(lambda example: (example["image"], example["label"])).batch(READ_CHUNK)
    chunks = list(tfds.as_numpy(data))
    if not chunks:
        return np.zeros((0, *builder.info.features["image"].shape), np.uint8), np.zeros(0, int)
    images, labels = zip(*chunks, strict=True)
    return np.concatenate(images), np.concatenate(labels)


def load(
    dataset: str,
    *,
    data_dir: str | None,
    batch_size: int,
    mini_training_set_num_batches: int | None = None,
    mini_test_set_num_batches: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> ImageData:
    """Load a TFDS image data set's train and test splits into memory.

    `data_dir` is where prepared TFDS data lives (None: TFDS's default, `$TFDS_DATA_DIR` or
    `~/tensorflow_datasets`); the data is downloaded there if missing and the network allows.
    The mini set options keep only the first that many batches of `batch_size` examples.

    With several processes (hosts) each keeps only its shard: examples process_index,
    process_index + process_count, ... of each split (each still reads the whole split). The
    arrays then hold this process's rows and `train_size` / `test_size` count all processes'
    (summed with one collective). A minibatch run keeps `train_size // process_count` training
    rows on every process: in batches of `batch_size / process_count` that is the same number of
    whole batches everywhere, and process p's k-th in-order batch is its share of global batch
    k. Every process must call this (the sums are collectives).
    Raises InputError for an unknown data set or data that is missing and cannot be downloaded.
    """
    for flag, value in [
        ("batch_size", batch_size),
        ("mini_training_set_num_batches", mini_training_set_num_batches),
        ("mini_test_set_num_batches", mini_test_set_num_batches),
    ]:
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}.")
    if not 0 <= process_index < process_count:
        raise InputError(f"process {process_index} is not one of 0 .. {process_count - 1}")
    tfds = _import_tfds()
    builder = _builder(tfds, dataset, data_dir)
    # Examples to keep; capped at int64 (tf.data's take), larger than any split anyway.
    cut = lambda num_batches: None if num_batches is None else min(  # noqa: E731
        num_batches * batch_size, 2**63 - 1)
    shard = {"shard_index": process_index, "num_shards": process_count}
    train_images, train_labels = _read_split(
        tfds, builder, "train", cut(mini_training_set_num_batches), **shard
    )
    test_images, test_labels = _read_split(
        tfds, builder, "test", cut(mini_test_set_num_batches), **shard
    )
    train_size, test_size = (int(n) for n in distributed.sum_over_processes(
        np.array([len(train_images), len(test_images)], np.int32)
    ))
    if train_size == 0 or test_size == 0:
        raise InputError(f"Dataset {dataset!r} has an empty train or test split.")
    if process_count > 1 and batch_size < train_size:
        if batch_size % process_count:
            raise InputError(
                f"batch_size {batch_size} does not split evenly over {process_count} processes"
            )
        keep = train_size // process_count  # every process has at least this many
        train_images, train_labels = train_images[:keep], train_labels[:keep]

    num_classes = int(builder.info.features["label"].num_classes)
    train_images = train_images.astype(np.float32) / 256
    test_images = test_images.astype(np.float32) / 256
    # [H, W, C]: the mean image of the first training batch (after the cut), used for both sets.
    # This process holds rows process_index + j * process_count of it.
    first_batch = min(batch_size, train_size)
    mine = len(range(process_index, first_batch, process_count))
    total = distributed.sum_over_processes(train_images[:mine].sum(axis=0, dtype=np.float64))
    mean_image = (total / first_batch).astype(np.float32)
    return ImageData(
        train_images=train_images - mean_image,
        train_labels=np.eye(num_classes, dtype=np.float32)[train_labels],
        test_images=test_images - mean_image,
        test_labels=test_labels.astype(np.int32),
        num_classes=num_classes,
        name=builder.info.name,
        train_size=train_size,
        test_size=test_size,
    )


class Minibatches:
    """Whole minibatches `(images [B, H, W, C], labels [B, C])`, epoch after epoch, forever.

    In order like the original (the tail that does not fill a batch is dropped), or in a new
    seeded permutation each epoch when `shuffle_seed` is given. `take(n)` stacks the next n
    batches; `skip(n)` passes n batches without copying them (a resumed run).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int,
                 shuffle_seed: int | tuple[int, ...] | None = None):
        self._images, self._labels, self._batch_size = images, labels, batch_size
        self._num_batches = len(images) // batch_size
        self._rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
        self._batch = 0  # batches handed out so far
        self._order = self._epoch_order()

    def _epoch_order(self) -> np.ndarray:
        used = self._num_batches * self._batch_size
        if self._rng is None:
            return np.arange(used)
        return self._rng.permutation(len(self._images))[:used]

    def _next_index(self) -> np.ndarray:
        within = self._batch % self._num_batches
        if within == 0 and self._batch > 0:
            self._order = self._epoch_order()
        self._batch += 1
        return self._order[within * self._batch_size:(within + 1) * self._batch_size]

    def __iter__(self) -> "Minibatches":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        index = self._next_index()
        return self._images[index], self._labels[index]

    def take_indices(self, n: int) -> np.ndarray:
        """Rows of the images and labels of the next `n` batches, int32 [n, batch_size]."""
        rows = [self._next_index() for _ in range(n)]
        return np.array(rows, np.int32).reshape(n, self._batch_size)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.stack([self._next_index() for _ in range(n)])
        return self._images[index], self._labels[index]

    def skip(self, n: int) -> None:
        for _ in range(n):
            self._next_index()
