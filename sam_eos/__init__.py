"""sam_eos: watch Hessian sharpness while SAM or gradient descent trains.

A functional core (`sam`, `hessian`, `edge`, `tree`) of pure, jit-compiled functions over
parameter pytrees, and an edge (`train`, `records`, `plots`, `flags`) that does I/O.
"""

from sam_eos.edge import sam_edge

__all__ = ["sam_edge"]
