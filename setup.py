"""Build script: the pure-Python package, plus the optional CUDA extension `flowkern._C`.

Build switches (environment variables):
    FLOWKERN_BUILD_CUDA=0   never build the extension;
    FLOWKERN_BUILD_CUDA=1   build it and fail the install if that is impossible;
    unset                   build it when torch has CUDA and nvcc is found, else skip with one line.
    FLOWKERN_CUDA_ARCHS     semicolon-separated compute capabilities (default "8.0;9.0").

The extension needs torch at build time, so install with
``pip install -e . --no-build-isolation`` to build it.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup


def _say(message: str) -> None:
    print(f"flowkern: {message}", file=sys.stderr)


def _cuda_home() -> str | None:
    """The CUDA toolkit root that holds nvcc, or None."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(root, "include")):
            return root
    return None


def cuda_extension_kwargs() -> dict:
    """``ext_modules``/``cmdclass`` for flowkern._C, or {} when it is skipped."""
    switch = os.environ.get("FLOWKERN_BUILD_CUDA", "").strip()
    if switch not in ("", "0", "1"):
        raise SystemExit(f"flowkern: FLOWKERN_BUILD_CUDA must be 0 or 1, got {switch!r}")
    required = switch == "1"

    def skip(reason: str) -> dict:
        if required:
            raise SystemExit(f"flowkern: FLOWKERN_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"skipping the CUDA extension flowkern._C ({reason}); the torch and triton backends still work")
        return {}

    if switch == "0":
        return skip("FLOWKERN_BUILD_CUDA=0")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        return skip("no sources in csrc/")
    try:
        import torch
    except ImportError:
        return skip("torch is not importable at build time; use pip install --no-build-isolation")
    if not torch.version.cuda:
        return skip(f"torch {torch.__version__} has no CUDA")
    cuda_home = _cuda_home()
    if cuda_home is None:
        return skip("nvcc not found")
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    archs = [a for a in os.environ.get("FLOWKERN_CUDA_ARCHS", "8.0;9.0").split(";") if a]
    gencode = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}" for a in archs]
    ext = cpp_extension.CUDAExtension(
        "flowkern._C", sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", *gencode]},
    )
    _say(f"building the CUDA extension flowkern._C with {cuda_home}/bin/nvcc for sm {archs}")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**cuda_extension_kwargs())
