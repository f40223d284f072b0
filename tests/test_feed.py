"""Training data on the device: the batches a step gathers are the host stream's, in order,
chunk after chunk and after a resume."""

import jax
import numpy as np
import pytest

from sam_eos.loop import feed
from transformer import dataset


def text(num_lines=300):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question"]
    return "".join(" ".join(rng.choice(words, 6)) + "\n" for _ in range(num_lines))


def stream(seed=3):
    return dataset.TrainBatches(text(), batch_size=4, sequence_length=8, seed=seed)


def first_batches(source, count: int) -> list:
    return [next(source) for _ in range(count)]


def gathered_batches(data: feed.Data, count: int, batches_taken: int = 0) -> list:
    """The first `count` batches a run's steps would use, as the loop selects them."""
    source = feed.make_feed(data, feed.Placement(None), batches_taken)
    select = jax.jit(source.select)
    batches = []
    while len(batches) < count:
        n = min(source.rows_left(), count - len(batches), 3)
        for j in range(n):
            batches.append(jax.device_get(select(source.arrays(), np.int32(source.row() + j))))
        source.advance(n)
    return batches


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_device_data_gives_the_host_streams_batches_across_epochs_and_chunks(monkeypatch):
    monkeypatch.setattr(feed, "MAX_CHUNK_ROWS", 5)  # several chunks
    host = stream()
    count = 2 * host.num_batches_per_epoch + 3  # into the third epoch
    expected = first_batches(stream(), count)
    device = stream()
    data = feed.DeviceData(device.crops, device, dataset.split_crops)
    assert_same_batches(gathered_batches(data, count), expected)


def test_a_resumed_feed_continues_the_same_order():
    expected = first_batches(stream(), 20)[7:]
    resumed = stream()
    data = feed.DeviceData(resumed.crops, resumed, dataset.split_crops)
    assert_same_batches(gathered_batches(data, 13, batches_taken=7), expected)


def test_the_host_path_sends_fixed_size_chunks_of_the_same_batches():
    expected = first_batches(stream(seed=5), 11)
    data = feed.BatchStream(stream(seed=5), chunk_batches=4)
    source = feed.make_feed(data, feed.Placement(None))
    shapes = set()
    for _ in range(3):
        shapes.add(jax.tree.leaves(source.arrays())[0].shape)
        source.advance(source.rows_left())
    assert shapes == {(4, 4, 8)}  # [chunk_batches, batch, sequence]: one compiled shape
    assert_same_batches(gathered_batches(feed.BatchStream(stream(seed=5), chunk_batches=4), 11),
                        expected)


def test_a_finite_host_stream_fills_its_last_chunk_and_then_ends():
    batches = [np.full((2, 3), i, np.float32) for i in range(5)]
    source = feed.make_feed(feed.BatchStream(iter(batches), chunk_batches=4),
                            feed.Placement(None))
    assert source.rows_left() == 4
    source.advance(4)
    assert source.rows_left() == 1
    np.testing.assert_array_equal(source.arrays()[0], batches[4])
    source.advance(1)
    with pytest.raises(StopIteration, match="after 5 batches"):
        source.rows_left()


def test_fits_on_device_compares_with_the_budget():
    assert feed.fits_on_device(1000)
    assert not feed.fits_on_device(10**15)
