"""Lowering to ExecuTorch: one .pte holding the draft, verify and full-model methods.

Weights are stored once (the serializer keys constant data by content, so the LM head and final norm
shared by the methods appear once) and one KV cache is shared by all methods (with --pte-attention row_sdpa, the
default, they all attend through our kernel, runtime/kernels/row_sdpa.cpp)
(MemoryPlanningPass(share_mutable_buffers=True); without it the methods would each see their own).
The methods are traced and delegated in up to one process per core (trace_and_lower); the process
that finishes lowering first hands its programs to the other, which serializes the .pte.
"""

from __future__ import annotations

import logging
import operator
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim, ExportedProgram, export

from export.idle_passes import delegates_not_rerun, idle_passes_skipped
from export.methods import example_inputs, has_dynamic_tokens, method_module
from models.model import Attention, RMSNorm, Transformer


def load_custom_ops() -> None:
    """Registers llama::update_cache / llama::custom_sdpa with torch (export) and the runtime (kernels)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


class CustomOpKVCache(nn.Module):
    """ExecuTorch's fused cache ops: write K/V at start_pos, attend causally over 0 .. start_pos+T-1 only.

    The cache layout is [1, S, H_kv, D] (sequence second), as the custom ops expect.
    """

    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.register_buffer("k", torch.zeros(1, max_seq_len, n_kv_heads, head_dim), persistent=False)
        self.register_buffer("v", torch.zeros(1, max_seq_len, n_kv_heads, head_dim), persistent=False)

    def attend_sequence_first(self, q, k, v, positions):
        """q: [1, T, H, D]; k, v: [1, T, H_kv, D] -> [1, T, H, D]."""
        start = positions[0].item()
        torch._check(start >= 0)
        torch._check(start < self.k.shape[1])
        torch.ops.llama.update_cache(k, self.k, start)
        torch.ops.llama.update_cache(v, self.v, start)
        return self.attend(q, start)

    def attend(self, q, start):
        """q: [1, T, H, D] at positions start .. start+T-1, over the written cache -> [1, T, H, D]."""
        return torch.ops.llama.custom_sdpa(q, self.k, self.v, start, None, 0, True)


def row_sdpa(q, k_cache, v_cache, start_pos):
    """layerskip::row_sdpa in torch: q: [1, T, H, D]; caches [1, S, H_kv, D] -> [1, T, H, D], row t attending keys
    0 .. start_pos + t. Our kernel (runtime/kernels/row_sdpa.cpp) gives these rows to ~1e-6."""
    t, h, d = q.shape[1:]
    end, group = start_pos + t, h // k_cache.shape[2]
    k = k_cache[0, :end].transpose(0, 1).repeat_interleave(group, 0)  # [H, L, D]
    v = v_cache[0, :end].transpose(0, 1).repeat_interleave(group, 0)
    scores = q[0].transpose(0, 1) @ k.transpose(1, 2) * d ** -0.5  # [H, T, L]
    causal = torch.ones(t, end, dtype=torch.bool).tril(start_pos)
    y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # [H, T, D]
    return y.transpose(0, 1).unsqueeze(0).contiguous()


def define_row_sdpa_op() -> None:
    from runtime.kernels import define_torch_op

    define_torch_op("row_sdpa", "Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos", row_sdpa,
                    lambda q, k_cache, v_cache, start_pos: torch.empty_like(q))


class RowSdpaKVCache(CustomOpKVCache):
    """--pte-attention row_sdpa: llama::update_cache's cache, attended through our kernel layerskip::row_sdpa
    (runtime/kernels/row_sdpa.cpp), which gives a query row the same bits whatever the number of rows in the
    call. Every method attends this way on one set of caches, the full-model method too: greedy
    self-speculation and lookup equal plain decoding through the fast full call by construction, and a
    one-row call costs what custom_sdpa's does."""

    def attend(self, q, start):
        return torch.ops.layerskip.row_sdpa(q, self.k, self.v, start)


class KeyMask:
    """The additive attention mask of the call being traced, [T, L]: 0 where key position <= the row's
    position, -inf after; L = the keys the call attends to (pos + T at run time). An input of the methods in
    model.key_mask_methods (WithKeyMask: verify; draft too with row_invariant_drafts), read by their
    RowInvariantKVCache layers; None while the other methods are traced."""

    current: Optional[torch.Tensor] = None


class WithKeyMask(nn.Module):
    """A method with one more input, the key mask [T, L], made available to the layers as they run."""

    def __init__(self, method: nn.Module, key_mask: KeyMask):
        super().__init__()
        self.method, self.key_mask = method, key_mask

    def forward(self, x, input_pos, mask):
        self.key_mask.current = mask
        return self.method(x, input_pos)


class RowInvariantKVCache(nn.Module):
    """A cache whose attention gives a query row the same bits whatever the number of rows in the call.

    ExecuTorch's custom_sdpa picks its GEMM by the number of query rows, so a row of a 5-token verify
    rounds differently from the same row decoded alone; 8-bit activations can amplify that into a
    different greedy token (SmolLM2-135M at int4: 8 of 10 prompts). Here a call attends over its first L
    cache positions (L = pos + T, the key mask's width) in XNNPACK ops, per KV head:
    s = q [T*G, D] @ K^T [D, L]; w = exp(s - max(s)); [w @ V, w @ 1] = w @ [V | 1] [L, D + 1]; their ratio.
    Every one of them computes a row on its own; the matmuls add over L in order, so a key the row may
    not see (weight exactly 0) adds exactly 0; a max is exact in any order. So a row gets the same bits
    as one of 5 in a verify (L = pos + 5) as decoded alone (L = its position + 1). (XNNPACK's softmax
    in place of exp and the ones column did not: with L varying, 2 of 10 SmolLM2 prompts diverged.)

    Layouts (written by llama::update_cache, which writes rows start .. start+T-1 of dim 1 for each
    index of dim 0): K transposed [H_kv * D, S + 1, 1, 1], so that K^T is a view; V with a column of
    ones [H_kv, S + 1, 1, D + 1]. (One row more than positions: a slice of all rows would be no slice, a
    special case that torch.export refuses for a dynamic length.) The first L rows are copied out each
    call (outside XNNPACK, which takes no slice of a length known only at run time).

    Only the methods traced with a key mask (verify; draft too with row_invariant_drafts, in every layer)
    attend this way. The full-model method attends
    through custom_sdpa on a cache of its own (`plain`), so plain decoding keeps custom_sdpa's speed at
    one row, where this attention costs more (shipped model: 0.29 vs 0.22 ms per full call); the two
    decoders never share a generation's cache. Its buffers are memory even when only draft and verify
    run (ExecuTorch allocates every method's cache when the program loads): peak RSS of self-speculation
    +8 MB on the shipped model, +62 MB on SmolLM2-135M at 2048 positions (custom_sdpa: one set of caches).
    """

    def __init__(self, max_seq_len: int, n_kv_heads: int, head_dim: int, key_mask: KeyMask):
        super().__init__()
        self.register_buffer("k_t", torch.zeros(n_kv_heads * head_dim, max_seq_len + 1, 1, 1), persistent=False)
        self.register_buffer("v", torch.zeros(n_kv_heads, max_seq_len + 1, 1, head_dim + 1), persistent=False)
        self.key_mask = key_mask
        self.plain = CustomOpKVCache(max_seq_len, n_kv_heads, head_dim)  # the full-model method's cache

    def attend_sequence_first(self, q, k, v, positions):
        """q: [1, T, H, D]; k, v: [1, T, H_kv, D]; positions: [T] -> [1, T, H, D]."""
        if self.key_mask.current is None:  # the full-model method
            return self.plain.attend_sequence_first(q, k, v, positions)
        h_kv, rows, d = self.v.shape[0], self.v.shape[1], q.shape[3]
        h = q.shape[2]
        g = h // h_kv  # query heads per KV head
        start = positions[0].item()
        torch._check(start >= 0)
        torch._check(start < rows - 1)
        # [1, T, H_kv, D] -> [H_kv, D, T] -> [H_kv * D, T, 1, 1]; and -> [H_kv, T, 1, D]
        torch.ops.llama.update_cache(k.permute(2, 3, 1, 0).contiguous().view(h_kv * d, -1, 1, 1), self.k_t, start)
        ones = torch.ones_like(v[..., :1])
        torch.ops.llama.update_cache(torch.cat([v, ones], -1).permute(2, 1, 0, 3).contiguous(), self.v, start)
        mask = self.key_mask.current  # [T, L]
        keys = mask.shape[1]
        k_t = self.k_t.view(h_kv * d, rows)[:, :keys].contiguous().view(h_kv, d, -1)  # [H_kv, D, L]
        v1 = self.v.view(h_kv, rows, d + 1)[:, :keys]  # [H_kv, L, D + 1]: V and a column of ones
        q = q.view(-1, h_kv, g, d).permute(1, 0, 2, 3).contiguous().view(h_kv, -1, d)  # [H_kv, T*G, D]
        scores = torch.bmm(q, k_t)  # [H_kv, T*G, L]
        scores = (scores.view(h_kv, -1, g, keys) * d ** -0.5 + mask.view(1, -1, 1, keys)).view(h_kv, -1, keys)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))  # unnormalized softmax
        y = torch.bmm(weights, v1)  # [H_kv, T*G, D + 1]: weighted sums of V, and the weights' sum
        y = y[..., :d] / y[..., d:]
        return y.view(h_kv, -1, g, d).permute(1, 0, 2, 3).contiguous().view(1, -1, h, d)


class XnnpackAttention(nn.Module):
    """A layer's attention in the ops XNNPACK delegates while the token count T is dynamic: views with
    -1 for T (a symbolic size is not delegated), no transposes (the custom ops take [1, T, H, D]), and
    the rotary's rotate-half as a linear with a +-1 permutation matrix (exact; a dynamic slice is not
    delegated). The same projections, so quantized weights are shared as they are."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.qkv_proj, self.qkv_sizes = None, None  # q, k and v as one linear (quant.linear_q4.join_projections)
        d, half = self.head_dim, self.head_dim // 2
        rotate = torch.zeros(d, d)  # rotate_half(x) == x @ rotate.T: [-x[half:], x[:half]]
        rotate[torch.arange(half), torch.arange(half) + half] = -1.0
        rotate[torch.arange(half) + half, torch.arange(half)] = 1.0
        self.register_buffer("rotate", rotate, persistent=False)

    def forward(self, x, cos, sin, positions, cache: CustomOpKVCache):
        d = self.head_dim
        # x: [1, T, dim] -> q: [1, T, H, D], k/v: [1, T, H_kv, D]; cos, sin: [T, D] -> [T, 1, D]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, -1)  # [1, T, (H + 2 H_kv) D] -> three
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(1, -1, self.n_heads, d)
        k = k.view(1, -1, self.n_kv_heads, d)
        v = v.view(1, -1, self.n_kv_heads, d)
        cos, sin = cos.view(-1, 1, d), sin.view(-1, 1, d)
        q = q * cos + F.linear(q, self.rotate) * sin
        k = k * cos + F.linear(k, self.rotate) * sin
        y = cache.attend_sequence_first(q, k, v, positions)
        return self.o_proj(y.view(1, -1, self.n_heads * d))


class XnnpackRMSNorm(nn.Module):
    """RMSNorm with the mean of squares as a linear (XNNPACK delegates mean only over 4-D inputs)."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        dim = norm.weight.shape[0]
        self.register_buffer("mean_weight", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(F.linear(x * x, self.mean_weight) + self.eps))


def prepare_for_executorch(model: Transformer, max_seq_len: int, attention: str = "custom_sdpa",
                           exit_layer: int = 0) -> Transformer:
    """Source transformation for the .pte (after quantization): the model's caches become ExecuTorch
    custom-op caches, and attention and norms the forms XNNPACK delegates whole. Each layer used to
    fall into ~6 delegated partitions around undelegated views, slices and means; now it is two (before
    and after the cache ops): the shipped model's full call 0.348 -> 0.328 ms at 8da4w, lowering
    faster (fewer partitions to compile).

    attention "row_sdpa" (export.py's default): every layer holds a RowSdpaKVCache, and every method attends
    through our kernel on one set of caches. "row_invariant" (the default before): layers >= exit_layer hold a
    RowInvariantKVCache, through which
    the verify method attends. Those are the only layers where a token meets different row counts in the
    two decoders (a d+1-token verify against 1-token calls); drafts are 1-token calls in both, and prompts
    go through in the same chunks. "row_invariant_drafts": every layer does, and the draft method attends
    through them too, so that a multi-row draft of tokens looked up in the context (runtime --lookup) gives
    each row the bits of a 1-token draft; 1-token drafts pay the row-invariant attention's cost for it."""
    load_custom_ops()
    c = model.config
    row_invariant = attention in ("row_invariant", "row_invariant_drafts")
    model.key_mask = KeyMask() if row_invariant else None  # then these methods take a key mask:
    model.key_mask_methods = ("draft", "verify", "draft_verify") if attention == "row_invariant_drafts" else ("verify",)
    first_row_invariant = 0 if attention == "row_invariant_drafts" else exit_layer

    if attention == "row_sdpa":
        define_row_sdpa_op()

    def cache(layer: int) -> nn.Module:
        if attention == "row_sdpa":
            return RowSdpaKVCache(max_seq_len, c.num_key_value_heads, c.head_dim)
        if model.key_mask is not None and layer >= first_row_invariant:
            return RowInvariantKVCache(max_seq_len, c.num_key_value_heads, c.head_dim, model.key_mask)
        return CustomOpKVCache(max_seq_len, c.num_key_value_heads, c.head_dim)

    model.caches = nn.ModuleList(cache(i) for i in range(c.num_hidden_layers))
    for layer in model.layers:
        layer.self_attn = XnnpackAttention(layer.self_attn)
        layer.input_layernorm = XnnpackRMSNorm(layer.input_layernorm)
        layer.post_attention_layernorm = XnnpackRMSNorm(layer.post_attention_layernorm)
    model.norm = XnnpackRMSNorm(model.norm)
    model.max_seq_len = max_seq_len
    return model


def trace(model: Transformer, methods: list[str], exit_layer: int, max_tokens: int,
          draft_length: int = 1) -> dict[str, ExportedProgram]:
    tokens = Dim("tokens", min=1, max=max_tokens)
    keys = Dim("keys", min=2, max=model.max_seq_len)
    key_mask = getattr(model, "key_mask", None)
    programs = {}
    with torch.no_grad():
        for name in methods:
            module = method_module(name, model, exit_layer, draft_length)
            inputs = example_inputs(name, model)
            dynamic = ({1: tokens}, None) if has_dynamic_tokens(name) else None
            if key_mask is not None:
                key_mask.current = None  # the other methods attend through custom_sdpa
                if name in model.key_mask_methods:  # their RowInvariantKVCache layers attend row-invariantly
                    module = WithKeyMask(module, key_mask)
                    inputs += (torch.zeros(inputs[0].shape[1], 4),)  # [T, L]
                    dynamic += ({0: tokens, 1: keys},)
            programs[name] = export(module, inputs, dynamic_shapes=dynamic, strict=False)
    return programs


@contextmanager
def log_level(name: str, level: int):
    log = logging.getLogger(name)
    default = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(default)


def xnnpack_partitioner():
    """XNNPACK's partitioner, except that views of a KV cache stay outside the delegates: inside, XNNPACK
    copies the viewed cache on every call (a static reshape); outside, ExecuTorch makes the view an alias."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import ViewCopyConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class ViewCopyNotOfCaches(ViewCopyConfig):
        def check_constraints(self, node, ep) -> bool:
            source = node.args[0]
            is_cache = (source.op == "placeholder" and source.name in ep.graph_signature.inputs_to_buffers) or (
                source.target is operator.getitem and "auto_functionalized" in str(source.args[0].target))
            return not is_cache and super().check_constraints(node, ep)

    return XnnpackPartitioner(configs=[ViewCopyNotOfCaches if c is ViewCopyConfig else c for c in ALL_PARTITIONER_CONFIGS])


def delegate(programs: dict[str, ExportedProgram], backend: str, constants: Optional[dict[str, Any]] = None):
    """Edge dialect and XNNPACK delegation (unless 'portable'): an EdgeProgramManager.

    What ExecuTorch's to_edge_transform_and_lower does, in less time for the same program
    (test_fast_lowering_gives_executorchs_program):
    - one decomposition per method where it runs three (functionalize; decompose all but the ops XNNPACK
      takes whole; decompose those of them it then rejects): each is a full re-trace with fake tensors.
      This one keeps every op XNNPACK takes whole (aten.linear) as it is;
    - the lowering passes skipped on graphs they would not change (export/idle_passes.py).
    With both, the quick start's export 104.5 / 122.3 s -> 50.5 / 48.9 s wall (two alternations)."""
    from executorch.exir import EdgeCompileConfig, EdgeProgramManager
    from executorch.exir.program import _program

    config = EdgeCompileConfig(_check_ir_validity=False)
    partitioner = xnnpack_partitioner() if backend == "xnnpack" else None
    edge_programs, kept = {}, set()
    with idle_passes_skipped():
        for name, program in programs.items():
            table, whole = _program._default_decomposition_table(), set()
            if partitioner is not None:
                program = partitioner.transform_for_pre_decomposition(program)
                whole = set(_program._remove_invalid_ops_for_not_decompose(partitioner.ops_to_not_decompose(program)[0]))
            program = program.run_decompositions({op: f for op, f in table.items() if op not in whole})
            preserved = {n.target for n in program.graph.nodes if n.target in whole}
            kept |= preserved
            edge_programs[name] = _program._generate_edge_program(config, program, preserve_ops=list(preserved))
        config._core_aten_ops_exception_list = list(set(config._core_aten_ops_exception_list) | kept)
        edge = EdgeProgramManager(edge_programs, constants, config, list(kept))
        if partitioner is None:
            return edge
        # It warns of to_edge + to_backend, which decomposes what this keeps.
        with log_level("executorch.backends.xnnpack.partition.xnnpack_partitioner", logging.ERROR):
            return edge.to_backend({name: partitioner for name in programs})


def lower(programs: dict[str, ExportedProgram], backend: str, constants: dict[str, Any]):
    """Edge dialect, XNNPACK delegation (unless 'portable'), memory planning with one shared KV cache."""
    return to_executorch(delegate(programs, backend, constants))


def to_executorch(edge):
    from executorch.exir import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    with idle_passes_skipped(), delegates_not_rerun():
        return edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=True,  # folds the quantized embedding's dequantize into its lookup
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        ))


def trace_and_lower(model: Transformer, methods: list[str], exit_layer: int, max_tokens: int, draft_length: int,
                    backend: str, constants: dict[str, Any], path: Path, jobs: int = 1) -> None:
    """save(lower(trace(...)), path), with the methods traced and delegated in up to `jobs` processes at
    once. Both are single-threaded Python, so on the 2 cores here the shipped model's draft + verify are
    lowered beside its forward: the quick start's export 176 / 158 s -> 95 / 98 s wall (two alternations,
    before delegate() re-traced less). The program is the same (jobs = 1: byte for byte the one lower()
    makes) but for the requires_grad flags of some constants, which the serializer does not keep and the
    runtime does not read (test_parallel_lowering_gives_the_same_program)."""
    from executorch.exir import EdgeCompileConfig, EdgeProgramManager

    costs = method_costs(methods, model.config.num_hidden_layers, exit_layer, draft_length)
    groups = method_groups(costs, jobs)
    if len(groups) > 1:
        print(f"  {' | '.join(', '.join(g) for g in groups)} in {len(groups)} processes", file=sys.stderr, flush=True)

    def trace_and_delegate(names: list[str]) -> dict[str, ExportedProgram]:
        edge = delegate(trace(model, names, exit_layer, max_tokens, draft_length), backend)
        return {n: edge.exported_program(n) for n in names}

    def finish(programs: dict[str, ExportedProgram]) -> None:
        save(to_executorch(EdgeProgramManager({n: programs[n] for n in methods}, constant_methods=constants,
                                              compile_config=EdgeCompileConfig(_check_ir_validity=False))), path)

    with warnings.catch_warnings():  # ~40 FutureWarnings and UserWarnings from torch / executorch internals
        warnings.simplefilter("ignore")
        in_processes(trace_and_delegate, groups, finish)


# Lowering in several processes pays for small models only. Measured on 2 cores: SmolLM2-135M's .pte
# 9.0 -> 6.0 min wall (peak RSS 1.8 -> 4.0 GB, both processes summed); the 1B shape not faster (6.1 min,
# 6.0-6.5 sequentially) and 10.0 -> 18.8 GB, its edge programs crossing the pipe as GBs of serialized weights.
PARALLEL_LOWERING_MAX_PARAMETERS = 300_000_000


def default_jobs(model: Optional[Transformer] = None) -> int:
    """The cores this process may run on (taskset / cgroup affinity); 1 for a model too large to pay, or
    where processes cannot fork (Windows)."""
    import multiprocessing

    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if model is not None and sum(p.numel() for p in model.parameters()) > PARALLEL_LOWERING_MAX_PARAMETERS:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def method_costs(methods: list[str], num_layers: int, exit_layer: int, draft_length: int) -> dict[str, int]:
    """Lowering work per method, in layers (its graph's size; the head and embedding count as one)."""
    layers = {"draft": exit_layer, "verify": num_layers - exit_layer, "draft_greedy": exit_layer * (draft_length + 1)}
    return {m: layers.get(m, num_layers) + 1 for m in methods}


def method_groups(costs: dict[str, int], jobs: int) -> list[list[str]]:
    """At most `jobs` groups of methods with about equal costs, heaviest first, each in the methods' order."""
    groups: list[list[str]] = [[] for _ in range(max(1, min(jobs, len(costs))))]
    for name in sorted(costs, key=lambda n: -costs[n]):
        min(groups, key=lambda g: sum(costs[n] for n in g)).append(name)
    order = list(costs)
    return sorted((sorted(g, key=order.index) for g in groups), key=lambda g: -sum(costs[n] for n in g))


def in_processes(fn: Callable[[list[str]], dict[str, ExportedProgram]], groups: list[list[str]],
                 finish: Callable[[dict[str, ExportedProgram]], Any]) -> Any:
    """finish() of the edge programs of fn(group) for every group, the groups lowered at once: groups[0]
    here, each other one in a forked child (which inherits the model). Programs cross between processes
    through ExecuTorch's serializer, and the process that finishes lowering first sends: the children
    send theirs here as they finish, except where this process finishes while its one child is still
    lowering; then it hands its programs over and that child finishes (SmolLM2-135M: the ~10 s that
    serializing costs then overlap the child's lowering). finish()'s result must pickle."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = []
    try:
        for group in groups[1:]:
            here, there = context.Pipe()
            child = context.Process(target=run_in_child, args=(fn, finish, group, there), daemon=True)
            child.start()
            there.close()
            workers.append((group, child, here))
        programs = fn(groups[0])
        if len(workers) == 1 and not workers[0][2].poll():  # the child is still lowering: it finishes
            group, child, connection = workers[0]
            try:
                connection.send(("take", {n: serialize_edge_program(p) for n, p in programs.items()}))
            except OSError:  # it ended: what it sent says why
                pass
            del programs
            expect(connection, child, group, "done")
            return expect(connection, child, group, "finished")
        for group, child, connection in workers:
            expect(connection, child, group, "done")
            connection.send(("send", None))
            payload = expect(connection, child, group, "sent")
            programs.update({n: deserialize_edge_program(fields) for n, fields in payload.items()})
        return finish(programs)
    finally:
        for _, child, _ in workers:
            if child.is_alive():
                child.terminate()


def expect(connection, child, group: list[str], status: str) -> Any:
    """The child's next message, which must have this status; else a RuntimeError naming how it ended."""
    try:
        got, payload = connection.recv()
    except (EOFError, OSError):  # it ended without a word (a reset where our message went unread)
        child.join()
        got, payload = "died", f"it exited with code {child.exitcode} (out of memory? pass --jobs 1)"
    if got != status:
        raise RuntimeError(f"lowering method(s) {', '.join(group)} in a child process failed: {payload}")
    return payload


def run_in_child(fn, finish, group: list[str], connection) -> None:
    """Lower the group, say so, then either send its programs or take the parent's and finish."""
    # The parent's OpenMP thread team does not survive fork: any multi-threaded op would wait on it forever.
    torch.set_num_threads(1)
    try:
        programs = fn(group)
        connection.send(("done", None))
        order, payload = connection.recv()
        if order == "send":
            connection.send(("sent", {n: serialize_edge_program(p) for n, p in programs.items()}))
        else:
            programs.update({n: deserialize_edge_program(fields) for n, fields in payload.items()})
            connection.send(("finished", finish(programs)))
    except BaseException as e:  # the parent raises it
        connection.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        connection.close()


def serialize_edge_program(program: ExportedProgram) -> tuple[bytes, bytes, bytes, bytes]:
    from executorch.exir.serde.serialize import serialize

    a = serialize(program)
    return a.exported_program, a.state_dict, a.constants, a.example_inputs


def deserialize_edge_program(fields: tuple[bytes, bytes, bytes, bytes]) -> ExportedProgram:
    from executorch.exir.serde.export_serialize import SerializedArtifact
    from executorch.exir.serde.serialize import deserialize

    # one warning per unbacked symbol of the cache positions, harmless
    with log_level("executorch.exir.serde.export_serialize", logging.ERROR):
        program = deserialize(SerializedArtifact(*fields))
    args_in_schema_order(program)
    return program


def args_in_schema_order(program: ExportedProgram) -> None:
    """Deserialized nodes pass some positional arguments by name (e.g. the 4-bit embedding's
    dequantize_affine: quant_min=, quant_max=); the quantized-embedding fusion of to_executorch matches
    argument lists, so each node gets them back in the schema's positions."""
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not node.kwargs:
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        for arg in schema.arguments[len(args):]:
            if arg.kwarg_only or arg.name not in kwargs:
                break
            args.append(kwargs.pop(arg.name))
        node.args, node.kwargs = tuple(args), kwargs
    program.graph_module.recompile()


def save(program, path: Path) -> None:
    with open(path, "wb") as f:
        program.write_to_file(f)


def export_pte(cfg, r, model: Transformer, directory: Path, stages):
    """All stages after load, writing directory/model.pte; returns the manifest (sizes filled in later)."""
    from export.pipeline import base_manifest, lookup_defaults
    from quant.torchao_schemes import quantize_model, resolve_scheme

    scheme = resolve_scheme(cfg.quant)
    backend = cfg.backend if cfg.backend in ("xnnpack", "portable") else "xnnpack"
    stages.run("quantize", quantize_model, model, scheme, cfg.group_size_for("pte", model.config, r.ckpt.recommended))
    linear = cfg.pte_linear_for(model.config, scheme, r.ckpt.recommended)
    if linear == "linear_q4":
        from quant.linear_q4 import use_linear_q4

        use_linear_q4(model)
    prepare_for_executorch(model, r.max_seq_len, cfg.pte_attention, r.exit_layer)
    if linear == "linear_q4":
        from quant.linear_q4 import join_projections

        join_projections(model)
        if cfg.pte_attention == "row_sdpa":
            from export.fused_layer import fuse_layers

            fuse_layers(model)
    constants = runtime_constants(model, r.exit_layer, r.max_seq_len, cfg.max_tokens_per_call)
    jobs = cfg.jobs or default_jobs(model)
    methods = cfg.methods_for("pte", model.config)
    stages.run("trace, lower and save", trace_and_lower, model, methods, r.exit_layer,
               cfg.max_tokens_per_call, r.num_speculations, backend, constants, directory / "model.pte", jobs)
    return base_manifest(cfg, r, model, format="pte", files={"program": "model.pte"}, file_sizes={},
                         methods=methods, quant=scheme, backend=backend,
                         extra={"attention": cfg.pte_attention, "linear": linear,
                                **(lookup_defaults(r.ckpt.recommended, "pte") if cfg.exact_lookup else {}),
                                **({"key_mask_methods": list(model.key_mask_methods)} if model.key_mask is not None
                                   else {})})


def runtime_constants(model: Transformer, exit_layer: int, max_seq_len: int, max_tokens: int) -> dict[str, int]:
    """Facts stored inside the .pte as constant methods; the runtime checks them against the manifest."""
    c = model.config
    return {"exit_layer": exit_layer, "max_seq_len": max_seq_len, "max_tokens_per_call": max_tokens,
            "num_layers": c.num_hidden_layers, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size}
