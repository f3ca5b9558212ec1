"""Builds the compiled extension ``r1kernels._C`` through CMake; the package metadata lives in pyproject.toml.

``pip install .``, ``pip install -e .`` and ``python setup.py build_ext --inplace`` all land here. The
extension is configured by ``CMakeLists.txt`` with pybind11 (found through ``pybind11.get_cmake_dir()``)
and the machine's ``cmake`` (>= 3.18) and C++17 compiler; the CUDA part builds when CMake finds ``nvcc``.
Nothing here touches the network or git.

Build knobs (environment variables; a boolean is on for 1/true/yes/on and off for 0/false/no/off/unset):

==================  ==========  =====================================================================
variable            default     effect
==================  ==========  =====================================================================
R1K_NO_EXT          off         build no extension at all: a pure-Python install (reference and Triton
                                backends); ``r1kernels._native.cpu_reason()`` then says why.
R1K_NO_CUDA         off         skip the CUDA part even when nvcc is found (CPU kernels only).
R1K_REQUIRE_CUDA    off         fail the build when nvcc is not found, instead of building CPU-only.
R1K_CUDA_ARCHS      ``90a``     CUDA architectures to compile for, ``;``- or ``,``-separated
                                (``80;90a``); ``sm_90a`` and ``9.0a`` spellings are accepted, as are
                                CMake's ``-real`` / ``-virtual`` suffixes and ``native``, ``all``,
                                ``all-major``. ``90a`` code runs only on sm_90 (H100 / H200).
R1K_BUILD_TYPE      Release     CMake build type: Release, Debug, RelWithDebInfo or MinSizeRel.
R1K_BUILD_JOBS      CPU count   parallel compile jobs (``setup.py build_ext -j N`` also sets it).
R1K_CPU_NATIVE      off         compile the CPU kernels with ``-march=native`` (faster, not portable).
R1K_CMAKE_ARGS      (none)      extra arguments for the CMake configure step, split like a shell
                                command line (e.g. ``-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc``).
==================  ==========  =====================================================================

Also honoured: ``CUDACXX`` (path to nvcc, read by CMake), ``CUDA_HOME`` / ``CUDA_PATH`` (nvcc is taken
from their ``bin/`` when it is not on PATH and CUDACXX is unset) and ``CMAKE_GENERATOR`` (else Ninja
when installed, else CMake's default).
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
_BUILD_TYPES = ("Release", "Debug", "RelWithDebInfo", "MinSizeRel")
_ARCH_WORDS = ("native", "all", "all-major")


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise SystemExit(f"setup.py: {name} must be one of 1/true/yes/on or 0/false/no/off, got {os.environ[name]!r}")


def cuda_archs(raw: str) -> list[str]:
    """Normalise an R1K_CUDA_ARCHS value to CMAKE_CUDA_ARCHITECTURES entries (``"sm_90a, 8.0"`` -> ``["90a", "80"]``)."""
    out = []
    for item in re.split(r"[;,\s]+", raw.strip()):
        if not item:
            continue
        arch = item.lower()
        if arch in _ARCH_WORDS:
            out.append(arch)
            continue
        arch = re.sub(r"^(sm_|compute_)", "", arch).replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?(-real|-virtual)?", arch):
            raise SystemExit(
                f"setup.py: R1K_CUDA_ARCHS entry {item!r} is not a CUDA architecture; expected entries like 90a, "
                f"sm_90a, 9.0a, 80, 80-real, separated by ';' or ','"
            )
        out.append(arch)
    if not out:
        raise SystemExit(f"setup.py: R1K_CUDA_ARCHS is empty ({raw!r}); unset it for the default 90a, or set R1K_NO_CUDA=1")
    return out


class CMakeExtension(Extension):
    """An extension CMake builds; ``sources`` only lists the files so that an sdist carries them."""

    def __init__(self, name: str):
        sources = sorted(
            os.path.relpath(p, ROOT)
            for pattern in ("csrc/**/*.h", "csrc/**/*.cuh", "csrc/**/*.cpp", "csrc/**/*.cu")
            for p in glob.glob(str(ROOT / pattern), recursive=True)
        )
        super().__init__(name, sources=sources + ["CMakeLists.txt"])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise SystemExit(
                "setup.py: cmake (>= 3.18) is not on PATH; install it (apt install cmake, or pip install cmake), "
                "or set R1K_NO_EXT=1 for a pure-Python install without r1kernels._C"
            )
        import pybind11

        # The module goes where setuptools expects it: build/lib... for a wheel, the source tree for
        # --inplace, and setuptools copies it for editable installs.
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)

        build_type = os.environ.get("R1K_BUILD_TYPE", "Release").strip() or "Release"
        if build_type not in _BUILD_TYPES:
            raise SystemExit(f"setup.py: R1K_BUILD_TYPE must be one of {', '.join(_BUILD_TYPES)}, got {build_type!r}")
        no_cuda = _env_flag("R1K_NO_CUDA")
        archs = cuda_archs(os.environ.get("R1K_CUDA_ARCHS", "90a"))

        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DR1K_WITH_CUDA={'OFF' if no_cuda else 'ON'}",
            f"-DR1K_REQUIRE_CUDA={'ON' if _env_flag('R1K_REQUIRE_CUDA') else 'OFF'}",
            f"-DR1K_CUDA_ARCHS={';'.join(archs)}",
            f"-DR1K_CPU_NATIVE={'ON' if _env_flag('R1K_CPU_NATIVE') else 'OFF'}",
        ]
        nvcc = self._nvcc_from_cuda_home()
        if nvcc and not no_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        generator = self._generator(build_dir)
        if generator:
            args += ["-G", generator]
        args += shlex.split(os.environ.get("R1K_CMAKE_ARGS", ""))

        jobs = os.environ.get("R1K_BUILD_JOBS", "").strip()
        if jobs:
            if not jobs.isdigit() or int(jobs) < 1:
                raise SystemExit(f"setup.py: R1K_BUILD_JOBS must be a positive integer, got {jobs!r}")
            n_jobs = int(jobs)
        else:
            n_jobs = self.parallel if isinstance(self.parallel, int) and self.parallel > 0 else (os.cpu_count() or 1)

        t0 = time.perf_counter()
        self._run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args])
        t1 = time.perf_counter()
        self._run([cmake, "--build", str(build_dir), "--config", build_type, "-j", str(n_jobs)])
        t2 = time.perf_counter()
        print(f"r1kernels: _C configured in {t1 - t0:.1f} s, built in {t2 - t1:.1f} s ({n_jobs} jobs) -> {out_dir}")

    @staticmethod
    def _run(cmd: list[str]) -> None:
        print("r1kernels:", " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)

    @staticmethod
    def _nvcc_from_cuda_home() -> str | None:
        """nvcc under CUDA_HOME / CUDA_PATH when nothing else would find it (CMake looks at CUDACXX and PATH)."""
        if os.environ.get("CUDACXX") or shutil.which("nvcc"):
            return None
        for var in ("CUDA_HOME", "CUDA_PATH"):
            home = os.environ.get(var)
            if home and (Path(home) / "bin" / "nvcc").is_file():
                return str(Path(home) / "bin" / "nvcc")
        return None

    @staticmethod
    def _generator(build_dir: Path) -> str | None:
        """Keep the generator a build folder was configured with (CMake refuses to switch); else Ninja if present."""
        if os.environ.get("CMAKE_GENERATOR"):
            return None  # CMake reads it itself
        cache = build_dir / "CMakeCache.txt"
        if cache.is_file():
            m = re.search(r"^CMAKE_GENERATOR:INTERNAL=(.*)$", cache.read_text(errors="replace"), re.M)
            if m:
                return m.group(1)
        return "Ninja" if shutil.which("ninja") else None


ext_modules = [] if _env_flag("R1K_NO_EXT") else [CMakeExtension("r1kernels._C")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
