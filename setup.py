"""Build cimext._C: the C++ (CPU) kernels always, the CUDA kernels when torch has CUDA.

Environment overrides:
  CIMEXT_CUDA=0   never build the CUDA kernels
  CIMEXT_CUDA=1   require them (fail if torch has no CUDA or no toolkit is found)
  CIMEXT_DEBUG=1  -O0 -g
Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension


def _want_cuda() -> bool:
    flag = os.environ.get("CIMEXT_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    import torch

    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on") and not possible:
        raise RuntimeError(
            "CIMEXT_CUDA=1 but torch.version.cuda is "
            f"{torch.version.cuda!r} and CUDA_HOME is {cpp_extension.CUDA_HOME!r}"
        )
    return possible


def _extension():
    debug = os.environ.get("CIMEXT_DEBUG") == "1"
    # -ffp-contract=off: the noise math must round exactly like the reference (no fused
    # multiply-adds); no -march=native: SIMD paths pick AVX2 at run time.
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-ffp-contract=off", "-fopenmp"]
    sources = ["csrc/cimext.cpp"] + sorted(glob.glob("csrc/common/*.cpp"))
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    if _want_cuda():
        print("cimext: building the CUDA kernels")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "--fmad=false"]
        return cpp_extension.CUDAExtension(
            "cimext._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    print("cimext: building the CPU kernels only (torch has no CUDA, or CIMEXT_CUDA=0)")
    return cpp_extension.CppExtension(
        "cimext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)},
)
