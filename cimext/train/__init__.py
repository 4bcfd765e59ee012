"""Training that protects CiM deployments (DESIGN section 7): vanilla, variation-aware (VA), TRICE
noise injection, adversarial weight training (adv) and A-TRICE. ``fit`` is the entry point;
``METHODS`` maps a method name to its per-batch step (register_method adds one); ``compare``
trains several methods and evaluates each with LWC (the paper's Tables V/VI and Fig. 8)."""

from . import adversarial
from .adversarial import sign_perturbation
from .fit import METHODS, METRICS, FitResult, StepContext, accuracy, fit, register_method

__all__ = [
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
