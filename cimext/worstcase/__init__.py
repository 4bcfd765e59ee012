"""Worst-case analysis of CiM deployments (DESIGN section 7): worst_case (the default: an ensemble
of the searches below, never above any of them), LWC (Lagrange-based worst case, search on c),
F-LWC (fast sign-gradient estimate), the weight PGD baseline, and high-throughput Monte Carlo
over device instances through the multi-instance fused ops."""

from .auto import worst_case
from .flwc import flwc
from .lwc import lwc, margin, margin_loss
from .monte_carlo import MonteCarloResult, instance_seeds, monte_carlo
from .pgd import weight_pgd
from .results import WorstCaseResult
from .tail import TailResult, tail_probability, tail_report

__all__ = [
    "MonteCarloResult",
    "TailResult",
    "WorstCaseResult",
    "flwc",
    "instance_seeds",
    "lwc",
    "margin",
    "margin_loss",
    "monte_carlo",
    "tail_probability",
    "tail_report",
    "weight_pgd",
    "worst_case",
]
