"""One jitted SAM step against one GD step (two gradients against one), on the MNIST MLP and
the transformer program's default model."""

import jax
import optax

from benchmarks import problems
from benchmarks.harness import Context, format_seconds, interleaved_medians
from sam_eos.loop.feed import FullBatchFeed
from sam_eos.loop.steps import make_train_steps

NAME = "sam_step"
TITLE = "SAM step / GD step"
RHO, STEP_SIZE = 0.05, 0.05


def step_ratio(loss_fn, params, batch, repeats: int) -> dict[str, float]:
    optimizer = optax.sgd(STEP_SIZE)
    opt_state = optimizer.init(params)
    steps = {name: make_train_steps(loss_fn, optimizer, rho, FullBatchFeed.select)
             for name, rho in (("gd", 0.0), ("sam", RHO))}
    return interleaved_medians(
        {name: (lambda step=step: step(params, opt_state, batch, 0, 1))
         for name, step in steps.items()}, repeats)


def run(context: Context) -> dict:
    repeats = context.repeats(8, 20)
    (images, labels), source = problems.mnist_batch(context.data_dir, 2000)
    network, mlp_loss = problems.make_mlp(200, 4)
    mlp_batch = jax.device_put((images, labels))
    mlp_params = network.init(jax.random.PRNGKey(0), images[:1])
    text_network, text_loss = problems.make_transformer()
    text, text_source = problems.text_batch(context.data_dir, 32)
    text_params = text_network.init(jax.random.PRNGKey(0), text[0])
    models = [(f"MLP 3x200, 2000 images ({source})", mlp_loss, mlp_params, mlp_batch),
              (f"transformer 6x128 ({problems.num_params(text_params):,} params), batch 32x64 "
               f"({text_source})", text_loss, text_params, jax.device_put(text))]
    rows, headline = [], []
    for label, loss_fn, params, batch in models:
        times = step_ratio(loss_fn, params, batch, repeats)
        ratio = times["sam"] / times["gd"]
        rows.append([label, format_seconds(times["gd"]), format_seconds(times["sam"]),
                     f"{ratio:.2f}"])
        headline.append([f"SAM step / GD step, {label.split(',')[0].split(' (')[0]}",
                         f"{ratio:.2f}"])
    return {"title": TITLE, "headline": headline,
            "columns": ["model", "GD step", "SAM step", "SAM / GD"], "rows": rows,
            "notes": f"Medians of {repeats} interleaved calls of one compiled step each "
                     f"(rho {RHO}); SAM takes two gradients, so 2 is the natural bound."}
