"""TFDS mocking shared by the tests, and a runner for the image program on mocked data.

    python tests/tfds_mock.py NUM_EXAMPLES [--program=MODULE] --flag=value ...

runs `python3 -m image_classification --flag=value ...` (or `-m MODULE`, e.g.
experiments.mnist_edge) inside `tfds.testing.mock_data`.
"""

import json
import pathlib
import runpy
import sys
import tempfile

MOCKED_DATASETS = ("mnist", "cifar10")
# Split sizes written into the mocked metadata. The loader must take its sizes from the data
# (the mock's `num_examples`), never from these.
DECLARED_TRAIN, DECLARED_TEST = 1000, 500


def write_mock_metadata(root: pathlib.Path, names=MOCKED_DATASETS) -> str:
    """TFDS metadata (split sizes only) for `tfds.testing.mock_data(data_dir=root)`.

    Without split sizes, TFDS reads a whole split (`batch_size=-1`) with a batch of `sys.maxsize`
    examples, which aborts TensorFlow; with them, it reads the mock's examples in one batch.
    """
    import tensorflow_datasets as tfds

    for name in names:
        version = str(tfds.builder(name, data_dir=str(root)).version)
        directory = root / name / version
        directory.mkdir(parents=True, exist_ok=True)
        splits = [
            {"name": split, "shardLengths": [str(size)], "numBytes": "0"}
            for split, size in [("train", DECLARED_TRAIN), ("test", DECLARED_TEST)]
        ]
        info = {"name": name, "version": version, "splits": splits}
        (directory / "dataset_info.json").write_text(json.dumps(info))
    return str(root)


def main() -> None:
    import tensorflow_datasets as tfds

    num_examples, args = int(sys.argv[1]), sys.argv[2:]
    program = "image_classification"
    if args and args[0].startswith("--program="):
        program, args = args[0].split("=", 1)[1], args[1:]
    with tempfile.TemporaryDirectory() as root:
        metadata = write_mock_metadata(pathlib.Path(root))
        with tfds.testing.mock_data(num_examples=num_examples, data_dir=metadata):
            sys.argv = [program, *args]
            runpy.run_module(program, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    main()
