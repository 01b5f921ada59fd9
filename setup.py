"""Build: setuptools for the Python packages, CMake for omniops._C and the per-ISA kernel libraries.

``graph_passes/`` and ``bench/`` live at the top level (design layout) and install as ``omniops.graph_passes``
and ``omniops.bench``. ``OMNI_USE_CPP=0`` skips the C++ build (pure Python: reference + triton backends).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            sys.exit("omniops: CMake >= 3.18 is needed to build omniops._C: `pip install cmake` or "
                     "`apt-get install cmake` (or set OMNI_USE_CPP=0 for a pure-Python install)")
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            sys.exit("omniops: a C++17 compiler is needed to build omniops._C: `apt-get install g++` "
                     "(or set OMNI_USE_CPP=0 for a pure-Python install)")
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.exit("omniops: torch must be installed before building omniops._C; install it, then "
                     "`pip install --no-build-isolation -e .`")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = [
            cmake, str(ROOT), f"-DPython3_EXECUTABLE={sys.executable}", f"-DOMNI_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_CXX_COMPILER={cxx}", "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        if os.environ.get("OMNI_NATIVE") == "1":
            cfg.append("-DOMNI_NATIVE=ON")
        subprocess.check_call(cfg, cwd=build_dir)
        jobs = str(os.cpu_count() or 2)
        subprocess.check_call([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir)
        # _C dlopen()s the kernel libraries from its own directory. setuptools copies only the extension
        # module itself into the source tree for editable installs, so place the libraries there too.
        if self.inplace or getattr(self, "editable_mode", False):
            for lib in out_dir.glob("libomni_kernels_*.so"):
                shutil.copy2(lib, ROOT / "omniops" / lib.name)


ext_modules = [] if os.environ.get("OMNI_USE_CPP", "1") == "0" else [CMakeExtension("omniops._C")]

packages = find_packages(include=["omniops", "omniops.*"]) + ["omniops.graph_passes", "omniops.bench"]

setup(
    packages=packages,
    package_dir={"omniops.graph_passes": "graph_passes", "omniops.bench": "bench"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    include_package_data=False,
    zip_safe=False,
)
