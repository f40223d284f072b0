"""Data-parallel scaling: steps per second of the full-batch MNIST MLP on 1, 2 and 4 devices.

    python3 -m benchmarks.scaling [--devices 1,2,4] [--num_images 8000] [--steps 5]
                                  [--two_processes]

On a CPU the devices are simulated (`XLA_FLAGS=--xla_force_host_platform_device_count=4`, set
for each child process) and share the machine's cores, so perfect scaling is not possible
there; on a machine with several accelerators the same command measures real scaling. Each
device count runs in its own child process: the paper's MLP (3 x 1000 ReLU, squared loss), SAM
with rho 0.1, full batch sharded over the devices with `sam_eos.loop.distributed`, timed over
`--steps` steps of `sam_eos.loop.steps.make_train_steps` after compilation (median of 3 dispatches).
Scaling efficiency = (rate on N devices / rate on 1) / N. `--two_processes` adds the largest
device count again as two processes joined by `jax.distributed` over localhost (half the
devices each, each process putting only its rows of the batch), which is what several hosts do:
the difference from the one-process row is the cost of collectives across processes.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def child(num_devices: int, num_images: int, steps: int) -> None:
    """Measures one device count; prints a JSON line."""
    from sam_eos.loop import distributed

    distributed.initialize_multihost()  # the two-process row; nothing otherwise

    import jax
    import numpy as np
    import optax

    from image_classification import model
    from sam_eos.loop import steps as steps_
    from sam_eos.loop.feed import FullBatchFeed

    mesh = distributed.make_mesh(num_devices)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(num_images, 28, 28, 1)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, num_images)]
    network = model.make_network("MLP", 10, mlp_depth=4, mlp_width=1000, cnn_num_blocks=1,
                                 cnn_layers_per_block=1, cnn_feature_multiplier=1)
    params = jax.jit(network.init)(jax.random.PRNGKey(0), images[:1])
    optimizer = optax.sgd(0.01)
    state = distributed.put_replicated((params, optimizer.init(params)), mesh)
    batch = distributed.put_batch((images, labels), mesh)
    train_steps = steps_.make_train_steps(model.make_loss_fn(network), optimizer, 0.1,
                                          FullBatchFeed.select)
    jax.block_until_ready(train_steps(*state, batch, 0, 1))  # compile
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(train_steps(*state, batch, 0, steps))
        times.append(time.perf_counter() - start)
    print(json.dumps({"devices": mesh.size, "processes": jax.process_count(),
                      "rate": steps / statistics.median(times),
                      "platform": jax.devices()[0].platform}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--num_images", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--two_processes", action="store_true")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.num_images, args.steps)
        return
    counts = [int(n) for n in args.devices.split(",")]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and "XLA_FLAGS" not in os.environ:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={max(counts)}"
    def measure(count: int, processes: int = 1) -> dict:
        command = [sys.executable, "-m", "benchmarks.scaling", f"--child={count}",
                   f"--num_images={args.num_images}", f"--steps={args.steps}"]
        if processes == 1:
            completed = subprocess.run(command, env=env, capture_output=True, text=True,
                                       check=True)
            return json.loads(completed.stdout.strip().splitlines()[-1])
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        children = [
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=dict(
                env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i),
                XLA_FLAGS=f"--xla_force_host_platform_device_count={count // processes}",
            ))
            for i in range(processes)
        ]
        outputs = [child.communicate()[0] for child in children]
        if any(child.returncode for child in children):
            raise RuntimeError(f"a process of the {processes}-process run failed")
        return json.loads(outputs[0].strip().splitlines()[-1])  # process 0's timing

    results = [measure(count) for count in counts]
    if args.two_processes:
        results.append(measure(max(counts), processes=2))
    base = results[0]["rate"]
    print(f"Full-batch MNIST MLP 3x1000 (2,797,010 params), {args.num_images} images, SAM rho "
          f"0.1, platform {results[0]['platform']}, {os.cpu_count()} CPU cores")
    print("| devices | processes | steps/s | speed-up | scaling efficiency |")
    print("|---|---|---|---|---|")
    for result in results:
        speedup = result["rate"] / base
        print(f"| {result['devices']} | {result['processes']} | {result['rate']:.3f} | "
              f"{speedup:.2f} | {speedup / result['devices'] * results[0]['devices']:.0%} |")


if __name__ == "__main__":
    main()
