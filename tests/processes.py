"""Launching test subprocesses on simulated CPU devices, and joined into one multi-process
JAX run over localhost (what several hosts do, on one machine)."""

import dataclasses
import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def environment(devices_per_process: int, **variables: str) -> dict[str, str]:
    """The caller's environment with `devices_per_process` CPU devices, no multi-host
    variables of its own (a test under SLURM stays single-process) plus `variables`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                                "SLURM_", "OMPI_"))}
    env.pop("TFDS_DATA_DIR", None)
    env["XLA_FLAGS"] = (
        f"{env.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={devices_per_process}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    # Several CPU "devices" each running a threaded LAPACK eigh, as Lanczos does every step,
    # can be a thousand times slower on a small, busy machine.
    env["OPENBLAS_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(variables)
    return env


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(args: list[str], *, processes: int, devices_per_process: int,
                  timeout: float = 240) -> list[Finished]:
    """`python3 *args` started `processes` times as one JAX run (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID); a single process gets no multi-host variables.
    Returns each process's exit code and output, in process order."""
    variables = {}
    if processes > 1:
        variables = {"JAX_COORDINATOR_ADDRESS": f"localhost:{free_port()}",
                     "JAX_NUM_PROCESSES": str(processes)}
    started = [
        subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=environment(
                devices_per_process, **variables,
                **({"JAX_PROCESS_ID": str(i)} if processes > 1 else {}),
            ),
        )
        for i in range(processes)
    ]
    finished = []
    try:
        for process in started:
            stdout, stderr = process.communicate(timeout=timeout)
            finished.append(Finished(process.returncode, stdout, stderr))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return finished
