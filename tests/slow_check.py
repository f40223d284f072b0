"""A program run whose checks from step 10 on are slow and never converge (tests only).

    python tests/slow_check.py MODULE --flag=value ...

runs `python3 -m MODULE --flag=value ...` with every eigensolver chunk of a check at step >= 10
sleeping 0.5 s and reporting "not converged", printing "slow chunk" each time: a stand-in for a
check on a large model, to interrupt mid-check.
"""

import pathlib
import runpy
import sys
import time

import numpy as np


def slow_chunks(compile_check):
    def compile_slow_check(*args, **kwargs):
        compiled = compile_check(*args, **kwargs)
        chunk = compiled.eigensolver_chunk

        def slow_chunk(params, batch, key, step, *rest):
            solved = chunk(params, batch, key, step, *rest)
            if int(step) >= 10:
                print("slow chunk", flush=True)
                time.sleep(0.5)
                solved = solved._replace(converged=np.bool_(False))
            return solved

        compiled.eigensolver_chunk = slow_chunk
        return compiled

    return compile_slow_check


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from sam_eos.loop import check

    check.compile_check = slow_chunks(check.compile_check)
    program, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(program, run_name="__main__", alter_sys=True)
