"""cimext: fused kernels for worst-case analysis and protection of DNNs on compute-in-memory
accelerators. See README.md and DESIGN.md."""

from . import bitflip, data, models, nn, ops, reference, train, writeverify
from .backend import backend, get_backend, set_backend
from .device import DeviceModel
from .nn import QuantConfig, cim_layers, clean, convert, instance, perturbation, sampling, unconvert

__version__ = "0.1.0"
__all__ = [
    "bitflip",
    "DeviceModel",
    "QuantConfig",
    "backend",
    "cim_layers",
    "clean",
    "convert",
    "data",
    "get_backend",
    "instance",
    "models",
    "nn",
    "ops",
    "perturbation",
    "reference",
    "sampling",
    "set_backend",
    "train",
    "unconvert",
    "writeverify",
]
