"""Builds the optional MXFP4 CPU kernel; all package metadata lives in pyproject.toml.

The kernel is a plain shared library (gptoss/kernels/libgptoss_mxfp4.so, loaded with ctypes and registered
as an XLA FFI target), not a Python extension module. It is compiled with the system C++ compiler (`$CXX`,
else c++/g++/clang++), against the XLA FFI headers that ship inside the jaxlib wheel (a build requirement in
pyproject.toml; GPTOSS_XLA_FFI_INCLUDE overrides the folder). If it cannot be built, installation still succeeds
and gptoss uses its pure-XLA path, with one warning at run time. GPTOSS_BUILD_KERNEL=0 skips the build.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = Path("csrc")
# translation unit -> (extra flags, macro telling the driver it is there); the ISA units only on x86-64
UNITS = {
    "mxfp4_scalar.cc": ([], None),
    "mxfp4_avx2.cc": (["-mavx2", "-mfma"], "GPTOSS_HAVE_AVX2"),
    "mxfp4_avx512.cc": (["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"], "GPTOSS_HAVE_AVX512"),
    "dense_scalar.cc": ([], None),
    "dense_avx2.cc": (["-mavx2", "-mfma"], "GPTOSS_HAVE_DENSE_AVX2"),
    "dense_avx512.cc": (["-mavx512f", "-mavx512bw", "-mfma"], "GPTOSS_HAVE_DENSE_AVX512"),
    "dense_avx512bf16.cc": (["-mavx512f", "-mavx512bw", "-mavx512bf16", "-mfma"], "GPTOSS_HAVE_DENSE_AVX512BF16"),
    "attention_avx2.cc": (["-mavx2", "-mfma"], "GPTOSS_HAVE_ATTENTION_AVX2"),
    "mxfp4_avx512vnni.cc": (["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni", "-mavx512vbmi",
                             "-mfma"], "GPTOSS_HAVE_AVX512VNNI"),
    "mxfp4_avx512bf16.cc": (["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mfma"],
                            "GPTOSS_HAVE_AVX512BF16"),
    "mxfp4_amx.cc": (["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mfma", "-mamx-tile",
                      "-mamx-bf16"], "GPTOSS_HAVE_AMX"),
    "bf12_avx512.cc": (["-mavx512f", "-mavx512bw", "-mavx512vbmi", "-mavx512bf16"], "GPTOSS_HAVE_BF12_AVX512"),
    "mxfp4_amx_emulated.cc": ([], None),  # the AMX algorithm on emulated tile instructions, for tests on any CPU
}
DRIVER = "mxfp4_matmul.cc"
# compiled without ISA flags, like the driver
COMMON = ["pool.cc", "dense_matmul.cc", "attention_decode.cc", "read_probe.cc", "mxfp4_gemv_input.cc",
          "bf12_matmul.cc"]
HEADERS = ["mxfp4_kernel.h", "mxfp4_tile_loop.h", "mxfp4_tile_t_loop.h", "mxfp4_amx_loop.h", "mxfp4_bf16_block.h",
           "mxfp4_x16.h", "pool.h", "dense_kernel.h", "attention_kernel.h", "bf12_kernel.h", "dp_rows.h"]
BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread"]


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    return None


def _ffi_include() -> str:
    if os.environ.get("GPTOSS_XLA_FFI_INCLUDE"):
        return os.environ["GPTOSS_XLA_FFI_INCLUDE"]
    try:
        import jaxlib
    except ImportError:
        raise RuntimeError("jaxlib (which ships the XLA FFI headers) is not importable at build time") from None
    include = Path(jaxlib.__file__).parent / "include"
    if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise RuntimeError(f"no XLA FFI headers under {include}")
    return str(include)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{proc.stderr[-4000:]}")


def build_kernel(out: Path, tmp: Path) -> list[str]:
    """Compiles and links the library to `out`; returns the ISA units built in. Raises on failure."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    include = _ffi_include()
    tmp.mkdir(parents=True, exist_ok=True)

    def compile_unit(name: str, flags: list[str], defines: list[str] = ()) -> Path:
        obj = tmp / (name + ".o")
        _run([*cxx.split(), *BASE_FLAGS, *flags, *defines, "-isystem", include, "-c", str(CSRC / name), "-o", str(obj)])
        return obj

    units = {name: spec for name, spec in UNITS.items() if x86 or spec[1] is None}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(compile_unit, name, flags) for name, (flags, _) in units.items()}
        objs, built, errors = [], [], []
        for name, fut in futures.items():
            try:
                objs.append(fut.result())
                built.append(name)
            except RuntimeError as e:  # an old compiler without AVX-512 support: build without that path
                if units[name][1] is None:
                    raise
                errors.append(str(e))
    defines = [f"-D{units[name][1]}" for name in built if units[name][1]]
    objs.append(compile_unit(DRIVER, [], defines))
    objs.extend(compile_unit(name, []) for name in COMMON)
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([*cxx.split(), "-shared", "-pthread", "-o", str(out), *map(str, objs)])
    for e in errors:
        print(f"gptoss: an optional kernel variant did not compile:\n{e}", file=sys.stderr)
    return built


class BuildKernel(build_ext):
    """build_ext for the one optional, non-Python shared library."""

    def get_ext_filename(self, fullname: str) -> str:
        return os.path.join(*fullname.split(".")) + ".so"  # libgptoss_mxfp4.so, no Python ABI tag

    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name))
        # a library left by an earlier build must not be packaged (or, editable, kept) in place of this one
        stale = [out] + ([Path(*ext.name.split(".")).with_suffix(".so")] if self.editable_mode else [])
        for path in stale:
            path.unlink(missing_ok=True)
        if os.environ.get("GPTOSS_BUILD_KERNEL", "1") == "0":
            print("gptoss: GPTOSS_BUILD_KERNEL=0, skipping the MXFP4 CPU kernel", file=sys.stderr)
            return
        try:
            with tempfile.TemporaryDirectory() as tmp:
                built = build_kernel(out, Path(tmp))
            print(f"gptoss: built {out} ({', '.join(built)})", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - never fail the install over the optional kernel
            print(f"gptoss: WARNING: the MXFP4 CPU kernel was not built; gptoss will use its pure-XLA path.\n{e}",
                  file=sys.stderr)


setup(
    ext_modules=[
        Extension(
            "gptoss.kernels.libgptoss_mxfp4",
            sources=[str(CSRC / DRIVER), *(str(CSRC / u) for u in [*COMMON, *UNITS])],
            depends=[str(CSRC / h) for h in HEADERS],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildKernel},
)
