"""The ONNX Runtime backend: draft.onnx / verify.onnx (and forward.onnx) with I/O binding.

Nothing large is copied between calls: each layer's KV cache is one buffer bound as both the
`past` input and the `present` output (the attention op updates it in place), and the layer-E
hidden states are written by `draft` straight into the exit cache and read from it by `verify`,
by binding pointers into that buffer.

Default int4 artifacts attend and multiply through our custom ops (layerskip.RowAttention and
layerskip.LinearQ4, runtime/kernels/ort_ops.cpp; the session registers their library): every call
gives a row the bits it has alone (rows_alike), so no call is padded and greedy self-speculation,
with or without lookup, equals plain decoding by construction. What follows is the rule for graphs
with ONNX Runtime's own ops (--onnx-kv-cache gqa, --onnx-linear matmulnbits), which do not:

Verify calls carry at least 2 rows, and an even number at MatMulNBits blocks of 64 and more. ONNX
Runtime's CPU kernels compute a row with other bits when it is alone: GroupQueryAttention at one
query row, and MatMulNBits at blocks >= 64 (4 and 8 bits) for the last row of an odd count, which it
computes apart from the pairs before it (fp32 MatMul and blocks of 16 / 32 give every row of 2..9-row
calls the same bits). int8 activations turn those last bits into tenths of a logit over a real
model's layers. So padded, a token's verify logits have the same bits in a d+1-token verify as in a
1-token one (tested), and greedy self-speculation equals plain decoding (draft + verify) by
construction. The extra row is the one before the call, recomputed from its exit-cache row to the
bits it already has (at position 0, the row after, never read before it is written again).
Artifacts exported with --pad-drafts pad draft calls the same way (the row before, from its token id,
recomputed to the bits it has; at position 0 a copy of the last token after, written again before it
is read, so that a padded draft at position 0 returns that copy's exit logits, which prefill, the one
caller there, does not read): then a multi-row draft of tokens looked up in the context (--lookup)
gives each row the bits of plain decoding's 1-row draft calls, and greedy output with --lookup equals
plain decoding by construction too. This
holds for the default (gqa) graphs; the sdpa variant's softmax runs over past and new keys as two
blocks whose boundary moves with the call, so there a row's bits still depend on where the call starts.

With the CUDA provider the exit cache lives on the GPU and the KV caches stay on the host: ONNX
Runtime's CUDA GroupQueryAttention takes fp16/bf16 only, so in our fp32-activation graphs that node
runs on the CPU provider and updates the cache in place only where the cache is host memory (with
caches bound on the GPU, the first call's logits matched the CPU provider's and every later call's
were wrong, on an H100); the standard-ops (sdpa) graphs read a host cache like any input. Tokens,
positions and logits cross to the host too.
"""

from __future__ import annotations

import ctypes
import os
from typing import Optional

import numpy as np

from runtime.artifact import (Manifest, cache_input_names, cache_output_names, check_fact, method_layers,
                              uses_our_onnx_ops)
from runtime.errors import UserError

FLOAT_BYTES = 4


def physical_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise UserError("--provider cuda needs onnxruntime-gpu and an NVIDIA GPU, and this onnxruntime has no "
                        "CUDA provider: pip install '.[cuda]' on a machine with a GPU, or use --provider cpu.")
    return ["CUDAExecutionProvider"]


def session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    # Two sessions take turns: a pool spinning after its call would steal the other's cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Memory for an app: without the CPU arena the two sessions return what they free to one heap
    # (-3 MB peak RSS on the shipped int4 model, torch-free: 92 -> 89 MB); without memory patterns
    # (planned per input shape, and our token counts vary) and with initializers outside any arena,
    # another -1 MB (80.2-80.5 -> 79.3 MB). Decode speed was unchanged within this machine's noise.
    # Our buffers (KV caches, exit cache, logits) are bound once and never come from ONNX Runtime.
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    so.log_severity_level = 3
    return so


class OnnxMethod:
    """One graph's session and a reusable I/O binding with its KV caches bound once."""

    def __init__(self, manifest: Manifest, name: str, device: str, threads: int, caches: list):
        import onnxruntime as ort

        path = manifest.path(name)
        options = session_options(threads)
        if uses_our_onnx_ops(manifest.extra.get("kv_cache"), manifest.extra.get("linear")):
            from runtime.kernels import ort_ops_library

            options.register_custom_ops_library(str(ort_ops_library()))
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            first = str(e).splitlines()[0][:200]
            raise UserError(f"'{path}' could not be loaded by ONNX Runtime ({first}); the artifact is corrupt "
                            f"or incomplete: re-export it.") from None
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise UserError("ONNX Runtime could not start its CUDA provider: no usable NVIDIA GPU was found; "
                            "use --provider cpu.")
        meta = self.session.get_modelmeta().custom_metadata_map
        check_fact(manifest, f"{name}.onnx exit_layer", int(meta["layerskip.exit_layer"]), manifest.exit_layer)
        check_fact(manifest, f"{name}.onnx max_seq_len", int(meta["layerskip.max_seq_len"]), manifest.max_seq_len)
        self.device = device
        self.binding = self.session.io_binding()
        # Tokens, position and logits have fixed pointers: each is bound again only when its shape
        # changes (a bind costs ~1 us of Python, a call ~200 us). 0 / None / False: not bound yet.
        self.token_rows = 0
        self.logits_shape: Optional[tuple] = None
        self.position_bound = False
        self.layers = method_layers(name, manifest.exit_layer, manifest.shape.num_layers)
        self.present_names = cache_output_names(self.layers)
        self.shared_cache = meta.get("layerskip.kv_cache", "gqa") in ("gqa", "row")
        self.past_buffers: list[tuple[str, object]] = []
        for i, past, present in zip([l for l in self.layers for _ in (0, 1)], cache_input_names(self.layers),
                                    cache_output_names(self.layers)):
            buffer = caches[i][0 if past.startswith("past_key") else 1]
            self.binding.bind_ortvalue_input(past, buffer)
            self.past_buffers.append((past, buffer))
            if self.shared_cache:
                self.binding.bind_ortvalue_output(present, buffer)
            else:
                self.binding.bind_output(present, "cpu")

    @property
    def rebind_host_inputs(self) -> bool:
        """ONNX Runtime copies an input held elsewhere than the device that reads it when it is bound,
        not when the graph runs: host inputs of a CUDA session are bound again every call."""
        return self.device != "cpu"

    def bind_pointer(self, name: str, is_output: bool, device: str, shape, pointer: int,
                     dtype=np.float32) -> None:
        bind = self.binding.bind_output if is_output else self.binding.bind_input
        bind(name, device, 0, dtype, list(shape), pointer)

    def run(self) -> None:
        if not self.shared_cache:
            if self.device != "cpu":  # host caches read by CUDA nodes: bound again (copied)
                for past, buffer in self.past_buffers:
                    self.binding.bind_ortvalue_input(past, buffer)
            for name in self.present_names:  # new rows have a new shape each call: ONNX Runtime allocates them
                self.binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(self.binding)

    def write_new_rows(self, caches: list, pos: int) -> None:
        """For graphs without the shared-buffer op: copy the new K/V rows into the host caches."""
        if self.shared_cache:
            return
        outputs = self.binding.get_outputs()[:2 * len(self.layers)]  # in binding order: the caches came first
        for j, i in enumerate(self.layers):
            for kv in (0, 1):
                new = outputs[2 * j + kv].numpy()  # [1, H_kv, T, D]
                host = np.ctypeslib.as_array(ctypes.cast(caches[i][kv].data_ptr(), ctypes.POINTER(ctypes.c_float)),
                                             shape=caches[i][kv].shape())
                host[:, :, pos:pos + new.shape[2]] = new


class OnnxBackend:
    def __init__(self, manifest: Manifest, provider: str = "cpu", threads: int = 0,
                 preload: Optional[tuple[str, ...]] = None):
        import onnxruntime as ort

        self.name = f"onnxruntime-{provider}"
        self.device = provider
        self.threads = threads
        self.manifest = manifest
        c = manifest.shape
        self.exit_layer = manifest.exit_layer
        self.num_layers = c.num_layers
        self.max_seq_len = manifest.max_seq_len
        self.max_tokens_per_call = manifest.max_tokens_per_call
        self.dim = c.hidden_size
        providers_for(provider)  # a clear error before any allocation
        self._host_arrays: dict[int, np.ndarray] = {}
        shape = [1, c.num_kv_heads, self.max_seq_len, c.head_dim]
        self.caches = [(self._host_buffer(ort, shape), self._host_buffer(ort, shape)) for _ in range(self.num_layers)]
        self.exit_cache = self._buffer(ort, [self.max_seq_len, self.dim])
        self._exit_cache_pointer = self.exit_cache.data_ptr()
        self.logits = np.zeros((self.max_tokens_per_call + 1, c.vocab_size), np.float32)  # + a pairing row
        self.verify_row_multiple = 2 if (manifest.quant != "none" and manifest.group_size >= 64
                                         and manifest.extra.get("linear") != "linear_q4") else 1
        # GroupQueryAttention computes one query row apart: its calls take 2 rows or more; ours need not
        self.min_rows = 1 if manifest.extra.get("kv_cache") == "row" else 2
        # every call gives a row the bits it has alone, unpadded (our attention op, and fp32 MatMul or our linear op)
        self.rows_alike = self.min_rows == 1 and self.verify_row_multiple == 1
        self.pad_drafts = bool(manifest.extra.get("pad_drafts"))  # module docstring
        self.has_draft_verify = "draft_verify" in manifest.methods
        # --lookup's K and its runs' K measured best for this model (export/pipeline.py: lookup_defaults), or None
        self.default_lookup, self.lookup_run = manifest.extra.get("lookup"), manifest.extra.get("lookup_run")
        self.token_ids = np.zeros(self.max_seq_len, np.int64)  # the token drafted at each position (--pad-drafts)
        # token ids and position live in two host arrays bound by pointer: a call writes them in place
        self.tokens = np.zeros((1, self.max_tokens_per_call + 1), np.int64)  # + a padding row (--pad-drafts)
        self.position = np.zeros(1, np.int64)
        self._tokens_pointer, self._position_pointer = self.tokens.ctypes.data, self.position.ctypes.data
        self._logits_pointer = self.logits.ctypes.data
        self._last_logits = (1, c.vocab_size)  # the shape draft and forward write: the last row's logits
        # Sessions are created when first used (each holds its own weights), `preload` up front.
        self._sessions: dict[str, OnnxMethod] = {}
        default = ("draft", "verify") + (("draft_verify",) if self.has_draft_verify else ())
        for name in preload if preload is not None else default:
            self._get(name)

    def _get(self, name: str) -> OnnxMethod:
        if name not in self._sessions:
            self._sessions[name] = OnnxMethod(self.manifest, name, self.device, self.threads, self.caches)
        return self._sessions[name]

    def _host_buffer(self, ort, shape):
        host = np.zeros(shape, np.float32)
        self._host_arrays[id(host)] = host  # an OrtValue made from numpy borrows its memory: keep it alive
        return ort.OrtValue.ortvalue_from_numpy(host)

    def _buffer(self, ort, shape):
        """On the provider's device: host memory for cpu, GPU memory for cuda."""
        if self.device == "cpu":
            return self._host_buffer(ort, shape)
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)

    def _exit_rows(self, pos: int) -> int:
        return self._exit_cache_pointer + pos * self.dim * FLOAT_BYTES

    # The calls below are the Python between two graph runs: they write tokens and position in place
    # and bind only what changed (binding all every call was 5 us of Python per 210 us full-model call,
    # where ORT GenAI's C++ loop adds ~0-2 us to its graph).

    def _bind_logits(self, method: OnnxMethod, shape: tuple) -> None:
        if method.logits_shape != shape:
            method.bind_pointer("logits", True, "cpu", shape, self._logits_pointer)
            method.logits_shape = shape

    def _set_tokens(self, method: OnnxMethod, tokens, pos: int) -> None:
        t = len(tokens)
        if t == 1:
            self.tokens[0, 0] = tokens[0]
        else:
            self.tokens[0, :t] = tokens
        if method.token_rows != t or method.rebind_host_inputs:
            method.bind_pointer("tokens", False, "cpu", (1, t), self._tokens_pointer, np.int64)
            method.token_rows = t
        self._set_position(method, pos)

    def _set_position(self, method: OnnxMethod, pos: int) -> None:
        self.position[0] = pos
        if not method.position_bound or method.rebind_host_inputs:
            method.bind_pointer("input_pos", False, "cpu", (1,), self._position_pointer, np.int64)
            method.position_bound = True

    def padded_rows(self, count: int) -> int:
        """The rows a call of `count` rows reaches ONNX Runtime with when padded (module docstring)."""
        return max(self.min_rows, count + count % self.verify_row_multiple)

    def padded_tokens(self, tokens, pos) -> tuple[list, int]:
        """(tokens, start) of a draft-like call of `tokens` at pos as it reaches ONNX Runtime (--pad-drafts,
        module docstring): the token before added, or at position 0 a copy of the last one after."""
        count = len(tokens)
        self.token_ids[pos:pos + count] = tokens
        if self.padded_rows(count) == count:
            return tokens, pos
        if pos > 0:
            return [int(self.token_ids[pos - 1]), *tokens], pos - 1
        return [*tokens, tokens[-1]], pos

    def draft(self, tokens, pos):
        return self.draft_rows(*(self.padded_tokens(tokens, pos) if self.pad_drafts else (tokens, pos)))

    def draft_verify(self, tokens, pos):
        """draft and verify in one call (artifacts with that method), padded as a draft call is: logits [count, V]."""
        rows, start = self.padded_tokens(tokens, pos)
        m = self._get("draft_verify")
        self._set_tokens(m, rows, start)
        m.bind_pointer("hidden", True, self.device, (1, len(rows), self.dim), self._exit_rows(start))
        self._bind_logits(m, (1, len(rows), self.logits.shape[1]))
        m.run()
        m.write_new_rows(self.caches, start)
        return self.logits[pos - start:pos - start + len(tokens)]

    def draft_guess(self, tokens, pos):
        """The exit logits [V] of a draft call unpadded (draft_rows), where draft() pads it (--pad-drafts): at one
        row ONNX Runtime's fast path, 132 vs 190 us at position 250 on the shipped model at int4
        (results/probe_exit_guesses.txt), with other bits than the padded call's. Only for drafts whose rows a
        draft_verify call computes again before anything reads them (decoding.exit_guess_step: it starts at the
        same position and covers these rows)."""
        return self.draft_rows(tokens, pos)

    @property
    def has_draft_guess(self) -> bool:
        return self.pad_drafts

    def draft_rows(self, tokens, pos):
        """draft.onnx on the tokens as given (no padding): the last one's exit logits [V]."""
        m = self._get("draft")
        self._set_tokens(m, tokens, pos)
        m.bind_pointer("hidden", True, self.device, (1, len(tokens), self.dim), self._exit_rows(pos))
        self._bind_logits(m, self._last_logits)
        m.run()
        m.write_new_rows(self.caches, pos)
        return self.logits[0]  # a view, valid until the next call

    def verify(self, pos, count):
        start, rows = pos, self.padded_rows(count)
        if rows > count and pos > 0:
            start = pos - 1
        return self.verify_rows(start, rows)[pos - start:pos - start + count]

    def verify_rows(self, start, rows):
        """verify.onnx on exit-cache rows start .. start+rows-1 as they are (no padding): logits [rows, V]."""
        m = self._get("verify")
        m.bind_pointer("hidden", False, self.device, (1, rows, self.dim), self._exit_rows(start))
        self._set_position(m, start)
        self._bind_logits(m, (1, rows, self.logits.shape[1]))
        m.run()
        m.write_new_rows(self.caches, start)
        return self.logits[:rows]

    def forward(self, tokens, pos):
        m = self._get("forward")
        self._set_tokens(m, tokens, pos)
        self._bind_logits(m, self._last_logits)
        m.run()
        m.write_new_rows(self.caches, pos)
        return self.logits[0]

    def reset(self):
        pass  # attention reads only positions below the current one: stale rows are never seen
