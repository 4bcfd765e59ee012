"""Typed wrappers of the cimext ops (DESIGN section 5); the kernels live in torch.ops.cimext."""

from ._registry import HAS_CPP
from .bitflip import bit_mask, bitflip, bitflip_
from .hdiag import curv_backward_conv2d, curv_backward_linear, hdiag_conv2d, hdiag_linear
from .noise import gaussian_noise, noise, rcg_noise
from .perturbed_conv2d import perturbed_conv2d
from .perturbed_linear import perturbed_linear
from .sign_step import sign_step_

__all__ = [
    "HAS_CPP",
    "bit_mask",
    "bitflip",
    "bitflip_",
    "curv_backward_conv2d",
    "curv_backward_linear",
    "gaussian_noise",
    "hdiag_conv2d",
    "hdiag_linear",
    "noise",
    "perturbed_conv2d",
    "perturbed_linear",
    "rcg_noise",
    "sign_step_",
]
