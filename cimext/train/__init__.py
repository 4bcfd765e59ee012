"""Training that protects CiM deployments (DESIGN section 7): vanilla, variation-aware (VA), TRICE
noise injection, adversarial weight training (adv) and A-TRICE. ``fit`` is the entry point;
``METHODS`` maps a method name to its per-batch step (register_method adds one); ``cimext
compare`` trains several methods and evaluates each with LWC (the paper's Tables V/VI, Fig. 8)."""

from . import adversarial
from .adversarial import sign_perturbation
from .fit import (
    DEFAULT_LR,
    METHODS,
    METRICS,
    FitResult,
    StepContext,
    accuracy,
    fit,
    register_method,
)

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "METRICS",
    "FitResult",
    "StepContext",
    "accuracy",
    "adversarial",
    "fit",
    "register_method",
    "sign_perturbation",
]
