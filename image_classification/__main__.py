"""python3 -m image_classification: SAM (or GD) on an MLP or CNN, watching the Hessian.

With no flags it re-runs the paper's MNIST experiment (full-batch GD on a 3 x 1000 ReLU MLP,
4 hours, a Hessian check every 15 minutes). Writes the raw data and four PDFs, then prints the
test error.
"""

import jax
import numpy as np
from absl import flags, logging

from image_classification import dataset, model
from sam_eos.cli import flags as shared_flags
from sam_eos.cli import program
from sam_eos.cli.parsing import project_flag_values
from sam_eos.loop import distributed, feed, train

shared_flags.define_shared_flags(
    time_limit_in_hours=4.0, hessian_check_gap=0.25, step_size=0.01, batch_size=60000
)
flags.adopt_module_key_flags(shared_flags)  # --helpshort lists the shared flags too
NN_ARCHITECTURE = flags.DEFINE_string("nn_architecture", "MLP", "MLP or CNN.")
DATASET = flags.DEFINE_string(
    "dataset", "mnist", "A TFDS image classification data set with `image` and `label` "
    "features, e.g. mnist or cifar10."
)
DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory (default: TFDS's own, which honours TFDS_DATA_DIR)."
)
MLP_DEPTH = flags.DEFINE_integer("mlp_depth", 4, "Layers of the MLP, counting the output.")
MLP_WIDTH = flags.DEFINE_integer("mlp_width", 1000, "Units per hidden layer of the MLP.")
CNN_NUM_BLOCKS = flags.DEFINE_integer("cnn_num_blocks", 2, "Blocks of the CNN.")
CNN_LAYERS_PER_BLOCK = flags.DEFINE_integer("cnn_layers_per_block", 1, "Conv layers per block.")
CNN_FEATURE_MULTIPLIER = flags.DEFINE_integer(
    "cnn_feature_multiplier", 16, "Channels of block i: 2**i times this."
)
MINI_TRAINING_SET_NUM_BATCHES = flags.DEFINE_integer(
    "mini_training_set_num_batches", None, "Keep only this many training batches (unset: all)."
)
MINI_TEST_SET_NUM_BATCHES = flags.DEFINE_integer(
    "mini_test_set_num_batches", None, "Keep only this many test batches (unset: all)."
)
SHUFFLE = flags.DEFINE_bool(
    "shuffle", False, "Minibatch training only: a new seeded order each epoch (default: in "
    "order, as the original)."
)


def training_data(data: dataset.ImageData, order: dataset.Minibatches, mesh,
                  per_process: bool) -> feed.Data:
    """The training images and labels on the device, each step gathering its minibatch there;
    or, when they do not fit (`sam_eos.loop.feed.fits_on_device`), host batches sent in chunks."""
    examples = (data.train_images, data.train_labels)
    num_bytes = sum(x.nbytes for x in examples) * jax.process_count()
    if feed.fits_on_device(num_bytes, 1 if mesh is None else mesh.size):
        logging.info("Training data on the device (%.1f MB).", num_bytes / 1e6)
        return feed.DeviceData(examples, order, per_process=per_process)
    logging.info("Training data on the host (%.1f MB): batches sent in chunks.", num_bytes / 1e6)
    return feed.BatchStream(order, per_process)


def main(argv: list[str]) -> int:
    del argv
    shared_flags.use_compilation_cache()
    config = shared_flags.train_config_from_flags(
        f"{NN_ARCHITECTURE.value} on {DATASET.value}: rho={flags.FLAGS.rho:g}, "
        f"eta={flags.FLAGS.step_size:g}, seed {flags.FLAGS.seed}"
    )
    for name in ("mini_training_set_num_batches", "mini_test_set_num_batches"):
        shared_flags.require_positive_int(name, flags.FLAGS[name].value, allow_none=True)
    build = lambda num_classes: model.make_network(  # noqa: E731
        NN_ARCHITECTURE.value,
        num_classes,
        mlp_depth=MLP_DEPTH.value,
        mlp_width=MLP_WIDTH.value,
        cnn_num_blocks=CNN_NUM_BLOCKS.value,
        cnn_layers_per_block=CNN_LAYERS_PER_BLOCK.value,
        cnn_feature_multiplier=CNN_FEATURE_MULTIPLIER.value,
    )
    build(10)  # checks the architecture flags before the (slow) data load
    batch_size = flags.FLAGS.batch_size
    processes = jax.process_count()
    data = dataset.load(
        DATASET.value,
        data_dir=DATA_DIR.value,
        batch_size=batch_size,
        mini_training_set_num_batches=MINI_TRAINING_SET_NUM_BATCHES.value,
        mini_test_set_num_batches=MINI_TEST_SET_NUM_BATCHES.value,
        process_index=jax.process_index(),
        process_count=processes,
    )
    num_train = data.train_size
    logging.info("%s: %d training and %d test examples, %d classes%s.", data.name, num_train,
                 data.test_size, data.num_classes,
                 f"; this process holds {len(data.train_images)} and {len(data.test_images)}"
                 if processes > 1 else "")
    network = build(data.num_classes)
    params = jax.jit(network.init)(jax.random.PRNGKey(config.seed), data.train_images[:1])
    num_params = sum(x.size for x in jax.tree.leaves(params))
    shared_flags.check_principal_components(config, num_params)
    logging.info("%s with %d parameters.", NN_ARCHITECTURE.value, num_params)
    mesh = shared_flags.mesh_from_flags({"the batch size": min(batch_size, num_train)})
    # On several processes each holds its own rows (dataset.load); on one, all of them.
    per_process = processes > 1
    if batch_size >= num_train:
        logging.info("Full-batch training: batch_size %d covers all %d training examples.",
                     batch_size, num_train)
        batches = train.FullBatch((data.train_images, data.train_labels), per_process)
    else:
        logging.info("Minibatch training: %d batches of %d per epoch (%s).",
                     num_train // batch_size, batch_size,
                     "shuffled" if SHUFFLE.value else "in order")
        # With --shuffle each process shuffles its own rows, with its own seed.
        seed = config.seed if processes == 1 else (config.seed, jax.process_index())
        order = dataset.Minibatches(data.train_images, data.train_labels,
                                    batch_size // processes, seed if SHUFFLE.value else None)
        batches = training_data(data, order, mesh, per_process)
    result = train.run(
        model.make_loss_fn(network), params, batches, config, mesh=mesh,
        settings={"program": "image_classification", "flags": project_flag_values()},
    )

    def test_error(trained: train.PyTree) -> float:  # each process counts its own test examples
        errors = model.count_test_errors(network, trained, data.test_images, data.test_labels,
                                         min(batch_size, 10000))
        return int(distributed.sum_over_processes(np.int32(errors))) / data.test_size

    return program.report_test_value("error", result, test_error)


if __name__ == "__main__":
    program.run_main(main)
