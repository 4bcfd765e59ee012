"""Selective write-verify (U-SWIM): Hessian diagonals, sensitivities, a write-verify simulator.

``hessian_diag`` (one-forward one-backward "obd" recursion, or "hutchinson"), ``sensitivity``
("uswim", "swim", "magnitude", "random"), ``program`` (programmed weights and pulses of one
device instance under per-weight verify masks) and ``selective_write_verify`` (the accuracy /
pulses sweep behind ``cimext write-verify``) and ``speedup_study`` (the speedups of every method
over σ, uniform and non-uniform devices).
"""

from .hessian import diag_ggn_exact, hessian_diag
from .program import ProgramResult, expected_pulses, program
from .sensitivity import sensitivity, verify_masks
from .study import speedup_study
from .sweep import SweepPoint, SweepResult, selective_write_verify

__all__ = [
    "ProgramResult",
    "SweepPoint",
    "SweepResult",
    "diag_ggn_exact",
    "expected_pulses",
    "hessian_diag",
    "program",
    "selective_write_verify",
    "sensitivity",
    "speedup_study",
    "verify_masks",
]
