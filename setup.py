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
import re
import shutil
import subprocess
import sys

from setuptools import setup


def _say(message: str) -> None:
    print(f"flowkern: {message}", file=sys.stderr)


def _nvcc_release(nvcc: str) -> str | None:
    """The release (e.g. "13.0") that `nvcc --version` reports, or None when it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out.stdout) if out.returncode == 0 else None
    return f"{found.group(1)}.{found.group(2)}" if found else None


def _find_toolkit() -> tuple[str | None, str | None, str]:
    """(root, nvcc release, "") of the first CUDA toolkit whose nvcc runs, else (None, None, what was tried).

    Candidates in torch's order: $CUDA_HOME, $CUDA_PATH, the nvcc on PATH, /usr/local/cuda. A root
    counts only if bin/nvcc exists and runs and include/cuda_runtime.h exists, so a wrapper script
    on PATH or a dangling /usr/local/cuda is not mistaken for a toolkit.
    """
    candidates = [(f"{var}={os.environ[var]}", os.environ[var]) for var in ("CUDA_HOME", "CUDA_PATH")
                  if os.environ.get(var)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append((f"PATH nvcc {nvcc}", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))))
    candidates.append(("/usr/local/cuda", "/usr/local/cuda"))
    tried = []
    for label, root in candidates:
        if not os.path.isfile(os.path.join(root, "bin", "nvcc")):
            tried.append(f"{label}: no bin/nvcc")
        elif not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            tried.append(f"{label}: no include/cuda_runtime.h")
        else:
            release = _nvcc_release(os.path.join(root, "bin", "nvcc"))
            if release is not None:
                return root, release, ""
            tried.append(f"{label}: bin/nvcc does not run")
    return None, None, "; ".join(tried)


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
    cuda_home, release, tried = _find_toolkit()
    if cuda_home is None:
        return skip(f"nvcc not found: {tried}")
    if release.split(".")[0] != torch.version.cuda.split(".")[0]:
        return skip(f"nvcc {release} in {cuda_home} does not match the CUDA {torch.version.cuda} of torch "
                    f"{torch.__version__} (the major versions must agree)")
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    archs = [a for a in os.environ.get("FLOWKERN_CUDA_ARCHS", "8.0;9.0").split(";") if a]
    gencode = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}" for a in archs]
    ext = cpp_extension.CUDAExtension(
        "flowkern._C", sources,
        # No --use_fast_math: approximate division and flushed denormals would move normalised
        # scores across the threshold and break exact parity with the torch reference.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},
    )
    _say(f"building the CUDA extension flowkern._C with nvcc {release} ({cuda_home}) for sm {archs}")
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**cuda_extension_kwargs())
