"""ExecuTorch's lowering passes, each skipped on a graph that holds nothing it would change.

Every ExportPass re-traces its whole graph with fake tensors under the symbolic token count, whether
or not it rewrites anything: 1.5-2 s per pass and method here for the shipped model, a quarter of a
second per delegated subgraph, and most of the .pte export's time. pass_needs() tells, for each pass it
names, whether a graph holds what the pass rewrites (read from the pass's own code); a graph that does
not keeps the pass's input, which a re-trace would only have rebuilt. The .pte stays the same program
(tests/test_executorch.py: test_fast_lowering_gives_executorchs_program).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
from torch.fx import Graph
from torch.fx.passes.infra.pass_base import PassResult

# XNNPACK's delegate passes for ops our graphs never hand it (upsampling, SDPA: attention runs in the
# custom op outside XNNPACK, batch norm, pooling's getitem, padding, 1-D convolution, PReLU): dropped.
UNUSED_XNNPACK_PASSES = ("ConvertToUpsampleBilinear2d", "ConvertToSDPAPass", "FuseBatchNormPass",
                         "DecomposeBatchNorm", "RemoveGetItemPass", "InsertPadQDQPass", "Conv1dUnsqueezePass",
                         "PReLUReshapePass")


def calls(*targets) -> Callable[[Graph], bool]:
    wanted = set(targets)
    return lambda graph: any(n.op == "call_function" and n.target in wanted for n in graph.nodes)


def calls_named(*names: str) -> Callable[[Graph], bool]:
    """For targets that exist only as edge ops (matched by name, as the passes themselves match them)."""
    return lambda graph: any(getattr(n.target, "__name__", None) in names for n in graph.nodes)


def has_constant_call(graph: Graph) -> bool:
    """A call whose inputs are all constants held by the graph (or none): ConstPropPass folds those and
    what they feed (placeholders, weights included, are fake tensors to it)."""
    return any(n.op == "call_function" and all(i.op == "get_attr" for i in n.all_input_nodes) for n in graph.nodes)


def has_custom_meta(graph: Graph) -> bool:
    return any("custom" in n.meta for n in graph.nodes)


def has_view_op(graph: Graph) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "is_view", False) for n in graph.nodes)


def tensor_arguments(node) -> list:
    """The values a call passes where its schema takes a Tensor."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    given = dict(zip((a.name for a in schema.arguments), node.args)) | dict(node.kwargs)
    return [given[a.name] for a in schema.arguments if a.name in given and isinstance(a.type, torch.TensorType)]


def is_symbolic(value) -> bool:
    return isinstance(value, torch.fx.Node) and isinstance(value.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def has_symbol_as_tensor(graph: Graph) -> bool:
    """A SymInt/SymFloat/SymBool passed where the schema takes a Tensor (SymToTensorPass wraps those)."""
    return any(is_symbolic(v) for n in graph.nodes for v in tensor_arguments(n))


def has_mixed_dtypes(graph: Graph) -> bool:
    """An elementwise op that RemoveMixedTypeOperators promotes: one whose inputs are not all tensors of the
    output's dtype (a scalar, a symbol or another dtype)."""
    promoted = {torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.sub.Tensor,
                torch.ops.aten.div.Tensor, torch.ops.aten.div.Tensor_mode, torch.ops.aten.minimum.default}
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in promoted or len(n.args) <= 1:
            continue
        out = n.meta.get("val")
        for arg in n.args:
            val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg
            if not (isinstance(out, torch.Tensor) and isinstance(val, torch.Tensor) and val.dtype == out.dtype):
                return True
    return False


def pass_needs() -> dict[str, Callable[[Graph], bool]]:
    """{pass class name: does this graph hold what the pass rewrites?}"""
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.backends.xnnpack._passes.fuse_activation_pass import FuseActivationPass
    from executorch.exir.passes.dim_order_ops_registry import MemoryFormatOpsMap
    from executorch.exir.passes.legalize_portable_dim_order_pass import LegalizePortableDimOrderPass

    return {
        # XNNPACK's, on each delegated subgraph
        "DimOrderOpsRevertPass": calls(*MemoryFormatOpsMap),
        "ConvertToLinearPass": calls(*ConvertToLinearPass.targets),
        "PropagateCustomMetaPass": has_custom_meta,
        "ConstPropPass": has_constant_call,
        "FuseActivationPass": calls(*FuseActivationPass.FUSEABLE_ACTIVATIONS),
        "DecomposeConcatenate": calls_named("aten.cat.default"),
        "RemoveRedundantCopyPass": calls_named("aten._to_copy.default"),
        # to edge dialect, on each method
        "NormalizeTransposePass": calls(torch.ops.aten.t.default),
        "ReplaceBrokenOpsWithFunctionalOpsPass": has_view_op,
        "SymToTensorPass": has_symbol_as_tensor,
        "RemoveMixedTypeOperators": has_mixed_dtypes,
        # to ExecuTorch, on each method
        "LegalizePortableDimOrderPass": calls(*LegalizePortableDimOrderPass._target_ops),
    }


def pass_name(p) -> str:
    """A pass class's name; for an instance or a pass_result_wrapper function, its class's."""
    return getattr(p, "__name__", None) or type(p).__name__


def any_graph(graph_module, needed: Callable[[Graph], bool]) -> bool:
    """needed() of the module's graph or of any graph nested in it (control flow)."""
    return any(needed(m.graph) for m in graph_module.modules() if isinstance(m, torch.fx.GraphModule))


def when_needed_class(pass_type: type, needed: Callable[[Graph], bool]) -> type:
    """pass_type, doing nothing (and re-tracing nothing) on a graph that needed() rejects."""

    def call(self, graph_module):
        return pass_type.call(self, graph_module) if any_graph(graph_module, needed) else PassResult(graph_module, False)

    return type(pass_type.__name__, (pass_type,), {"call": call})


def when_needed(p, needed: Callable[[Graph], bool]):
    """A pass instance (or wrapped function) run only on a graph that needed() accepts."""

    def run(graph_module):
        return p(graph_module) if any_graph(graph_module, needed) else PassResult(graph_module, False)

    run.__name__ = pass_name(p)
    return run


def skip_idle(passes: list, needs: dict) -> list:
    """passes (classes, instances or wrapped functions), each one named in needs run only where needed."""

    def wrap(p):
        return (when_needed_class if isinstance(p, type) else when_needed)(p, needs[pass_name(p)])

    return [wrap(p) if pass_name(p) in needs else p for p in passes]


def delegate_outputs(lowered_module) -> Optional[tuple]:
    """How a delegate's outputs follow from its inputs, read from its original subgraph's metadata:
    (output pytree spec, [(dims, dtype)] where each dim is an int or the (input, dim) it equals); None
    where that does not describe them all (an output with another size expression, strides that are not
    contiguous, an input passed through)."""
    program = lowered_module.original_module
    nodes = {n.name: n for n in program.graph.nodes}
    inputs = [nodes[name].meta.get("val") for name in program.graph_signature.user_inputs]
    where = {}
    for i, value in enumerate(inputs):
        for d, size in enumerate(value.shape if isinstance(value, torch.Tensor) else ()):
            if isinstance(size, torch.SymInt):
                where.setdefault(size.node.expr, (i, d))
    returned = list(program.graph.output_node().args[0])
    outputs = []
    for spec, node in zip(program.graph_signature.output_specs, returned):
        if spec.kind.name != "USER_OUTPUT":
            continue
        value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if node.op == "placeholder" or not isinstance(value, torch.Tensor) or not value.is_contiguous():
            return None
        dims = []
        for size in value.shape:
            if isinstance(size, torch.SymInt):
                if size.node.expr not in where:
                    return None
                dims.append(where[size.node.expr])
            else:
                dims.append(int(size))
        outputs.append((dims, value.dtype))
    return program.call_spec.out_spec, outputs


@contextmanager
def delegates_not_rerun():
    """Under fake tensors, a delegate call's outputs made from its recorded output shapes instead of by
    running its original subgraph again. Every ExportPass after delegation (to_executorch's SpecPropPass
    three times per method, ...) re-ran each delegate's whole subgraph so: 31 of to_executorch's 43 s
    (profiled) for SmolLM2-135M. The original runs where the shapes are not simply the inputs'."""
    import importlib

    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _pytree as pytree

    hop = importlib.import_module("torch._higher_order_ops.executorch_call_delegate")  # the package exports the op
    default = hop.call_delegate_cpu
    known: dict[int, Optional[tuple]] = {}

    def call_delegate(lowered_module, *args):
        fake = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        if not fake or not all(isinstance(a, FakeTensor) for a in fake):
            return default(lowered_module, *args)
        if id(lowered_module) not in known:
            known[id(lowered_module)] = delegate_outputs(lowered_module)
        recorded = known[id(lowered_module)]
        if recorded is None:
            return default(lowered_module, *args)
        out_spec, outputs = recorded
        made = [fake[0].new_empty([d if isinstance(d, int) else args[d[0]].shape[d[1]] for d in dims], dtype=dtype)
                for dims, dtype in outputs]
        return pytree.tree_unflatten(made, out_spec)

    hop.call_delegate_cpu = call_delegate
    try:
        yield
    finally:
        hop.call_delegate_cpu = default


@contextmanager
def idle_passes_skipped():
    """While lowering: XNNPACK's unused passes dropped, and every pass in pass_needs() skipped on a graph
    without what it rewrites (XNNPACK's delegate passes, the passes to edge dialect and to ExecuTorch)."""
    import executorch.backends.xnnpack.xnnpack_preprocess as preprocess
    from executorch.exir.program import _program

    needs = pass_needs()
    default_manager = preprocess.XNNPACKPassManager
    default_edge_passes, default_executorch_passes = _program._get_aten_to_edge_passes, _program.edge_to_executorch_passes

    class NeededPasses(default_manager):
        def __init__(self, exported_program, passes=None):
            super().__init__(exported_program, passes)
            self.passes = skip_idle([p for p in self.passes if p.__name__ not in UNUSED_XNNPACK_PASSES], needs)

    def edge_passes(config):
        pre, post = default_edge_passes(config)
        return skip_idle(pre, needs), skip_idle(post, needs)

    preprocess.XNNPACKPassManager = NeededPasses
    _program._get_aten_to_edge_passes = edge_passes
    _program.edge_to_executorch_passes = lambda *a, **k: skip_idle(default_executorch_passes(*a, **k), needs)
    try:
        yield
    finally:
        preprocess.XNNPACKPassManager = default_manager
        _program._get_aten_to_edge_passes = default_edge_passes
        _program.edge_to_executorch_passes = default_executorch_passes
