"""Loading TFDS image data: the real `load` code on mocked TFDS data, errors, and the stand-in."""

import pathlib

import numpy as np
import pytest

from image_classification import dataset
from sam_eos.errors import InputError
from tests.tfds_mock import write_mock_metadata

tfds = pytest.importorskip("tensorflow_datasets")

SHARED_TFDS_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tfds"


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory) -> str:
    """Mocked TFDS metadata for mnist and cifar10 (see tests/tfds_mock.py)."""
    return write_mock_metadata(tmp_path_factory.mktemp("tfds_metadata"))


def _mock_load(metadata_dir: str, name: str, num_examples: int, **kwargs):
    """`dataset.load` and the raw TFDS arrays, both reading `num_examples` mocked examples."""
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=metadata_dir):
        data = dataset.load(name, data_dir="/nonexistent", **kwargs)
        raw = tfds.as_numpy(tfds.load(name, split="train", batch_size=-1))
    return data, raw["image"], raw["label"]


def test_mnist_whole_splits(metadata_dir):
    data, raw_images, raw_labels = _mock_load(metadata_dir, "mnist", 37, batch_size=8)
    assert data.name == "mnist" and data.num_classes == 10
    assert data.train_images.shape == (37, 28, 28, 1)  # the data's size, not the declared 1000
    assert data.test_images.shape == (37, 28, 28, 1)
    assert data.train_labels.shape == (37, 10) and data.test_labels.shape == (37,)
    assert data.train_images.dtype == np.float32 and data.test_images.dtype == np.float32
    assert data.train_labels.dtype == np.float32 and data.test_labels.dtype == np.int32

    # Pixels / 256, centred by the mean of the first 8 training images.
    pixels = raw_images.astype(np.float64) / 256
    expected = pixels - pixels[:8].mean(axis=0)
    np.testing.assert_allclose(data.train_images, expected, atol=1e-6)
    np.testing.assert_allclose(data.train_images[:8].mean(axis=0), 0, atol=1e-6)
    assert not np.allclose(data.train_images.mean(axis=0), 0, atol=1e-3)  # only the first batch
    uncentred = data.train_images + (pixels[:8].mean(axis=0))
    assert uncentred.min() >= -1e-6 and uncentred.max() <= 255 / 256 + 1e-6
    # The mock's test split holds the same examples, so the test set is centred by the same mean.
    np.testing.assert_array_equal(data.test_images, data.train_images)

    np.testing.assert_array_equal(data.train_labels.sum(axis=1), 1)
    assert set(np.unique(data.train_labels)) == {0.0, 1.0}
    np.testing.assert_array_equal(data.train_labels.argmax(axis=1), raw_labels)
    np.testing.assert_array_equal(data.test_labels, raw_labels)


def test_cifar10_mini_sets(metadata_dir):
    data, raw_images, raw_labels = _mock_load(
        metadata_dir,
        "cifar10",
        50,
        batch_size=8,
        mini_training_set_num_batches=3,
        mini_test_set_num_batches=2,
    )
    assert data.name == "cifar10" and data.num_classes == 10
    assert data.train_images.shape == (24, 32, 32, 3) and data.train_labels.shape == (24, 10)
    assert data.test_images.shape == (16, 32, 32, 3) and data.test_labels.shape == (16,)
    np.testing.assert_allclose(data.train_images[:8].mean(axis=0), 0, atol=1e-6)
    pixels = raw_images.astype(np.float64) / 256
    np.testing.assert_allclose(data.train_images, pixels[:24] - pixels[:8].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(data.test_images, data.train_images[:16], atol=1e-6)
    np.testing.assert_array_equal(data.train_labels.argmax(axis=1), raw_labels[:24])
    np.testing.assert_array_equal(data.test_labels, raw_labels[:16])


def test_cut_larger_than_the_split_keeps_it_whole(metadata_dir):
    data, raw_images, _ = _mock_load(
        metadata_dir,
        "mnist",
        5,
        batch_size=8,
        mini_training_set_num_batches=3,
        mini_test_set_num_batches=1,
    )
    assert len(data.train_images) == 5 and len(data.test_images) == 5
    # The first batch is all 5 examples, so the whole training set is centred.
    np.testing.assert_allclose(data.train_images.mean(axis=0), 0, atol=1e-6)
    pixels = raw_images.astype(np.float64) / 256
    np.testing.assert_allclose(data.train_images, pixels - pixels.mean(axis=0), atol=1e-6)


def test_missing_data_that_cannot_be_downloaded(tmp_path, monkeypatch):
    def no_network(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_network)
    with pytest.raises(InputError) as error:
        dataset.load("mnist", data_dir=str(tmp_path), batch_size=8)
    message = str(error.value)
    for part in ["'mnist'", str(tmp_path), "--data_dir", "TFDS_DATA_DIR", "no network"]:
        assert part in message
    assert isinstance(error.value.__cause__, OSError)


def test_unknown_dataset(tmp_path):
    with pytest.raises(InputError, match="Unknown dataset 'no_such_dataset_xyz'"):
        dataset.load("no_such_dataset_xyz", data_dir=str(tmp_path), batch_size=8)


def test_dataset_without_images_is_refused_before_any_download(tmp_path, monkeypatch):
    def must_not_download(self, *args, **kwargs):
        pytest.fail("load tried to download a data set it cannot use")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_download)
    with pytest.raises(InputError, match="'image' and 'label' features"):
        dataset.load("imdb_reviews", data_dir=str(tmp_path), batch_size=8)


@pytest.mark.parametrize(
    "kwargs", [dict(batch_size=0), dict(batch_size=8, mini_training_set_num_batches=0)]
)
def test_bad_sizes(kwargs):
    with pytest.raises(InputError, match="must be at least 1"):
        dataset.load("mnist", data_dir=None, **kwargs)


def test_each_process_reads_every_process_count_th_example(metadata_dir):
    """Shards of a split (one per process) interleave: together, the whole split once."""
    with tfds.testing.mock_data(num_examples=11, data_dir=metadata_dir):
        builder = dataset._builder(dataset._import_tfds(), "mnist", "/nonexistent")
        whole = dataset._read_split(tfds, builder, "train", None, 0, 1)
        shards = [dataset._read_split(tfds, builder, "train", None, i, 3) for i in range(3)]
        cut = dataset._read_split(tfds, builder, "train", 7, 1, 3)
    assert [len(images) for images, _ in shards] == [4, 4, 3]
    for index, (images, labels) in enumerate(shards):
        np.testing.assert_array_equal(images, whole[0][index::3])
        np.testing.assert_array_equal(labels, whole[1][index::3])
    np.testing.assert_array_equal(cut[0], whole[0][:7][1::3])  # the first 7, then shard 1


def test_a_process_outside_the_count_is_refused():
    with pytest.raises(InputError, match="process 2 is not one of 0 .. 1"):
        dataset.load("mnist", data_dir=None, batch_size=8, process_index=2, process_count=2)


def test_shared_mnist_stand_in():
    if not (SHARED_TFDS_DIR / "mnist").is_dir():
        pytest.skip(f"no TFDS MNIST stand-in at {SHARED_TFDS_DIR}")
    data = dataset.load("mnist", data_dir=str(SHARED_TFDS_DIR), batch_size=100)
    assert data.num_classes == 10 and data.name == "mnist"
    assert data.train_images.shape == (8000, 28, 28, 1) and data.train_labels.shape == (8000, 10)
    assert data.test_images.shape == (2000, 28, 28, 1) and data.test_labels.shape == (2000,)
    assert data.train_size == 8000 and data.test_size == 2000
    np.testing.assert_allclose(data.train_images[:100].mean(axis=0), 0, atol=1e-5)
    assert set(np.unique(data.test_labels)) == set(range(10))
    np.testing.assert_array_equal(np.bincount(data.train_labels.argmax(axis=1)) > 500, True)


def _write_idx(path: pathlib.Path, header: bytes, payload: np.ndarray) -> str:
    path.write_bytes(header + payload.astype(np.uint8).tobytes())
    return str(path)


def test_download_and_prepare_path_works_offline(tmp_path, monkeypatch):
    """TFDS's own download-and-prepare path (as on a fresh machine with network access), with
    only the network replaced: its downloader hands back local IDX files. This imports every
    module that path needs (it failed with `No module named 'importlib_resources'` before
    that package was in requirements.txt)."""
    mnist_module = pytest.importorskip("tensorflow_datasets.image_classification.mnist")
    rng = np.random.default_rng(0)
    sizes = {"train": 12, "test": 6}
    images = {s: rng.integers(0, 256, (n, 28, 28, 1)) for s, n in sizes.items()}
    labels = {s: rng.integers(0, 10, n) for s, n in sizes.items()}
    files = {}
    for split in sizes:
        files[f"{split}_data"] = _write_idx(tmp_path / f"{split}-images", bytes(16), images[split])
        files[f"{split}_labels"] = _write_idx(tmp_path / f"{split}-labels", bytes(8), labels[split])
    requested = []

    def local_download(self, url_or_urls):
        requested.append(url_or_urls)
        return {name: files[name] for name in url_or_urls}

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", local_download)
    monkeypatch.setattr(mnist_module, "_TRAIN_EXAMPLES", sizes["train"])
    monkeypatch.setattr(mnist_module, "_TEST_EXAMPLES", sizes["test"])
    data_dir = tmp_path / "tfds"
    data = dataset.load("mnist", data_dir=str(data_dir), batch_size=4)
    assert len(requested) == 1 and set(requested[0]) == set(files)
    assert data.train_size == sizes["train"] and data.test_size == sizes["test"]
    # The prepared data holds exactly the downloaded examples (TFDS may reorder them; the loader
    # scales by 1/256 and subtracts one mean image, which shifts every image's sum equally).
    for split, got_images, got_labels in [
        ("train", data.train_images, np.argmax(data.train_labels, axis=1)),  # one-hot
        ("test", data.test_images, data.test_labels),
    ]:
        assert sorted(got_labels.tolist()) == sorted(labels[split].tolist())
        got = np.sort(got_images.reshape(sizes[split], -1).sum(1))
        want = np.sort(images[split].reshape(sizes[split], -1).sum(1)) / 256
        np.testing.assert_allclose(got - got[0], want - want[0], rtol=1e-5, atol=1e-2)
    assert (data_dir / "mnist").is_dir()
