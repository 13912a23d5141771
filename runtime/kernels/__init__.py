"""Our own ExecuTorch kernels: layerskip::row_sdpa.out (row_sdpa.cpp), causal attention over a KV cache that gives a
query row the same bits whatever the number of rows in the call (export/to_pte.py: --pte-attention row_sdpa), and
layerskip::linear_q4.out (linear_q4.cpp), 4-bit linears in integer arithmetic whose rows share one pass over the
weights (quant/linear_q4.py: --pte-linear linear_q4), and layerskip::decoder_layer.out (decoder_layer.cpp), a whole
decoder layer of such a .pte in one call, through the same linear and attention (export/fused_layer.py). The same library carries one call into the runtime that its Python
bindings lack (xnnpack_options.cpp): share_xnnpack_weights() turns on XNNPACK's weight cache.

ONNX Runtime gets the same attention, linear and whole layer as custom operators, layerskip.RowAttention,
layerskip.LinearQ4 and layerskip.DecoderLayer (ort_ops.cpp; --onnx-kv-cache row, --onnx-linear linear_q4,
export/onnx_fused_layer.py), in a library of its own built without ExecuTorch (`ort_ops_library()`), so that an app
decoding .onnx artifacts needs only onnxruntime, numpy and a compiler, or the prebuilt library.

ExecuTorch resolves a program's operators by name when a method loads, so the kernels must be registered in the
process first: `load_kernels()` compiles the sources into one library against the installed executorch's headers
and runtime library (a few seconds, once per source, executorch version and machine; a C++17 compiler is needed),
caches it, and loads it, which registers the kernels. An app links the sources into its ExecuTorch runtime instead
(README, "Running .pte artifacts in an app").
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

SOURCES = tuple(Path(__file__).with_name(f) for f in ("row_sdpa.cpp", "linear_q4.cpp", "decoder_layer.cpp", "xnnpack_options.cpp"))
ORT_SOURCES = (Path(__file__).with_name("ort_ops.cpp"),)
HEADERS = tuple(Path(__file__).with_name(f) for f in ("row_attention.h", "linear_q4.h", "layer_rows.h", "et_kernels.h", "ort_api.h"))  # in both libraries' keys
_loaded: list[ctypes.CDLL] = []  # the kernel library, once loaded


def cache_dir() -> Path:
    """Where built kernels are kept: $LAYERSKIP_KERNEL_DIR, else ~/.cache/layerskip-edge/kernels."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "layerskip-edge" / "kernels"
    return Path(os.environ.get("LAYERSKIP_KERNEL_DIR", default))


def executorch_dirs() -> tuple[Path, Path, str]:
    import executorch
    from executorch.version import __version__

    root = Path(list(executorch.__path__)[0])  # a namespace package: no __file__
    return root / "include", root / "lib", __version__


def compile_command(compiler: str, include: Path, lib: Path, out: Path, sources: tuple[Path, ...] = SOURCES,
                    shared: bool = True, flags: tuple[str, ...] = ()) -> list[str]:
    """The kernel library's build line (or, shared=False, a program's that includes a kernel's source)."""
    # -march=native: the library is built on the machine that runs it (the cache key names the machine)
    return [compiler, "-O3", "-march=native", *flags, "-std=c++17", *(["-fPIC", "-shared"] if shared else []),
            "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_USE_THREADPOOL",
            f"-I{include}", f"-I{include / 'executorch/runtime/core/portable_type/c10'}", *map(str, sources),
            f"-L{lib}", "-lexecutorch", "-lexecutorch_threadpool", f"-Wl,-rpath,{lib}", "-o", str(out)]


def _build(name: str, sources: tuple[Path, ...], extra: str, command, what: str, fallback: str) -> Path:
    """The library `name` built from `sources`, compiled now if these sources (and headers), `extra` and this machine
    have none yet; `command(compiler, out)` is its build line."""
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(b"".join(s.read_bytes() for s in (*sources, *HEADERS))
                         + f"{extra} {platform.machine()} {_cpu_model()} {compiler}".encode())
    out = cache_dir() / f"lib{name}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    if shutil.which(compiler) is None:
        raise UserError(f"{what} uses our kernels, built from {', '.join(s.name for s in sources)} on first use, "
                        f"and no C++ compiler '{compiler}' was found: install g++ (or set CXX), or {fallback}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        done = subprocess.run(command(compiler, built), capture_output=True, text=True)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0][:200]
            raise UserError(f"building our kernels with {compiler} failed ({first}); check the compiler, or "
                            f"{fallback}.")
        os.replace(built, out)  # whole or not at all, also with two processes building at once
    return out


def library() -> Path:
    """The built ExecuTorch kernel library, compiled now if this source, executorch and machine have none yet."""
    include, lib, version = executorch_dirs()
    return _build("layerskip_kernels", SOURCES, version,
                  lambda compiler, out: compile_command(compiler, include, lib, out),
                  "this .pte", "export with --pte-attention row_invariant --pte-linear xnnpack")


def ort_ops_library() -> Path:
    """The built ONNX Runtime custom-op library (layerskip.RowAttention, LinearQ4, DecoderLayer), compiled now if
    needed: needs no ExecuTorch, only a C++17 compiler. SessionOptions.register_custom_ops_library(str(path)) makes a
    session know the ops."""
    return _build("layerskip_ort_ops", ORT_SOURCES, "onnxruntime-abi-13",
                  lambda compiler, out: [compiler, "-O3", "-march=native", "-std=c++17", "-fPIC", "-shared",
                                         "-fvisibility=hidden", *map(str, ORT_SOURCES), "-o", str(out)],
                  "this .onnx artifact (--onnx-kv-cache row)", "re-export with --onnx-kv-cache gqa")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


_torch_ops: dict[str, object] = {}


def define_torch_op(name: str, args: str, compute, fake, out_alias: str = "a") -> None:
    """layerskip::<name>(<args>) -> Tensor and its out form for torch (export and eager), once per process: computed by
    `compute` (the kernel's reference in torch), shaped by `fake` while tracing. ExecuTorch runs the out form through
    our kernel. out_alias: the out tensor's alias set, one that `args` does not name (Tensor(a!) for an input the op
    writes)."""
    if name in _torch_ops:
        return
    import torch

    lib = torch.library.Library("layerskip", "FRAGMENT")
    lib.define(f"{name}({args}) -> Tensor")
    lib.define(f"{name}.out({args}, *, Tensor({out_alias}!) out) -> Tensor({out_alias}!)")
    lib.impl(name, compute, "CompositeExplicitAutograd")
    lib.impl(f"{name}.out", lambda *inputs, out: out.copy_(compute(*inputs)), "CompositeExplicitAutograd")
    torch.library.register_fake(f"layerskip::{name}", fake, lib=lib)
    _torch_ops[name] = lib


def load_kernels() -> None:
    """Registers layerskip::row_sdpa.out and layerskip::linear_q4.out with ExecuTorch's runtime in this process
    (once)."""
    if _loaded:
        return
    from executorch.extension.pybindings import portable_lib  # noqa: F401  (the runtime the kernel registers in)

    path = library()
    _loaded.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))


def share_xnnpack_weights(enabled: bool = True) -> bool:
    """XNNPACK's weight cache on (or off) for the programs this process loads from now on: a weight is packed once and
    every method naming the same constant reuses it, where each method packed its own copy before. The .pte's methods
    share their layers, so a process holding draft, verify, draft_verify and forward keeps one packed copy of each
    layer: less memory, and calls that take turns read the same packed weights (README, "Previous session"). True where the
    runtime took the option."""
    load_kernels()
    return _loaded[0].layerskip_xnnpack_weight_cache(int(enabled)) == 0
