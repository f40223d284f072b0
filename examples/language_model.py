"""Track sharpness while a GPT-style language model trains: a character-level decoder in Flax
NNX, trained by AdamW under a warmup-cosine schedule on tiny_shakespeare, its Hessian's top
eigenvalue and Adam's preconditioned sharpness measured every few steps against Adam's edge at
the current learning rate, printed and written to TensorBoard.

    python3 examples/language_model.py [--size tiny|small|medium|gpt2-small] [--steps 500]
        [--every 50] [--data_dir ../shared/data/tinyshakespeare] [--tensorboard_dir DIR]

The model: token and position embeddings, pre-LN blocks (LayerNorm, causal self-attention,
residual; LayerNorm, 4x GELU MLP, residual), a final LayerNorm and an output head tied to the
token embedding (logits = h E^T, as GPT-2). No dropout, so the loss is one deterministic
function of the parameters, the same one the steps differentiate. The vocabulary is the text's
own characters (65 for tiny_shakespeare), not GPT-2's 50,257 BPE tokens: the `gpt2-small`
preset has GPT-2 small's shape (12 layers, 12 heads, width 768, context 1024) and about 85.9M
parameters, its 124M less the BPE embedding table (38.6M).

What is measured, every `--every` steps, on one held batch of training sequences drawn once
(the same sequences at every check, passed to the tracker as its `batch`):
- lambda_max: the top eigenvalue of the loss's Hessian in the `nnx.Param`s
  (`nnx.split(model, nnx.Param, ...)`, README "Tracking your own model");
- effective_sharpness: lambda_max(P^-1 H), P = sqrt(v_hat) + eps read from the optimizer's
  state (`sam_eos.adam_preconditioner`), warm-started from the previous check's as well
  (one tracker, two states: lambda_max is the same solve with P = 1, so both share one compile);
- stability_threshold: Adam's edge (2 + 2 b1) / ((1 - b1) lr_t) = 38 / lr_t at b1 = 0.9, with
  lr_t = schedule(t) the learning rate of the next step, t the updates made so far (README,
  "Schedules");
- adamw_edge: that edge less the decay's shift wd (1 + b1) / (1 - b1) = 19 wd (README, "Weight
  decay"; the decay is not in the loss, so not in H or P). Weight decay applies to every
  parameter, so the shift holds in every direction. edge_ratio = effective_sharpness /
  adamw_edge: about 1 at Adam's edge of stability.

The data: `input.txt` of `--data_dir` (tiny_shakespeare as in karpathy/char-rnn, 1,115,394
characters); the first 90 % trains, the last 10 % gives a held validation batch.
"""

import argparse
import dataclasses
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sam_eos
from sam_eos.reports import tensorboard_writer

B1, B2, EPS = 0.9, 0.99, 1e-8  # AdamW's moments (b2 0.99: nanoGPT's for small char models)
REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
# The developers' data folder, ../shared/data/tinyshakespeare from the repository root.
DEFAULT_DATA_DIR = REPOSITORY.parent / "shared" / "data" / "tinyshakespeare"
TEXT_FILE = "input.txt"
VALIDATION_FRACTION = 0.1  # the text's last tenth: validation
INIT_STDDEV = 0.02  # GPT-2's initialisation of every weight matrix and embedding


@dataclasses.dataclass(frozen=True)
class Size:
    """A model shape and its default batch and peak learning rate."""

    num_layers: int
    num_heads: int
    d_model: int  # width of the residual stream
    context: int  # characters per sequence
    batch_size: int  # sequences per step
    learning_rate: float  # the schedule's peak


SIZES = {
    "tiny": Size(2, 2, 32, 32, 8, 3e-3),  # 29k parameters: the test's
    "small": Size(4, 4, 128, 128, 16, 1e-3),  # 0.8M
    "medium": Size(6, 6, 384, 256, 32, 1e-3),  # 10.8M: nanoGPT's shakespeare_char shape
    "gpt2-small": Size(12, 12, 768, 1024, 8, 6e-4),  # 85.9M: GPT-2 small less its BPE table
}


class CausalSelfAttention(nnx.Module):
    """Multi-head self-attention in which position i attends to positions <= i."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs,
                              kernel_init=nnx.initializers.normal(INIT_STDDEV))
        # GPT-2 scales the projections into the residual stream by 1/sqrt(2 L): 2 per block.
        self.out = nnx.Linear(d_model, d_model, rngs=rngs, kernel_init=nnx.initializers.normal(
            INIT_STDDEV / math.sqrt(2 * num_layers)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float [batch, time, d_model] -> float [batch, time, d_model]."""
        batch, length, width = x.shape
        heads = (batch, length, self.num_heads, width // self.num_heads)
        q, k, v = (part.reshape(heads) for part in jnp.split(self.qkv(x), 3, axis=-1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(heads[-1])
        causal = jnp.tril(jnp.ones((length, length), bool))  # [query, key]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)  # [batch, head, query, key]
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape))


class Block(nnx.Module):
    """A pre-LN decoder block: x + attention(LN(x)), then + MLP(LN(.)), MLP 4x wide, GELU."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.attention = CausalSelfAttention(d_model, num_heads, num_layers, rngs)
        self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp_in = nnx.Linear(d_model, 4 * d_model, rngs=rngs,
                                 kernel_init=nnx.initializers.normal(INIT_STDDEV))
        self.mlp_out = nnx.Linear(4 * d_model, d_model, rngs=rngs,
                                  kernel_init=nnx.initializers.normal(
                                      INIT_STDDEV / math.sqrt(2 * num_layers)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float [batch, time, d_model] -> the same shape."""
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class GPT(nnx.Module):
    """A decoder-only Transformer over characters, its output head tied to the embedding."""

    def __init__(self, size: Size, vocab_size: int, rngs: nnx.Rngs):
        embedding_init = nnx.initializers.normal(INIT_STDDEV)
        self.token_embedding = nnx.Embed(vocab_size, size.d_model, rngs=rngs,
                                         embedding_init=embedding_init)
        self.position_embedding = nnx.Embed(size.context, size.d_model, rngs=rngs,
                                            embedding_init=embedding_init)
        self.blocks = nnx.List([Block(size.d_model, size.num_heads, size.num_layers, rngs)
                                for _ in range(size.num_layers)])
        self.final_norm = nnx.LayerNorm(size.d_model, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [batch, time], time <= context -> logits float [batch, time, vocab]."""
        x = self.token_embedding(tokens) + self.position_embedding(
            jnp.arange(tokens.shape[-1]))
        for block in self.blocks:
            x = block(x)
        return self.token_embedding.attend(self.final_norm(x))  # tied head: h E^T


Batch = tuple[jax.Array, jax.Array]  # (inputs, targets), int32 [batch, context] each


def next_token_loss(model: GPT, batch: Batch) -> jax.Array:
    """Mean cross-entropy (nats per character) of each next character."""
    inputs, targets = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets).mean()


def parameter_count(size: Size, vocab_size: int) -> int:
    """Parameters of the model, counted from shapes alone (nothing allocated)."""
    model = nnx.eval_shape(lambda: GPT(size, vocab_size, nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def read_text(data_dir: pathlib.Path) -> str:
    """The ASCII text of `data_dir`/input.txt; a FileNotFoundError that says where to get it."""
    path = pathlib.Path(data_dir) / TEXT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no tiny_shakespeare text at {path}: pass --data_dir=DIR with DIR/{TEXT_FILE} "
            f"(1,115,394 characters; karpathy/char-rnn's data/tinyshakespeare/input.txt, or "
            f"../shared/data/tinyshakespeare from the repository root where it is shared)")
    return path.read_text(encoding="ascii")


def encode(text: str) -> tuple[np.ndarray, str]:
    """(the text as int32 ids [len(text)], the vocabulary: its distinct characters, sorted)."""
    vocabulary = "".join(sorted(set(text)))
    lookup = np.zeros(max(map(ord, vocabulary)) + 1, np.int32)
    lookup[[ord(c) for c in vocabulary]] = np.arange(len(vocabulary))
    return lookup[np.frombuffer(text.encode("ascii"), np.uint8)], vocabulary


def sample_batch(ids: np.ndarray, rng: np.random.Generator, batch_size: int,
                 context: int) -> Batch:
    """`batch_size` random windows of `ids`: inputs [batch, context] and the next characters."""
    if len(ids) <= context:
        raise ValueError(f"a text of {len(ids)} characters is too short for context {context}")
    starts = rng.integers(0, len(ids) - context, batch_size)
    windows = np.stack([ids[s:s + context + 1] for s in starts])  # [batch, context + 1]
    return jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])


def learning_rate_schedule(peak: float, warmup_steps: int, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then a cosine to peak / 10 at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=steps,
        end_value=peak / 10)


def adamw_edge(learning_rate: float, weight_decay: float, b1: float = B1) -> float:
    """AdamW's threshold on lambda_max(P^-1 H): (2 + 2 b1)/((1 - b1) lr) - wd (1 + b1)/(1 - b1)
    (README, "Weight decay"), 38 / lr - 19 wd at b1 = 0.9."""
    shift = weight_decay * (1 + b1) / (1 - b1)
    return sam_eos.stability_threshold("adam", learning_rate, b1=b1) - shift


def run(size: str = "tiny", steps: int = 500, every: int = 50, batch_size: int | None = None,
        learning_rate: float | None = None, warmup_steps: int | None = None,
        weight_decay: float = 0.1, data_dir: str | pathlib.Path = DEFAULT_DATA_DIR,
        seed: int = 0, tensorboard_dir: str = "") -> list[dict[str, float]]:
    """Trains and measures; returns one dict of scalars per check (also printed).

    Args:
      size: a key of SIZES.
      steps: AdamW steps; the schedule's cosine ends at `steps`.
      every: measure after every this many steps.
      batch_size, learning_rate: sequences per step and the schedule's peak; None: the size's.
      warmup_steps: the schedule's linear warmup; None: steps // 10.
      weight_decay: AdamW's decoupled decay, on every parameter.
      data_dir: a folder with input.txt.
      seed: initialisation, batches, the held batches and the solvers' starts.
      tensorboard_dir: also write each check's scalars here ("" off).
    """
    shape = SIZES[size]
    batch_size = shape.batch_size if batch_size is None else batch_size
    peak = shape.learning_rate if learning_rate is None else learning_rate
    warmup_steps = steps // 10 if warmup_steps is None else warmup_steps
    if not 0 <= warmup_steps < steps:
        raise ValueError(f"warmup_steps must be in [0, steps = {steps}), not {warmup_steps}")
    ids, vocabulary = encode(read_text(pathlib.Path(data_dir)))
    split = int(len(ids) * (1 - VALIDATION_FRACTION))
    train_ids, validation_ids = ids[:split], ids[split:]
    rng = np.random.default_rng(seed)
    held = sample_batch(train_ids, rng, batch_size, shape.context)  # the tracker's batch
    validation = sample_batch(validation_ids, rng, batch_size, shape.context)

    model = GPT(shape, len(vocabulary), nnx.Rngs(seed))
    schedule = learning_rate_schedule(peak, warmup_steps, steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, b1=B1, b2=B2, eps=EPS,
                                                 weight_decay=weight_decay), wrt=nnx.Param)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    print(f"{size}: {sum(p.size for p in jax.tree.leaves(params)):,} parameters, vocabulary "
          f"{len(vocabulary)} characters, {len(train_ids):,} training characters")

    def loss_fn(params, batch):  # a pure function of the parameters' pytree
        batch, rest = batch  # the model's other state (none here), current at each check
        return next_token_loss(nnx.merge(graphdef, params, rest, copy=True), batch)

    evaluate = jax.jit(loss_fn)
    # One tracker, two states: lambda_max(H) is the preconditioned solve with P = 1 (exactly),
    # so both solves run one compiled program (each compile is most of a short run's time).
    tracker = sam_eos.SharpnessTracker(loss_fn, k=1)
    keys = jax.random.split(jax.random.key(seed), 2)
    sharpness_state = tracker.init(params, keys[0])
    effective_state = tracker.init(params, keys[1])
    writer = _writer(tensorboard_dir, {
        **dataclasses.asdict(shape), "size": size, "steps": steps, "every": every,
        "batch_size": batch_size, "learning_rate": peak, "warmup_steps": warmup_steps,
        "weight_decay": weight_decay, "data_dir": str(data_dir), "seed": seed, "b1": B1,
        "b2": B2, "eps": EPS})
    records = []
    for step in range(1, steps + 1):
        loss = _train_step(model, optimizer, sample_batch(train_ids, rng, batch_size,
                                                          shape.context))
        if step % every:
            continue
        start = time.perf_counter()
        _, params, rest = nnx.split(model, nnx.Param, ...)  # the current values
        preconditioner = sam_eos.adam_preconditioner(optimizer.opt_state, b2=B2, eps=EPS)
        # P = 1: the Hessian itself, in P's pytree type, so both solves are one compiled program.
        identity = jax.tree.map(jnp.ones_like, preconditioner)
        result, sharpness_state = tracker.update(sharpness_state, params, (held, rest),
                                                 preconditioner=identity)
        adam, effective_state = tracker.update(effective_state, params, (held, rest),
                                               preconditioner=preconditioner)
        # The next step's rate: optax evaluates the schedule at the updates made so far.
        rate = float(schedule(int(optimizer.step[...])))
        record = _record(step, rate, weight_decay, result.scalars("s"), adam.scalars("e"))
        record.update(loss=float(loss), held_loss=float(evaluate(params, (held, rest))),
                      validation_loss=float(evaluate(params, (validation, rest))),
                      check_seconds=time.perf_counter() - start)
        records.append(record)
        _report(writer, record)
    if writer is not None:
        writer.close()
    return records


@nnx.jit
def _train_step(model: GPT, optimizer: nnx.Optimizer, batch: Batch) -> jax.Array:
    """One AdamW step on `batch`; returns its loss (before the step)."""
    loss, grads = nnx.value_and_grad(next_token_loss)(model, batch)
    optimizer.update(model, grads)
    return loss


def _record(step: int, rate: float, weight_decay: float, plain: dict[str, float],
            preconditioned: dict[str, float]) -> dict[str, float]:
    """One check's row, named as the programs' raw-data columns where one applies (so that
    TensorBoard groups them and charts effective_sharpness against stability_threshold)."""
    edge = adamw_edge(rate, weight_decay)
    return {
        "step": step, "learning_rate": rate,
        "lambda_max": plain["s/lambda_1"], "error_bound": plain["s/error_bound"],
        "hessian_vector_products": plain["s/hessian_vector_products"],
        "converged": plain["s/converged"],
        "effective_sharpness": preconditioned["e/lambda_1"],
        "effective_error_bound": preconditioned["e/error_bound"],
        "effective_hessian_vector_products": preconditioned["e/hessian_vector_products"],
        "effective_converged": preconditioned["e/converged"],
        "stability_threshold": sam_eos.stability_threshold("adam", rate, b1=B1),
        "adamw_edge": edge, "edge_ratio": preconditioned["e/lambda_1"] / edge,
    }


def _writer(tensorboard_dir: str, settings: dict) -> tensorboard_writer.TensorBoardWriter | None:
    """The package's writer (tags `<group>/<column>`, a Custom Scalars layout), or None."""
    if not tensorboard_dir:
        return None
    if not tensorboard_writer.writer_available():
        raise RuntimeError(tensorboard_writer.MISSING_WRITER)
    return tensorboard_writer.TensorBoardWriter(tensorboard_dir, settings)


def _report(writer: tensorboard_writer.TensorBoardWriter | None, record: dict[str, float]) -> None:
    """Prints one line per check and writes the row to TensorBoard (on disk when it returns)."""
    print(f"step {record['step']:5d}  lr {record['learning_rate']:.2e}  loss "
          f"{record['loss']:.3f}  val {record['validation_loss']:.3f}  lambda_max "
          f"{record['lambda_max']:9.3f}  P^-1 H {record['effective_sharpness']:10.4g}  edge "
          f"{record['adamw_edge']:10.4g}  ratio {record['edge_ratio']:.3f}  HVPs "
          f"{record['hessian_vector_products']:.0f}+"
          f"{record['effective_hessian_vector_products']:.0f}  bounds {record['error_bound']:.0e}, "
          f"{record['effective_error_bound']:.0e}  {record['check_seconds']:.1f} s",
          flush=True)
    if writer is not None:
        writer.write_row(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=50, help="steps between checks")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the size's")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="the schedule's peak; default: the size's")
    parser.add_argument("--warmup_steps", type=int, default=None, help="default: steps // 10")
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--data_dir", default=str(DEFAULT_DATA_DIR),
                        help="a folder with input.txt (default: ../shared/data/tinyshakespeare "
                             "from the repository root)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensorboard_dir", default="")
    parser.add_argument("--count_parameters", action="store_true",
                        help="print the size's parameter count (from shapes alone) and exit")
    args = parser.parse_args()
    for name in ("steps", "every", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    warmup = args.steps // 10 if args.warmup_steps is None else args.warmup_steps
    if not 0 <= warmup < args.steps:
        parser.error(f"--warmup_steps must be in [0, --steps = {args.steps}), not {warmup}")
    if args.count_parameters:
        vocabulary = encode(read_text(pathlib.Path(args.data_dir)))[1]
        print(f"{args.size}: {parameter_count(SIZES[args.size], len(vocabulary)):,} parameters")
        return
    try:
        records = run(args.size, args.steps, args.every, args.batch_size, args.learning_rate,
                      args.warmup_steps, args.weight_decay, args.data_dir, args.seed,
                      args.tensorboard_dir)
    except FileNotFoundError as error:
        parser.error(str(error))
    if records:
        last = records[-1]
        print(f"last check: lambda_max {last['lambda_max']:.4g}, effective sharpness / AdamW's "
              f"edge {last['edge_ratio']:.3f}")


if __name__ == "__main__":
    main()
