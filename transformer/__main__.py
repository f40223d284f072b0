"""python3 -m transformer: SAM (or SGD) on a character-level Transformer, watching the Hessian.

    python3 -m transformer --rho=0.1 --corpus=tinyshakespeare.txt --hessian_check_gap=0.05

Writes the raw data and four PDFs, then prints the test loss (nats per character).
"""

import jax
import numpy as np
from absl import flags, logging

from sam_eos.cli import flags as shared_flags
from sam_eos.cli import program
from sam_eos.cli.parsing import project_flag_values
from sam_eos.loop import distributed, feed, train
from transformer import dataset, model

shared_flags.define_shared_flags(
    time_limit_in_hours=1.0, hessian_check_gap=None, step_size=0.1, batch_size=128
)
flags.adopt_module_key_flags(shared_flags)  # --helpshort lists the shared flags too
TRAINING_DATA = flags.DEFINE_string("training_data", None, "ASCII training text.")
TEST_DATA = flags.DEFINE_string("test_data", None, "ASCII test text.")
CORPUS = flags.DEFINE_string(
    "corpus", None, "One ASCII text split as in the paper: the last --test_lines lines are the "
    "test set, the rest training (instead of --training_data/--test_data)."
)
TEST_LINES = flags.DEFINE_integer("test_lines", 10000, "Test lines taken from --corpus.")
NUM_LAYERS = flags.DEFINE_integer("num_layers", 6, "Transformer blocks.")
NUM_HEADS = flags.DEFINE_integer("num_heads", 8, "Attention heads.")
KEY_SIZE = flags.DEFINE_integer("key_size", 32, "Size of each attention key.")
MODEL_SIZE = flags.DEFINE_integer("model_size", 128, "Width of the residual stream.")
SEQUENCE_LENGTH = flags.DEFINE_integer("sequence_length", 64, "Characters per input sequence.")
HESSIAN_BATCH_SIZE = flags.DEFINE_integer(
    "hessian_batch_size", None, "Measure every check on one fixed, seeded set of this many "
    "training sequences (unset: the current minibatch, as the original)."
)


def training_data(stream: dataset.TrainBatches, mesh, per_process: bool) -> feed.Data:
    """The training crops on the device, each step gathering its batch there; or, when they do
    not fit (`sam_eos.loop.feed.fits_on_device`), host batches sent in fixed-size chunks."""
    num_bytes = stream.crops.nbytes
    if feed.fits_on_device(num_bytes, 1 if mesh is None else mesh.size):
        logging.info("Training data on the device: %d crops (%.1f MB).", len(stream.crops),
                     num_bytes / 1e6)
        return feed.DeviceData(stream.crops, stream, dataset.split_crops)
    logging.info("Training data on the host (%.1f MB): batches sent in chunks.", num_bytes / 1e6)
    return feed.BatchStream(stream, per_process)


def _texts() -> tuple[str, str, str]:
    """(training text, test text, a name for messages) from the data flags."""
    if CORPUS.value is not None:
        if TRAINING_DATA.value is not None or TEST_DATA.value is not None:
            raise program.InputError(
                "give either --corpus or --training_data/--test_data, not both")
        shared_flags.require_positive_int("test_lines", TEST_LINES.value)
        text = dataset.read_ascii_text(CORPUS.value)
        train_text, test_text = dataset.split_corpus(text, TEST_LINES.value)
        return train_text, test_text, f"{CORPUS.value} (training part)"
    if TRAINING_DATA.value is None or TEST_DATA.value is None:
        raise program.InputError("--training_data and --test_data are required (or give --corpus)")
    train_text = dataset.read_ascii_text(TRAINING_DATA.value)
    return train_text, dataset.read_ascii_text(TEST_DATA.value), TRAINING_DATA.value


def main(argv: list[str]) -> int:
    del argv
    shared_flags.use_compilation_cache()
    config = shared_flags.train_config_from_flags(
        f"Transformer ({NUM_LAYERS.value} layer{'s' if NUM_LAYERS.value != 1 else ''}, "
        f"width {MODEL_SIZE.value}): "
        f"rho={flags.FLAGS.rho:g}, eta={flags.FLAGS.step_size:g}, seed {flags.FLAGS.seed}",
        input_paths={"corpus": CORPUS.value, "training_data": TRAINING_DATA.value,
                     "test_data": TEST_DATA.value},
    )
    for name in ("num_layers", "num_heads", "key_size", "model_size", "sequence_length"):
        shared_flags.require_positive_int(name, flags.FLAGS[name].value)
    shared_flags.require_positive_int("hessian_batch_size", HESSIAN_BATCH_SIZE.value,
                                      allow_none=True)
    batch_size, length = flags.FLAGS.batch_size, SEQUENCE_LENGTH.value
    mesh = shared_flags.mesh_from_flags({
        "--batch_size": batch_size,
        **({"--hessian_batch_size": HESSIAN_BATCH_SIZE.value} if HESSIAN_BATCH_SIZE.value else {}),
    })
    train_text, test_text, name = _texts()
    dataset.check_enough_batches(train_text, batch_size=batch_size, sequence_length=length,
                                 path_or_name=name)
    test_batches = dataset.test_batches(test_text, batch_size=batch_size, sequence_length=length)
    # On several processes each builds only its rows of every batch of the same stream.
    per_process = jax.process_count() > 1
    stream = dataset.TrainBatches(
        train_text, batch_size=batch_size, sequence_length=length, seed=config.seed,
        rows=distributed.process_rows(batch_size, mesh) if per_process else None,
    )
    hessian_batch = None
    if HESSIAN_BATCH_SIZE.value is not None:
        hessian_batch = dataset.fixed_hessian_batch(
            train_text, num_sequences=HESSIAN_BATCH_SIZE.value, sequence_length=length,
            seed=config.seed,
        )
    network = model.make_network(
        num_layers=NUM_LAYERS.value, num_heads=NUM_HEADS.value, key_size=KEY_SIZE.value,
        model_size=MODEL_SIZE.value, sequence_length=length,
    )
    params = jax.jit(network.init)(jax.random.PRNGKey(config.seed), test_batches[0][0][:1])
    num_params = sum(x.size for x in jax.tree.leaves(params))
    shared_flags.check_principal_components(config, num_params)
    logging.info("Transformer with %d parameters; %d training batches per epoch, %d test "
                 "batches.", num_params, stream.num_batches_per_epoch, len(test_batches))
    loss_fn = model.make_loss_fn(network)
    result = train.run(
        loss_fn, params, training_data(stream, mesh, per_process), config,
        hessian_batch=hessian_batch, mesh=mesh,
        settings={"program": "transformer", "flags": project_flag_values()},
    )

    def test_loss(trained: train.PyTree) -> float:  # process p evaluates test batches p, p + P, ...
        total, tokens = distributed.sum_over_processes(np.array(model.summed_loss(
            loss_fn, trained, test_batches[jax.process_index()::jax.process_count()],
        ), np.float64))
        return total / tokens

    return program.report_test_value("loss", result, test_loss)


if __name__ == "__main__":
    program.run_main(main)
