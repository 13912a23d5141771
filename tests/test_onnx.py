"""The .onnx artifact: numerics against eager, exact self-speculation, weights stored once, bad input."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export.pipeline import ExportConfig, run_export
from models.checkpoint import DEFAULT_MODEL_DIR
from models.data import humaneval_prompts
from exported import (PROMPT, call_sequence, check_looked_up_drafts_keep_the_tokens, copy_artifact,
                      draft_verify_and_one_by_one, drafts_together_and_alone, eager_reference, generate_cli_lookup,
                      max_diff, verify_together_and_alone)
from runtime.errors import UserError
from runtime import decoding
from runtime.decoding import DEFAULT_LOOKUP, GenerationConfig, generate
from runtime.artifact import read_manifest
from runtime.loader import open_artifact

pytestmark = pytest.mark.filterwarnings("ignore")


def export(checkpoint, out, **kw):
    return run_export(ExportConfig(model=checkpoint, out=out, backend="onnx", max_seq_len=128,
                                   max_tokens_per_call=16, **kw))[0]


@pytest.fixture(scope="module")
def fp32_onnx(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("onnx32"))


@pytest.fixture(scope="module")
def int4_onnx(tiny_checkpoint, tmp_path_factory):  # ONNX Runtime's MatMulNBits, blocks of 64 here
    return export(tiny_checkpoint, tmp_path_factory.mktemp("onnx4"), quant="int4", onnx_linear="matmulnbits")


@pytest.fixture(scope="module")
def int4_block32_onnx(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("onnx4b32"), quant="int4", group_size=32,
                  methods=("draft", "verify"))


def test_graphs_use_the_fused_attention_and_norms(fp32_onnx):
    """One q|k|v projection per layer into one attention node that applies the rotary embedding (by default our
    layerskip.RowAttention, no GroupQueryAttention; no Sin/Cos/Neg left), and every RMSNorm fused."""
    assert fp32_onnx.extra["kv_cache"] == "row"
    for name in ("draft", "verify", "forward"):
        nodes = onnx.load(str(fp32_onnx.path(name)), load_external_data=False).graph.node
        ops = [n.op_type for n in nodes]
        attention = [n for n in nodes if n.op_type == "RowAttention"]
        assert attention and all(n.domain == "layerskip" and len(n.input) == 7 for n in attention)  # packed q|k|v
        assert not {"GroupQueryAttention", "Sin", "Cos", "Neg", "Pow", "ReduceMean", "Reciprocal"} & set(ops)
        norms = ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization")
        assert norms == 2 * len(attention) + 1  # two per layer and the final norm


def test_draft_and_verify_match_eager_including_after_rollback(tiny_checkpoint, fp32_onnx):
    expected = eager_reference(tiny_checkpoint, fp32_onnx.exit_layer, fp32_onnx.max_seq_len)
    got = call_sequence(open_artifact(fp32_onnx.directory).backend)
    assert max_diff(got, expected) <= 1e-4


def test_standard_ops_cache_variant_matches_eager(tiny_checkpoint, tmp_path):
    """The `sdpa` KV-cache design (plain ONNX ops, new rows written back by the runtime) is exact too."""
    manifest = export(tiny_checkpoint, tmp_path, methods=("draft", "verify"), onnx_kv_cache="sdpa")
    assert manifest.extra["kv_cache"] == "sdpa"
    expected = eager_reference(tiny_checkpoint, manifest.exit_layer, manifest.max_seq_len)
    assert max_diff(call_sequence(open_artifact(manifest.directory).backend), expected) <= 1e-4


@pytest.mark.parametrize("which", ["fp32_onnx", "int4_onnx"])
def test_greedy_self_speculation_equals_autoregressive(which, request):
    opened = open_artifact(request.getfixturevalue(which).directory)
    ar = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=60, self_speculative=False))
    full = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=60, self_speculative=False,
                                                             full_model_baseline=True))
    spec = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=60, num_speculations=3))
    assert spec.tokens == ar.tokens == full.tokens
    assert 0 < spec.stats.accepted < spec.stats.drafted


@pytest.mark.parametrize("which", ["fp32_onnx", "int4_onnx"])
def test_looked_up_drafts_go_through_the_prefix_in_one_call_and_keep_the_tokens(which, request, monkeypatch):
    check_looked_up_drafts_keep_the_tokens(open_artifact(request.getfixturevalue(which).directory).backend, monkeypatch)


@pytest.mark.parametrize("which", ["fp32_onnx", "int4_onnx", "int4_block32_onnx"])
def test_a_verify_row_has_the_bits_of_a_one_token_verify(which, request):
    """Verify calls reach ONNX Runtime with at least 2 rows (an even count at blocks >= 64): a token's
    logits are then the same bits in a 5-token and a 1-token verify, so greedy self-speculation equals
    plain decoding by construction. Run as called (1 and 5 rows), rows differ: the check can fail."""
    backend = open_artifact(request.getfixturevalue(which).directory).backend
    together, alone = verify_together_and_alone(backend)
    assert np.array_equal(together, alone)

    # the calls as made, unpadded: our attention gives a row its bits at any row count, and so do fp32 MatMul and
    # MatMulNBits at blocks of 32, but not at blocks of 64 (an odd count's last row): there the check can fail
    together, alone = verify_together_and_alone(backend, backend.verify_rows)
    assert np.array_equal(together, alone) == (which != "int4_onnx")


@pytest.mark.parametrize("which", ["fp32_onnx", "int4_onnx"])
def test_padded_drafts_give_a_row_the_bits_of_a_one_token_draft(which, request, tmp_path):
    """--pad-drafts: a multi-row draft (tokens looked up in the context) leaves each row's layer-E state and
    verify logits with the bits of 1-token drafts, so --lookup equals plain decoding by construction.
    Without it they differ at int4 blocks of 64 (the check can fail), not at fp32 with our attention op."""
    manifest = request.getfixturevalue(which)
    extra = manifest.extra
    padded = open_artifact(copy_artifact(manifest.directory, tmp_path, extra={**extra, "pad_drafts": True})).backend
    (rows, logits), (rows_alone, logits_alone) = drafts_together_and_alone(padded)
    assert np.array_equal(rows, rows_alone) and np.array_equal(logits, logits_alone)
    (rows, logits), (rows_alone, logits_alone) = drafts_together_and_alone(open_artifact(manifest.directory).backend)
    assert np.array_equal(rows, rows_alone) == (which == "fp32_onnx")
    # prompt chunks of an odd size get their padding row too (the token buffer holds one row more)
    odd = open_artifact(copy_artifact(manifest.directory, tmp_path / "odd", max_tokens_per_call=7,
                                      extra={**extra, "pad_drafts": True})).backend
    ar = generate(odd, PROMPT, GenerationConfig(max_new_tokens=30, self_speculative=False))
    assert generate(odd, PROMPT, GenerationConfig(max_new_tokens=30, num_speculations=3, lookup=6)).tokens == ar.tokens


@pytest.fixture(scope="module")
def int4_lookup_onnx(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("int4_lookup"), quant="int4", for_lookup=True)


def test_a_lookup_step_in_one_call_has_the_bits_of_plain_decoding(int4_lookup_onnx, int4_onnx, monkeypatch):
    """Artifacts exported for exact lookup hold draft_verify.onnx (draft and verify in one graph, padded as a
    draft call is): its rows have the bits of 1-token draft + verify calls, at int4 blocks of 64, where
    odd row counts are padded, and a lookup step is then one call. Other artifacts go without it."""
    manifest = int4_lookup_onnx
    assert manifest.methods == ["draft", "verify", "forward", "draft_verify"] and manifest.group_size == 64
    assert "draft_verify" not in int4_onnx.methods and not open_artifact(int4_onnx.directory).backend.has_draft_verify
    backend = open_artifact(manifest.directory).backend
    assert backend.has_draft_verify
    for _ in range(2):  # at position 5 (padded from the row before) and again, with its rows written
        (rows, logits), (rows_alone, logits_alone) = draft_verify_and_one_by_one(backend)
        assert np.array_equal(rows, rows_alone) and np.array_equal(logits, logits_alone)
    tokens = [PROMPT[0], 5, 6]  # at position 0, padded with a row after
    merged, one_by_one = np.array(backend.draft_verify(tokens, 0)), []
    for k, token in enumerate(tokens):
        backend.draft([token], k)
        one_by_one.append(np.array(backend.verify(k, 1)[0]))
    assert np.array_equal(merged, np.stack(one_by_one))
    check_looked_up_drafts_keep_the_tokens(backend, monkeypatch)


def test_exit_guesses_leave_the_caches_as_plain_decoding_does(int4_gqa_onnx, monkeypatch):
    """On an artifact exported for exact lookup a step drafting from the exit drafts by one unpadded draft call
    (ONNX Runtime's one-row path: other bits than the padded call's, here GroupQueryAttention's; our attention op
    and this tiny model's one-block MatMulNBits give the padded call's), then draft_verify computes those rows
    again: the KV and exit caches end with plain decoding's bits, and so do the tokens."""
    backend = open_artifact(int4_gqa_onnx.directory).backend
    assert backend.has_draft_guess and decoding.default_exit_guesses(backend) == 1
    backend.draft_verify(PROMPT, 0)
    guessed = np.array(backend.draft_guess([7], len(PROMPT)))
    assert not np.array_equal(guessed, backend.draft([7], len(PROMPT)))  # the bits a guess leaves are not plain's

    def decode(cfg):
        result = generate(backend, PROMPT, cfg)
        end = len(PROMPT) + len(result.tokens) - 1  # rows written by both decoders
        caches = [np.array(c.numpy()[:, :, :end]) for pair in backend.caches for c in pair]
        return result, caches, np.array(backend.exit_cache.numpy()[:end])

    plain, plain_caches, plain_exit = decode(GenerationConfig(max_new_tokens=40, self_speculative=False))
    guessing, caches, exit_rows = decode(GenerationConfig(max_new_tokens=40, num_speculations=3))
    assert guessing.tokens == plain.tokens and guessing.stats.drafted == guessing.stats.steps
    assert guessing.stats.draft_calls == guessing.stats.steps + 1  # one unpadded call per step, + 1: the prompt
    assert all(np.array_equal(a, b) for a, b in zip(caches, plain_caches)) and np.array_equal(exit_rows, plain_exit)
    # where the verifying call left the guessed row (t's) as the guess wrote it, the caches keep other bits
    monkeypatch.setattr(backend, "draft_verify", lambda tokens, pos: (backend.draft_rows(tokens[1:], pos + 1),
                                                                      backend.verify(pos, len(tokens)))[1])
    _, spoiled, spoiled_exit = decode(GenerationConfig(max_new_tokens=40, num_speculations=3))
    assert not np.array_equal(spoiled_exit, plain_exit)


def test_draft_verify_runs_layer_e_norm_as_draft_and_verify_do(tmp_path):
    """draft_verify makes `hidden` and runs layer E's input norm as draft (ends at `hidden`) and verify (starts
    from it) do: fused into one SkipSimplifiedLayerNormalization they round some rows differently (on models/deep16
    at int4 that flipped a near-tie, 3.8e-6 apart, at the 18th token of HumanEval/28, so exact lookup left plain
    decoding there). In the int4 default each layer is one layerskip.DecoderLayer node: `hidden` is layer E-1's
    output and layer E's node normalizes it inside, in draft_verify as in verify."""
    manifest = export(DEFAULT_MODEL_DIR.parent / "deep16", tmp_path, quant="int4", for_lookup=True)
    graph = onnx.load(str(manifest.directory / "draft_verify.onnx"), load_external_data=False).graph
    assert next(n for n in graph.node if "hidden" in n.output).op_type == "DecoderLayer"
    assert [n.op_type for n in graph.node if "hidden" in n.input] == ["DecoderLayer"]
    verify = onnx.load(str(manifest.directory / "verify.onnx"), load_external_data=False).graph
    assert [n.op_type for n in verify.node if "hidden" in n.input] == ["Shape", "DecoderLayer"]
    opened = open_artifact(manifest.directory)
    assert (opened.backend.default_lookup, opened.backend.lookup_run) == (2, 6)  # deep16's layerskip.json records them
    ids = opened.tokenizer.encode(humaneval_prompts()[28]["prompt"])
    base = dict(max_new_tokens=24, eos_token_ids=tuple(opened.eos_token_ids))
    plain = generate(opened.backend, ids, GenerationConfig(**base, self_speculative=False)).tokens
    lookup = GenerationConfig(**base, num_speculations=3, draft_threshold=0.3, lookup=5)  # as when it broke
    assert generate(opened.backend, ids, lookup).tokens == plain


def row_attention_session(heads: int, kv_heads: int, head_dim: int, cache_rows: int, kind: str, threads: int = 1):
    """A graph of one attention node as our graphs use it: com.microsoft GroupQueryAttention (gqa) or our
    layerskip.RowAttention (row), with the rotary caches of positions 0 .. cache_rows - 1."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from runtime.kernels import ort_ops_library

    angles = np.arange(cache_rows)[:, None] * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)[None]
    rotary = [numpy_helper.from_array(f(angles).astype(np.float32), n) for f, n in ((np.cos, "cos"), (np.sin, "sin"))]
    inputs = ["qkv", "past_k", "past_v", "seqlens_k", "total", "cos", "sin"]
    node = (helper.make_node("GroupQueryAttention", inputs[:1] + ["", ""] + inputs[1:], ["y", "k", "v"],
                             domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1)
            if kind == "gqa" else
            helper.make_node("RowAttention", inputs, ["y", "k", "v"], domain="layerskip", num_heads=heads,
                             kv_num_heads=kv_heads))
    f, cache = TensorProto.FLOAT, [1, kv_heads, cache_rows, head_dim]
    graph = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info("qkv", f, [1, "T", (heads + 2 * kv_heads) * head_dim]),
         helper.make_tensor_value_info("past_k", f, cache), helper.make_tensor_value_info("past_v", f, cache),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
         helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("y", f, [1, "T", heads * head_dim]),
         helper.make_tensor_value_info("k", f, cache), helper.make_tensor_value_info("v", f, cache)], rotary)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid("layerskip", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(ort_ops_library()))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("heads, kv_heads, head_dim, cache_rows, pos", [(4, 4, 64, 96, 37), (4, 2, 32, 96, 37),
                                                                       (2, 1, 16, 96, 37), (8, 2, 64, 512, 400)])
def test_our_attention_op_computes_group_query_attention_with_rows_that_keep_their_bits(heads, kv_heads, head_dim,
                                                                                      cache_rows, pos):
    """layerskip.RowAttention (--onnx-kv-cache row) against ONNX Runtime's GroupQueryAttention on the same inputs:
    outputs within 1e-5 and the caches written alike, in place; and a row of a 6-row call has the bits of that row
    computed alone (GroupQueryAttention's do not: the check can fail), and the bits of a session of 3 threads (KV heads
    in parallel in a call as large as the last case's). Vectorized (32, 64) and portable (16) paths."""
    rng = np.random.default_rng(0)
    rows = 6
    past = rng.standard_normal((2, 1, kv_heads, cache_rows, head_dim)).astype(np.float32)
    qkv = rng.standard_normal((1, rows, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)

    def attend(session, start, count, caches):
        feeds = {"qkv": qkv[:, start - pos:start - pos + count], "seqlens_k": np.array([start + count - 1], np.int32),
                 "total": np.array(start + count, np.int32)}
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, cache in zip(("k", "v"), caches):  # one buffer as past and present, as the runtime binds it
            value = ort.OrtValue.ortvalue_from_numpy(cache)
            binding.bind_ortvalue_input(f"past_{name}", value)
            binding.bind_ortvalue_output(name, value)
        binding.bind_output("y")
        session.run_with_iobinding(binding)
        return binding.get_outputs()[2].numpy()

    import onnxruntime as ort

    results = {}
    for kind in ("gqa", "row"):
        session = row_attention_session(heads, kv_heads, head_dim, cache_rows, kind)
        caches = past.copy()
        together = attend(session, pos, rows, caches)
        alone_caches = past.copy()
        alone = np.concatenate([attend(session, pos + r, 1, alone_caches) for r in range(rows)], axis=1)
        results[kind] = together, alone, caches
    (gqa, gqa_alone, gqa_caches), (row, row_alone, row_caches) = results["gqa"], results["row"]
    assert np.abs(row - gqa).max() <= 1e-5 and np.abs(row_caches - gqa_caches).max() <= 1e-5
    assert not np.array_equal(row_caches, past)  # written in place
    assert np.array_equal(row, row_alone)
    assert not np.array_equal(gqa, gqa_alone)
    threaded_caches = past.copy()
    threaded = attend(row_attention_session(heads, kv_heads, head_dim, cache_rows, "row", threads=3), pos, rows,
                      threaded_caches)
    assert np.array_equal(threaded, row) and np.array_equal(threaded_caches, row_caches)


@pytest.fixture(scope="module")
def int4_gqa_onnx(tiny_checkpoint, tmp_path_factory):  # ONNX Runtime's ops only: no library of ours to ship
    return export(tiny_checkpoint, tmp_path_factory.mktemp("int4_gqa"), quant="int4", for_lookup=True,
                  onnx_kv_cache="gqa", onnx_linear="matmulnbits")


def test_graphs_with_onnx_runtimes_attention_op_match_eager_and_decode_exactly(tiny_checkpoint, int4_gqa_onnx,
                                                                               tmp_path):
    """--onnx-kv-cache gqa --onnx-linear matmulnbits (ONNX Runtime's own ops, no library of ours to ship): fp32 logits
    within 1e-4 of eager through draft, verify and a rollback; at int4, exported for exact lookup, a draft_verify call
    has the bits of plain decoding's 1-token calls and greedy self-speculation with lookup equals plain decoding."""
    fp32 = export(tiny_checkpoint, tmp_path, methods=("draft", "verify"), onnx_kv_cache="gqa")
    nodes = onnx.load(str(fp32.path("draft")), load_external_data=False).graph.node
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert gqa and all(n.input[1] == n.input[2] == "" for n in gqa)  # packed q|k|v
    assert all(a.i == 1 for n in gqa for a in n.attribute if a.name == "do_rotary")
    assert "RowAttention" not in [n.op_type for n in nodes]
    expected = eager_reference(tiny_checkpoint, fp32.exit_layer, fp32.max_seq_len)
    assert max_diff(call_sequence(open_artifact(fp32.directory).backend), expected) <= 1e-4

    assert int4_gqa_onnx.extra["kv_cache"] == "gqa" and "draft_verify" in int4_gqa_onnx.methods
    backend = open_artifact(int4_gqa_onnx.directory).backend
    (rows, logits), (rows_alone, logits_alone) = draft_verify_and_one_by_one(backend)
    assert np.array_equal(rows, rows_alone) and np.array_equal(logits, logits_alone)
    repeating = PROMPT * 3  # lookups match in it
    plain = generate(backend, repeating, GenerationConfig(max_new_tokens=60, self_speculative=False))
    spec = generate(backend, repeating, GenerationConfig(max_new_tokens=60, num_speculations=3, lookup=DEFAULT_LOOKUP))
    assert spec.tokens == plain.tokens and spec.stats.lookup_steps > 0


def test_our_attention_op_without_a_compiler_is_a_clear_error(int4_lookup_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSKIP_KERNEL_DIR", str(tmp_path / "kernels"))  # nothing built there yet
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(UserError, match="no C\\+\\+ compiler 'no-such-compiler'.*--onnx-kv-cache gqa"):
        open_artifact(int4_lookup_onnx.directory)


def test_lookup_is_on_by_default_only_where_it_is_exact(fp32_onnx, tmp_path, capsys):
    """runtime.generate looks drafts up by default on --pad-drafts artifacts (their exporter asked for it)."""
    extra = fp32_onnx.extra
    padded = copy_artifact(fp32_onnx.directory, tmp_path, extra={**extra, "pad_drafts": True})
    assert generate_cli_lookup(padded, capsys) == DEFAULT_LOOKUP
    assert generate_cli_lookup(padded, capsys, "--lookup", "0") == 0
    assert generate_cli_lookup(fp32_onnx.directory, capsys) == 0
    # the standard-ops graphs' rows keep bits that depend on where a call starts (runtime/onnx_backend.py)
    sdpa = copy_artifact(fp32_onnx.directory, tmp_path / "sdpa", extra={**extra, "pad_drafts": True, "kv_cache": "sdpa"})
    assert not read_manifest(sdpa).exact_lookup and read_manifest(padded).exact_lookup


def test_pad_drafts_is_for_onnx_artifacts_only(tiny_checkpoint):
    with pytest.raises(UserError, match="--pad-drafts is for .onnx artifacts"):
        ExportConfig(model=tiny_checkpoint, backend="xnnpack", pad_drafts=True)
    assert ExportConfig(model=tiny_checkpoint, backend="all", pad_drafts=True).pad_drafts


def test_a_method_is_cut_out_of_the_traced_graph_at_its_inputs():
    """cut() keeps only what computes the outputs from the given inputs, renames outputs, and lets the
    token count come from `hidden` where the trace read it from `tokens`; a cut that would need
    another graph input is refused."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from export.to_onnx import cut

    def traced():
        nodes = [helper.make_node("Shape", ["tokens"], ["count"], start=1, end=2),
                 helper.make_node("Mul", ["tokens", "two"], ["hidden"]),
                 helper.make_node("Relu", ["hidden"], ["relu"]),
                 helper.make_node("Cast", ["count"], ["count_f"], to=TensorProto.FLOAT),
                 helper.make_node("Add", ["relu", "count_f"], ["verify_logits"]),
                 helper.make_node("Add", ["relu", "tokens"], ["needs_tokens"])]
        graph = helper.make_graph(
            nodes, "all", [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, "T"])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "T"]) for n in ("hidden", "verify_logits", "needs_tokens")],
            [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])

    verify = cut(traced(), ["hidden"], {"verify_logits": "logits"})
    assert [v.name for v in verify.graph.input] == ["hidden"] and [v.name for v in verify.graph.output] == ["logits"]
    assert [n.op_type for n in verify.graph.node] == ["Shape", "Relu", "Cast", "Add"] and not verify.graph.initializer
    session = ort.InferenceSession(verify.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden = np.array([[-1.0, 2.0, 3.0]], np.float32)
    assert np.array_equal(session.run(None, {"hidden": hidden})[0], np.maximum(hidden, 0) + 3)
    with pytest.raises(RuntimeError, match="tokens"):
        cut(traced(), ["hidden"], {"needs_tokens": "x"})


def test_int4_uses_matmulnbits(int4_onnx):
    ops = {n.op_type for n in onnx.load(str(int4_onnx.path("verify")), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops


def matmulnbits_graph(k: int, n: int, block: int, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """One fp32 linear x [M, K] @ W [K, N], quantized by ONNX Runtime's MatMulNBits quantizer as our int4 export
    does; and W."""
    from onnx import TensorProto, helper, numpy_helper

    from quant.onnx_schemes import quantize_graph

    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32) * 0.1
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                              [numpy_helper.from_array(w, "w")])
    return quantize_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), 4, block), w


@pytest.mark.parametrize("block, k, n", [(32, 256, 96), (128, 256, 96), (128, 1024, 768)])
def test_our_linear_op_computes_the_4bit_weights_with_rows_that_keep_their_bits(block, k, n):
    """--onnx-linear linear_q4 (the int4 default): MatMulNBits' weights and scales, unpacked, give back W within a
    scale step (the repacking reads them right); layerskip.LinearQ4 computes what its torch reference
    (quant/linear_q4.py) computes on the repacked tensors, within 1e-5 of the outputs' size, and what MatMulNBits
    computes within its activation rounding; a row of a 6-row call has the bits of that row alone, and the bits of a
    session of 3 threads (groups of output blocks in parallel in a call as large as the last case's)."""
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    from quant.linear_q4 import linear_q4
    from quant.onnx_schemes import matmulnbits_weights, to_linear_q4
    from runtime.kernels import ort_ops_library

    proto, w = matmulnbits_graph(k, n, block)
    initializers = {t.name: t for t in proto.graph.initializer}
    q, scales = matmulnbits_weights(proto.graph.node[0], initializers)
    dequantized = (q.reshape(n, k // block, block) * scales[:, :, None]).reshape(n, k)
    # within a step (ONNX Runtime clips +8 steps to +7; its scales are signed); a misread nibble order is 16 off
    assert np.all(np.abs(dequantized - w.T) <= 1.0001 * np.repeat(np.abs(scales), block, axis=1))

    so = ort.SessionOptions()
    so.register_custom_ops_library(str(ort_ops_library()))
    nbits = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ours_proto = to_linear_q4(onnx.ModelProto.FromString(proto.SerializeToString()))
    assert [node.op_type for node in ours_proto.graph.node] == ["LinearQ4"]
    ours = ort.InferenceSession(ours_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((6, k)).astype(np.float32)
    y = ours.run(None, {"x": x})[0]
    packed = [torch.from_numpy(numpy_helper.to_array(t)) for t in ours_proto.graph.initializer]
    reference = linear_q4(torch.from_numpy(x), *packed).numpy()
    assert np.abs(y - reference).max() <= 1e-5 * np.abs(reference).max()
    assert np.abs(y - nbits.run(None, {"x": x})[0]).max() <= 0.02 * np.abs(reference).max()
    alone = np.concatenate([ours.run(None, {"x": x[r:r + 1]})[0] for r in range(len(x))])
    assert np.array_equal(y, alone)
    so.intra_op_num_threads = 3
    threaded = ort.InferenceSession(ours_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert np.array_equal(threaded.run(None, {"x": x})[0], y)


def test_our_linear_op_refuses_a_linear_it_cannot_take():
    from quant.onnx_schemes import to_linear_q4

    proto, _ = matmulnbits_graph(64, 40, 32)  # 40 outputs: not whole blocks of 16
    with pytest.raises(UserError, match="--onnx-linear linear_q4 cannot take the 64x40 linear.*matmulnbits"):
        to_linear_q4(proto)
    with pytest.raises(UserError, match="--onnx-linear linear_q4 computes 4-bit linears; it needs --quant int4"):
        ExportConfig(model=DEFAULT_MODEL_DIR, backend="onnx", quant="int8", onnx_linear="linear_q4")


def test_int4_graphs_use_our_ops_and_give_a_row_its_bits_unpadded(int4_lookup_onnx):
    """The int4 default: every layer one layerskip.DecoderLayer node (our LinearQ4's linear and RowAttention's
    attention inside) and the head a layerskip.LinearQ4, so that every call gives a row the bits it has alone, with no
    padding row (at blocks of 64 MatMulNBits needs one); a step that looks nothing up is then one draft_verify call of
    one row, with plain decoding's bits."""
    nodes = onnx.load(str(int4_lookup_onnx.path("draft_verify")), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("DecoderLayer") == int4_lookup_onnx.shape.num_layers and ops.count("LinearQ4") == 1
    assert not {"MatMulNBits", "GroupQueryAttention", "RowAttention", "Sigmoid"} & set(ops)
    assert int4_lookup_onnx.extra["linear"] == "linear_q4"
    backend = open_artifact(int4_lookup_onnx.directory).backend
    assert backend.rows_alike and backend.padded_rows(1) == 1 and backend.padded_rows(5) == 5
    together, alone = verify_together_and_alone(backend, backend.verify_rows)
    assert np.array_equal(together, alone)
    assert decoding.default_unmatched_step(backend) == "plain"
    repeating = PROMPT * 3
    plain = generate(backend, repeating, GenerationConfig(max_new_tokens=60, self_speculative=False))
    spec = generate(backend, repeating, GenerationConfig(max_new_tokens=60, num_speculations=3, lookup=DEFAULT_LOOKUP))
    assert spec.tokens == plain.tokens and spec.stats.lookup_steps > 0
    assert spec.stats.step_tokens.get("plain", 0) > 0  # steps that matched nothing: one call each


def test_each_int4_layer_is_one_node_computing_what_its_nodes_did(tiny_checkpoint, int4_lookup_onnx, tmp_path,
                                                                   monkeypatch):
    """export/onnx_fused_layer.py: the same artifact exported with each layer as its 10 nodes gives every method's
    logits within 1e-5 of their scale (the fused op's norms and SiLU round as the .pte kernel's do, not as ONNX
    Runtime's), and the same greedy tokens; the fused graphs read the same weights (weights.bin equal in size)."""
    import export.onnx_fused_layer as fused_layer

    monkeypatch.setattr(fused_layer, "fuse_decoder_layers", lambda proto: proto)
    unfused = export(tiny_checkpoint, tmp_path, quant="int4", for_lookup=True)
    nodes = onnx.load(str(unfused.path("forward")), load_external_data=False).graph.node
    assert "DecoderLayer" not in [n.op_type for n in nodes] and len(nodes) > 10 * unfused.shape.num_layers
    assert unfused.file_sizes["weights.bin"] == int4_lookup_onnx.file_sizes["weights.bin"]
    fused_calls = call_sequence(open_artifact(int4_lookup_onnx.directory).backend)
    unfused_calls = call_sequence(open_artifact(unfused.directory).backend)
    for a, b in zip(fused_calls, unfused_calls):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    config = GenerationConfig(max_new_tokens=40, self_speculative=False)
    assert generate(open_artifact(int4_lookup_onnx.directory).backend, PROMPT, config).tokens == \
        generate(open_artifact(unfused.directory).backend, PROMPT, config).tokens


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_weights_are_stored_once(wide_checkpoint, tmp_path, quant):
    """Draft and verify graphs together weigh no more than the full model alone (+2%)."""
    split = export(wide_checkpoint, tmp_path / "split", quant=quant, methods=("draft", "verify"))
    full = export(wide_checkpoint, tmp_path / "full", quant=quant, methods=("forward",))
    assert split.file_sizes["weights.bin"] <= 1.02 * full.file_sizes["weights.bin"]
    assert sum(split.file_sizes.values()) <= 1.02 * sum(full.file_sizes.values())


def test_no_large_tensor_inside_the_graph_files(fp32_onnx):
    for name in ("draft", "verify"):
        proto = onnx.load(str(fp32_onnx.path(name)), load_external_data=False)
        assert all(len(t.raw_data) < 1024 for t in proto.graph.initializer)
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


# ---------------------------------------------------------------- bad input


def test_corrupt_onnx_is_refused(fp32_onnx, tmp_path):
    copy = copy_artifact(fp32_onnx.directory, tmp_path)
    data = bytearray((copy / "draft.onnx").read_bytes())
    data[10:200] = b"\xff" * 190
    (copy / "draft.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="could not be loaded by ONNX Runtime"):
        open_artifact(copy)


def test_missing_external_data_is_refused(fp32_onnx, tmp_path):
    copy = copy_artifact(fp32_onnx.directory, tmp_path)
    (copy / "weights.bin").unlink()
    with pytest.raises(UserError, match="weights.bin' is missing"):
        open_artifact(copy)


def test_mismatched_manifest_is_refused(fp32_onnx, tmp_path):
    copy = copy_artifact(fp32_onnx.directory, tmp_path, max_seq_len=64)
    with pytest.raises(UserError, match="does not match its manifest"):
        open_artifact(copy)


def test_cuda_without_a_gpu_is_a_clear_error(fp32_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="CUDA"):
        open_artifact(fp32_onnx.directory, provider="cuda")


class RecordingBinding:
    """An I/O binding that records which names are bound, then binds them on the real one."""

    def __init__(self, binding):
        self.binding, self.bound = binding, []

    def __getattr__(self, attr):
        fn = getattr(self.binding, attr)
        if not attr.startswith("bind_"):
            return fn

        def record(name, *args):
            self.bound.append(name)
            return fn(name, *args)
        return record


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_host_inputs_are_bound_again_every_call_only_on_another_device(fp32_onnx, device):
    """ONNX Runtime copies a host input of a CUDA session to the GPU when it is bound, not when it runs:
    bound once, every later call read the first call's tokens and position (wrong tokens from the
    second call on, seen on an H100). The CPU provider reads the bound memory itself: bound once."""
    backend = open_artifact(fp32_onnx.directory).backend
    method = backend._get("draft")
    method.device = device  # the binding rule alone: the session itself stays on the CPU here
    method.binding = RecordingBinding(method.binding)
    backend.draft([5], 3)
    method.binding.bound.clear()
    backend.draft([6], 4)
    inputs = {"tokens", "input_pos"} & set(method.binding.bound)
    assert inputs == ({"tokens", "input_pos"} if device == "cuda" else set())
    assert "logits" not in method.binding.bound  # an output is written where it is bound: once is enough


def against_cpu_provider(artifact, provider: str):
    """runtime.bench's comparison of the artifact on `provider` with the CPU provider, on two prompts."""
    from runtime.bench import BenchConfig, against_cpu_provider
    from runtime.measure import heldout_quality, heldout_windows

    opened = open_artifact(artifact.directory, provider=provider)
    windows = heldout_windows(opened.tokenizer.tokenizer, opened.tokenizer.bos_token_id or 0, opened.eos_token_ids[0],
                              count=2, length=64)
    spec = {"kind": "artifact", "path": str(artifact.directory), "provider": provider}
    compared = against_cpu_provider(opened, spec, [PROMPT, PROMPT[:4]], windows,
                                    BenchConfig(artifacts=[artifact.directory], max_new_tokens=24))
    return compared, heldout_quality(opened.backend, windows)["loss"]


def test_cuda_provider_decodes_as_the_cpu_provider(fp32_onnx):
    """Needs a GPU (skipped here): greedy tokens on CUDA, plain and self-speculative, equal the CPU
    provider's, and held-out loss agrees."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA provider (onnxruntime-gpu and an NVIDIA GPU)")
    compared, loss = against_cpu_provider(fp32_onnx, "cuda")
    assert compared["greedy_identical_to_cpu_provider"] == {"ar": 1.0, "spec": 1.0}
    assert loss == pytest.approx(compared["heldout_cpu_provider"]["loss"], abs=1e-3)


def test_benchmark_compares_a_provider_with_the_cpu_provider(fp32_onnx):
    """The comparison `runtime.bench --provider cuda` records; against itself on the CPU it is exact."""
    compared, loss = against_cpu_provider(fp32_onnx, "cpu")
    assert compared["greedy_identical_to_cpu_provider"] == {"ar": 1.0, "spec": 1.0}
    assert compared["heldout_cpu_provider"]["loss"] == pytest.approx(loss)


def test_8bit_embedding_gathers_the_dequantized_rows():
    """quantize_gathers_8bit: ONNX Runtime's GatherBlockQuantized returns each row within half a step."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from quant.onnx_schemes import quantize_gathers_8bit

    table = np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [3, 64])],
        [numpy_helper.from_array(table, "table")])
    proto = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto = quantize_gathers_8bit(proto, 32)
    assert [n.op_type for n in proto.graph.node] == ["GatherBlockQuantized"]
    ids = np.array([0, 7, 49])
    rows = ort.InferenceSession(proto.SerializeToString()).run(None, {"ids": ids})[0]
    step = np.abs(table[ids].reshape(3, 2, 32)).max(-1, keepdims=True) / 127
    assert (np.abs(rows - table[ids]).reshape(3, 2, 32) <= step / 2 + 1e-6).all()
    assert np.abs(rows - table[ids]).max() > 0  # it is quantized


def test_int8_artifact_quantizes_linears_and_embedding(tiny_checkpoint, tmp_path):
    m = export(tiny_checkpoint, tmp_path, quant="int8")
    nodes = onnx.load(str(m.path("draft")), load_external_data=False).graph.node
    ops = {n.op_type for n in nodes}
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in ops and "MatMul" not in ops
    backend = open_artifact(m.directory).backend
    ar = generate(backend, PROMPT, GenerationConfig(max_new_tokens=30, self_speculative=False))
    spec = generate(backend, PROMPT, GenerationConfig(max_new_tokens=30, num_speculations=3))
    assert spec.tokens == ar.tokens


def test_the_recommended_draft_threshold_travels_to_the_runtime(tiny_checkpoint, tmp_path):
    """layerskip.json's tau -> the manifest -> the runtime's default; a flag overrides it at each step."""
    import json
    import shutil

    from runtime.decoding import GenerationConfig

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    (checkpoint / "layerskip.json").write_text(json.dumps({"exit_layer": 2, "num_speculations": 3, "draft_threshold": 0.1,
                                                           "with_lookup": {"num_speculations": 2, "draft_threshold": 0.4}}))
    manifest = export(checkpoint, tmp_path / "a", methods=("draft", "verify"))
    assert (manifest.num_speculations, manifest.draft_threshold) == (3, 0.1)
    for_lookup = export(checkpoint, tmp_path / "c", methods=("draft", "verify"), pad_drafts=True)
    assert (for_lookup.num_speculations, for_lookup.draft_threshold) == (2, 0.4)  # what was measured beside lookup
    opened = open_artifact(manifest.directory)
    assert opened.draft_threshold == 0.1
    assert open_artifact(manifest.directory, draft_threshold=0.0).draft_threshold == 0.0
    padded = export(checkpoint, tmp_path / "b", methods=("draft", "verify"), draft_threshold=0.7, pad_drafts=True)
    assert padded.draft_threshold == 0.7 and padded.extra["pad_drafts"] and "pad_drafts" not in manifest.extra
    assert open_artifact(padded.directory).backend.pad_drafts and not opened.backend.pad_drafts
    ar = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=40, self_speculative=False))
    spec = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=40, num_speculations=3,
                                                             draft_threshold=opened.draft_threshold))
    assert spec.tokens == ar.tokens and spec.stats.early_stops > 0


def test_for_lookup_exports_a_checkpoint_without_layerskip_training(tmp_path, capsys):
    """--for-lookup on a checkpoint with no layerskip.json and a large vocabulary: exit at L/4, tau 0.99 and a
    draft head over 256 tokens, said in one line; the artifact is exact for --lookup, which is then on."""
    from conftest import tiny_model, write_checkpoint

    checkpoint = write_checkpoint(tmp_path / "ckpt", tiny_model(vocab_size=20000, num_hidden_layers=8))
    (checkpoint / "layerskip.json").unlink()
    with pytest.raises(UserError, match="or --for-lookup to draft from the context only"):
        export(checkpoint, tmp_path / "refused")
    m = export(checkpoint, tmp_path / "a", for_lookup=True)
    assert "records no exit" in capsys.readouterr().err
    assert (m.exit_layer, m.draft_threshold, m.draft_vocab) == (2, 0.99, 256)
    assert m.extra["pad_drafts"] and m.exact_lookup
    chosen = export(checkpoint, tmp_path / "b", for_lookup=True, exit_layer=3, draft_threshold=0.5, draft_vocab=512)
    assert (chosen.exit_layer, chosen.draft_threshold, chosen.draft_vocab) == (3, 0.5, 512)  # flags win
    assert "records no exit" not in capsys.readouterr().err  # nothing left to choose, nothing said
    partly = export(checkpoint, tmp_path / "c", for_lookup=True, exit_layer=3)
    assert (partly.exit_layer, partly.draft_threshold, partly.draft_vocab) == (3, 0.99, 256)
    backend = open_artifact(m.directory).backend
    plain = generate(backend, PROMPT, GenerationConfig(max_new_tokens=40, self_speculative=False))
    looked_up = generate(backend, PROMPT, GenerationConfig(max_new_tokens=40, lookup=DEFAULT_LOOKUP,
                                                           draft_threshold=m.draft_threshold))
    assert looked_up.tokens == plain.tokens


@pytest.mark.parametrize("backend,pad_drafts", [("onnx", True), ("xnnpack", False), ("all", True)])
def test_for_lookup_sets_what_makes_each_target_exact(tiny_checkpoint, backend, pad_drafts):
    cfg = ExportConfig(model=tiny_checkpoint, backend=backend, for_lookup=True)
    assert (cfg.pte_attention, cfg.pad_drafts, cfg.exact_lookup) == ("row_sdpa", pad_drafts, True)
    cfg = ExportConfig(model=tiny_checkpoint, backend=backend, for_lookup=True, pte_attention="row_invariant")
    assert (cfg.pte_attention, cfg.exact_lookup) == ("row_invariant_drafts", True)
    with pytest.raises(UserError, match="--for-lookup needs a row-invariant attention"):
        ExportConfig(model=tiny_checkpoint, backend=backend, for_lookup=True, pte_attention="custom_sdpa")


def test_the_one_call_lookup_method_is_for_small_models_exported_for_exact_lookup():
    """draft_verify holds every layer, a second copy of the weights in memory: only artifacts exact for
    lookup get it, and only below LOOKUP_METHOD_MAX_PARAMETERS (the shipped model: 7.9M; SmolLM2-135M not)."""
    from export.methods import LOOKUP_METHOD_MAX_PARAMETERS
    from models.config import ModelConfig

    small = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                        num_attention_heads=4, num_key_value_heads=4)
    large = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3)
    assert small.num_parameters() < LOOKUP_METHOD_MAX_PARAMETERS < large.num_parameters()
    both = ExportConfig(backend="all", for_lookup=True)
    for target in ("onnx", "pte"):
        assert both.methods_for(target, small) == ["draft", "verify", "forward", "draft_verify"]
        assert both.methods_for(target, large) == ["draft", "verify", "forward"]
    # the .pte's drafts are not row-invariant with --pte-attention row_invariant; with row_sdpa, the default, they are
    padded_only = ExportConfig(backend="all", pad_drafts=True, pte_attention="row_invariant")
    assert padded_only.methods_for("onnx", small)[-1] == "draft_verify"
    assert "draft_verify" not in padded_only.methods_for("pte", small)
    assert ExportConfig(backend="xnnpack").methods_for("pte", small)[-1] == "draft_verify"
    assert "draft_verify" not in ExportConfig(backend="all").methods_for("onnx", small)
    opted_out = ExportConfig(backend="all", for_lookup=True, draft_verify=False)
    assert "draft_verify" not in opted_out.methods_for("onnx", small)


def test_no_draft_verify_leaves_the_one_call_lookup_method_out(tiny_checkpoint, tmp_path):
    """export.py --for-lookup --no-draft-verify: an exact-lookup artifact with one copy of the weights per session."""
    import json
    import subprocess
    import sys

    args = ["--model", str(tiny_checkpoint), "--backend", "onnx", "--for-lookup", "--no-draft-verify",
            "--out", str(tmp_path), "--max-seq-len", "128", "--max-tokens-per-call", "16"]
    proc = subprocess.run([sys.executable, "export.py", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-500:]
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["methods"] == ["draft", "verify", "forward"] and manifest["extra"]["pad_drafts"]
    assert not (tmp_path / "onnx" / "draft_verify.onnx").exists()


@pytest.mark.parametrize("group_size", [0, 48, 512])
def test_a_block_size_matmulnbits_cannot_take_is_refused_before_any_work(tiny_checkpoint, tmp_path, group_size):
    with pytest.raises(UserError, match="MatMulNBits block size"):
        export(tiny_checkpoint, tmp_path, quant="int4", group_size=group_size)
    assert not (tmp_path / "onnx").exists()
