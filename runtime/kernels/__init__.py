"""Our own ExecuTorch kernel, layerskip::row_sdpa.out (row_sdpa.cpp): causal attention over a KV cache that gives a
query row the same bits whatever the number of rows in the call (export/to_pte.py: --pte-attention row_sdpa).

ExecuTorch resolves a program's operators by name when a method loads, so the kernel must be registered in the
process first: `load_row_sdpa()` compiles row_sdpa.cpp against the installed executorch's headers and runtime
library (about a second, once per source, executorch version and machine; a C++17 compiler is needed), caches the
shared library, and loads it, which registers the kernel. An app links row_sdpa.cpp into its ExecuTorch runtime
instead (README, "Running .pte artifacts in an app").
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from runtime.errors import UserError

SOURCE = Path(__file__).with_name("row_sdpa.cpp")
_loaded: list[Path] = []


def cache_dir() -> Path:
    """Where built kernels are kept: $LAYERSKIP_KERNEL_DIR, else ~/.cache/layerskip-edge/kernels."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layerskip-edge" / "kernels"
    return Path(os.environ.get("LAYERSKIP_KERNEL_DIR", default))


def executorch_dirs() -> tuple[Path, Path, str]:
    import executorch
    from executorch.version import __version__

    root = Path(list(executorch.__path__)[0])  # a namespace package: no __file__
    return root / "include", root / "lib", __version__


def compile_command(compiler: str, include: Path, lib: Path, out: Path, source: Path = SOURCE,
                    shared: bool = True, flags: tuple[str, ...] = ()) -> list[str]:
    """The kernel library's build line (or, shared=False, a program's that includes the kernel's source)."""
    # -march=native: the library is built on the machine that runs it (the cache key names the machine)
    return [compiler, "-O3", "-march=native", *flags, "-std=c++17", *(["-fPIC", "-shared"] if shared else []),
            "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_USE_THREADPOOL",
            f"-I{include}", f"-I{include / 'executorch/runtime/core/portable_type/c10'}", str(source),
            f"-L{lib}", "-lexecutorch", "-lexecutorch_threadpool", f"-Wl,-rpath,{lib}", "-o", str(out)]


def library() -> Path:
    """The built kernel library, compiled now if this source, executorch and machine have none yet."""
    include, lib, version = executorch_dirs()
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(SOURCE.read_bytes() + f"{version} {platform.machine()} {_cpu_model()} {compiler}".encode())
    out = cache_dir() / f"librow_sdpa-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    if shutil.which(compiler) is None:
        raise UserError(f"this .pte uses the row_sdpa kernel, built from {SOURCE.name} on first use, and no C++ "
                        f"compiler '{compiler}' was found: install g++ (or set CXX), or export with "
                        f"--pte-attention row_invariant.")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        done = subprocess.run(compile_command(compiler, include, lib, built), capture_output=True, text=True)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0][:200]
            raise UserError(f"building the row_sdpa kernel with {compiler} failed ({first}); check the compiler "
                            f"and the executorch install, or export with --pte-attention row_invariant.")
        os.replace(built, out)  # whole or not at all, also with two processes building at once
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_row_sdpa() -> None:
    """Registers layerskip::row_sdpa.out with ExecuTorch's runtime in this process (once)."""
    if _loaded:
        return
    from executorch.extension.pybindings import portable_lib  # noqa: F401  (the runtime the kernel registers in)

    path = library()
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _loaded.append(path)
