"""The .pte artifact: numerics against eager, exact self-speculation, weights stored once, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.artifact import read_manifest
from export.pipeline import ExportConfig, run_export
from exported import (PROMPT, call_sequence, check_looked_up_drafts_keep_the_tokens, copy_artifact,
                      draft_verify_and_one_by_one, drafts_together_and_alone, eager_reference, generate_cli_lookup,
                      max_diff, verify_together_and_alone)
from runtime.errors import UserError
from runtime.decoding import DEFAULT_LOOKUP, GenerationConfig, generate
from runtime.loader import open_artifact

pytestmark = pytest.mark.filterwarnings("ignore")


WITH_FUSED_DRAFT = ("draft", "verify", "forward", "draft_greedy")


def export(checkpoint, out, **kw):
    return run_export(ExportConfig(model=checkpoint, out=out, max_seq_len=128, max_tokens_per_call=16, **kw))[0]


@pytest.fixture(scope="module")
def fp32_pte(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("fp32"), methods=WITH_FUSED_DRAFT, pte_attention="custom_sdpa")


@pytest.fixture(scope="module")
def int4_pte(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("int4"), quant="int4", group_size=32,
                  methods=WITH_FUSED_DRAFT, pte_attention="custom_sdpa")


@pytest.fixture(scope="module")
def row_invariant_pte(tiny_checkpoint, tmp_path_factory):
    """The verify method's row-invariant attention in XNNPACK ops (the default until row_sdpa)."""
    return export(tiny_checkpoint, tmp_path_factory.mktemp("rowinv"), quant="int4", group_size=32,
                  methods=WITH_FUSED_DRAFT, pte_attention="row_invariant")


@pytest.fixture(scope="module")
def row_sdpa_pte(tiny_checkpoint, tmp_path_factory):
    """The default attention (row_sdpa: our kernel in every method, one set of caches)."""
    return export(tiny_checkpoint, tmp_path_factory.mktemp("rowsdpa"), quant="int4", group_size=32,
                  methods=WITH_FUSED_DRAFT)


@pytest.fixture(scope="module")
def row_invariant_drafts_pte(tiny_checkpoint, tmp_path_factory):
    """Drafts attend row-invariantly too (--pte-attention row_invariant_drafts, for exact --lookup)."""
    return export(tiny_checkpoint, tmp_path_factory.mktemp("rowinvd"), quant="int4", group_size=32,
                  pte_attention="row_invariant_drafts")


@pytest.mark.parametrize("attention", ["custom_sdpa", "row_invariant", "row_invariant_drafts", "row_sdpa"])
def test_draft_and_verify_match_eager_including_after_rollback(tiny_checkpoint, fp32_pte, attention, tmp_path):
    manifest = fp32_pte if attention == "custom_sdpa" else export(tiny_checkpoint, tmp_path, pte_attention=attention)
    expected = eager_reference(tiny_checkpoint, manifest.exit_layer, manifest.max_seq_len)
    got = call_sequence(open_artifact(manifest.directory).backend)
    assert max_diff(got, expected) <= 1e-4
    assert manifest.extra["attention"] == attention


def test_row_invariant_attention_gives_each_verify_row_the_bits_of_a_one_token_call(row_invariant_pte):
    """With --pte-attention row_invariant (the default), a token's verify logits do not depend on how many
    tokens share the call: the property that makes greedy self-speculation equal plain decoding by
    construction. (The same check on a custom_sdpa artifact of this model differs by 9.5e-7, measured once.)
    The full-model method keeps custom_sdpa, on caches of its own."""
    together, alone = verify_together_and_alone(open_artifact(row_invariant_pte.directory).backend)
    assert np.array_equal(together, alone)
    assert row_invariant_pte.extra["attention"] == "row_invariant"
    layers, exit_layer = row_invariant_pte.model_config["num_hidden_layers"], row_invariant_pte.exit_layer
    verify = instructions(row_invariant_pte.path("program"), "verify")
    assert verify["llama::custom_sdpa"] == 0 and verify["llama::update_cache"] == 2 * (layers - exit_layer)
    forward = instructions(row_invariant_pte.path("program"), "forward")
    assert forward["llama::custom_sdpa"] == layers and forward["llama::update_cache"] == 2 * layers


def test_row_invariant_drafts_give_a_row_the_bits_of_a_one_token_draft(row_invariant_drafts_pte, monkeypatch):
    """--pte-attention row_invariant_drafts: a multi-row draft (tokens looked up in the context) leaves each
    row's layer-E state and verify logits with the bits of 1-token drafts, so --lookup equals plain decoding
    by construction; the draft method attends without custom_sdpa. (On this tiny model custom_sdpa's draft
    rows happen to agree too at these positions; on SmolLM2 they do not, README "Fourteen sessions ago".)"""
    backend = open_artifact(row_invariant_drafts_pte.directory).backend
    (rows, logits), (rows_alone, logits_alone) = drafts_together_and_alone(backend)
    assert np.array_equal(rows, rows_alone) and np.array_equal(logits, logits_alone)
    draft = instructions(row_invariant_drafts_pte.path("program"), "draft")
    assert draft["llama::custom_sdpa"] == 0
    assert row_invariant_drafts_pte.extra["key_mask_methods"] == ["draft", "verify", "draft_verify"]
    # a lookup step's draft and verify in one call (draft_verify): the bits of plain decoding's 1-token calls
    assert "draft_verify" in row_invariant_drafts_pte.methods and backend.has_draft_verify
    (rows, logits), (rows_alone, logits_alone) = draft_verify_and_one_by_one(backend)
    assert np.array_equal(rows, rows_alone) and np.array_equal(logits, logits_alone)
    check_looked_up_drafts_keep_the_tokens(backend, monkeypatch)
    backend.has_draft_verify = False  # the draft + verify calls of a lookup step, as before
    check_looked_up_drafts_keep_the_tokens(backend, monkeypatch)


def test_lookup_is_on_by_default_only_where_it_is_exact(row_invariant_drafts_pte, row_invariant_pte, row_sdpa_pte,
                                                       capsys):
    """runtime.generate looks drafts up by default on row_invariant_drafts and row_sdpa artifacts."""
    assert generate_cli_lookup(row_invariant_drafts_pte.directory, capsys) == DEFAULT_LOOKUP
    assert generate_cli_lookup(row_invariant_drafts_pte.directory, capsys, "--lookup", "0") == 0
    assert generate_cli_lookup(row_sdpa_pte.directory, capsys) == DEFAULT_LOOKUP
    assert generate_cli_lookup(row_invariant_pte.directory, capsys) == 0


def test_steps_that_look_up_nothing_make_one_full_call_where_it_is_exact(row_sdpa_pte, row_invariant_drafts_pte):
    """Where every method attends through row_sdpa the full-model call has plain decoding's bits, so a step of --lookup
    that matched nothing is one full-model call by default (decoding.default_unmatched_step); output stays plain
    decoding's either way. Elsewhere (the full-model call on caches of its own) such steps draft from the exit."""
    from dataclasses import replace

    from runtime.decoding import step_policy

    backend = open_artifact(row_sdpa_pte.directory, threads=1).backend
    cfg = GenerationConfig(max_new_tokens=60, num_speculations=3, lookup=DEFAULT_LOOKUP)
    assert step_policy(backend, cfg)["unmatched_step"] == "plain"
    plain = generate(backend, PROMPT, GenerationConfig(max_new_tokens=60, self_speculative=False,
                                                       full_model_baseline=True))
    by_default, by_exit = generate(backend, PROMPT, cfg), generate(backend, PROMPT, replace(cfg, unmatched_step="exit"))
    assert by_default.tokens == by_exit.tokens == plain.tokens
    assert by_default.stats.step_tokens.get("plain", 0) > 0 and "exit" not in by_default.stats.step_tokens
    assert by_default.stats.full_calls > 0 and by_default.stats.lookup_steps > 0
    assert f"+ {by_default.stats.full_calls} full-model calls" in by_default.stats.summary()
    assert by_exit.stats.step_tokens.get("exit", 0) > 0 and "plain" not in by_exit.stats.step_tokens
    other = open_artifact(row_invariant_drafts_pte.directory, threads=1).backend
    assert step_policy(other, cfg)["unmatched_step"] == "exit"
    with pytest.raises(UserError, match="--unmatched-step 'full' is unknown"):
        GenerationConfig(unmatched_step="full")


def test_row_sdpa_gives_a_row_the_bits_of_a_one_token_call_in_every_method(row_sdpa_pte, monkeypatch):
    """--pte-attention row_sdpa (the default): every method attends through our kernel on one set of caches, and
    a token's exit-cache row and logits have the same bits in a call of any row count as decoded alone, in
    verify, draft, draft_verify and the full-model call alike. So greedy self-speculation, with or without
    --lookup, equals plain decoding through the full call by construction."""
    backend = open_artifact(row_sdpa_pte.directory).backend
    together, alone = verify_together_and_alone(backend)
    assert np.array_equal(together, alone)
    (rows, logits), (rows_alone, logits_alone) = drafts_together_and_alone(backend)
    assert np.array_equal(rows, rows_alone) and np.array_equal(logits, logits_alone)
    assert backend.has_draft_verify
    (rows, logits), (rows_alone, logits_alone) = draft_verify_and_one_by_one(backend)
    assert np.array_equal(rows, rows_alone) and np.array_equal(logits, logits_alone)
    # the full-model call: five rows at once, one at a time, and plain decoding's draft + verify calls
    backend.forward(PROMPT, 0)
    pos, tokens = len(PROMPT), [5, 6, 7, 8, 9]
    full_together = np.array(backend.forward(tokens, pos))
    full_alone = [np.array(backend.forward([t], pos + k)) for k, t in enumerate(tokens)]
    assert np.array_equal(full_together, full_alone[-1])
    split = [np.array((backend.draft([t], pos + k), backend.verify(pos + k, 1))[1][0]) for k, t in enumerate(tokens)]
    assert all(np.array_equal(a, b) for a, b in zip(full_alone, split))
    layers, exit_layer = row_sdpa_pte.model_config["num_hidden_layers"], row_sdpa_pte.exit_layer
    for method, attending in (("draft", exit_layer), ("verify", layers - exit_layer), ("forward", layers),
                              ("draft_verify", layers)):
        ops = instructions(row_sdpa_pte.path("program"), method)
        assert ops["layerskip::row_sdpa"] == attending and ops["llama::custom_sdpa"] == 0, method
    check_looked_up_drafts_keep_the_tokens(backend, monkeypatch)


def test_row_sdpa_vectorized_path_matches_eager_and_keeps_rows_at_head_dim_64(tmp_path_factory):
    """The kernel's vectorized path (AVX-512 or AVX2, head_dim 32 / 64 / 128; the tiny model's 16 takes the portable
    loop), with two query heads per KV head, in a real .pte and its caches: exported logits match eager, and rows keep
    their bits in calls of 1 and 5 rows."""
    from conftest import tiny_model, write_checkpoint

    checkpoint = write_checkpoint(tmp_path_factory.mktemp("d64") / "ckpt",
                                  tiny_model(hidden_size=128, num_attention_heads=2, num_key_value_heads=1))
    manifest = export(checkpoint, tmp_path_factory.mktemp("d64pte"), methods=("draft", "verify", "forward"))
    assert manifest.extra["attention"] == "row_sdpa" and manifest.shape.head_dim == 64
    backend = open_artifact(manifest.directory).backend
    expected = eager_reference(checkpoint, manifest.exit_layer, manifest.max_seq_len)
    assert max_diff(call_sequence(backend), expected) <= 1e-4
    together, alone = verify_together_and_alone(backend)
    assert np.array_equal(together, alone)
    context = PROMPT * 4  # past the kernel's first block of 32 keys, in calls of at most 16 tokens
    for start in range(0, len(context), 16):
        backend.forward(context[start:start + 16], start)
    pos, tokens = len(context), [5, 6, 7, 8, 9]
    full_together = np.array(backend.forward(tokens, pos))
    assert np.array_equal(full_together, [np.array(backend.forward([t], pos + k)) for k, t in enumerate(tokens)][-1])


def run_kernel_check(name: str, flags: tuple[str, ...], tmp_path) -> str:
    """Builds tests/<name>.cpp (which includes a kernel's source) with the kernel's flags, runs it, returns its
    output; skips a forced instruction set the machine's own build would not leave out."""
    from runtime import kernels

    cpu = Path("/proc/cpuinfo").read_text()
    if any(f"-mno-{isa}" in flags and f" {isa}" not in cpu for isa in ("avx512f", "avx2")):
        pytest.skip("the native build is that one here")
    include, lib, _ = kernels.executorch_dirs()
    program = tmp_path / name
    source = Path(__file__).with_name(f"{name}.cpp")
    subprocess.run(kernels.compile_command("g++", include, lib, program, (source,), shared=False, flags=flags),
                   check=True)
    done = subprocess.run([str(program)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
    return done.stdout.strip()


@pytest.mark.parametrize("flags", [(), ("-mno-avx512f",)], ids=["native", "avx2"])
def test_row_sdpa_attention_keeps_its_bits_across_row_counts_and_cache_alignment(flags, tmp_path):
    """tests/row_sdpa_check.cpp drives the kernel's attention directly: rows keep their bits in calls of any row
    count, whatever the caches' offset from a 64-byte line (the AVX-512 path's aligned loads, 0..15 floats), and
    match attention in double; head_dim 16 / 32 / 64 / 128. Built as the machine targets it, and forced to AVX2."""
    assert run_kernel_check("row_sdpa_check", flags, tmp_path) == "ok"


@pytest.mark.parametrize("flags,path", [((), ""), (("-mno-avx512f",), "avx2"), (("-mno-avx2",), "portable")],
                         ids=["native", "avx2", "portable"])
def test_linear_q4_keeps_its_bits_across_row_counts_and_instruction_sets(flags, path, tmp_path):
    """tests/linear_q4_check.cpp drives the 4-bit linear directly: the vectorized path gives the portable loop's bits
    in calls of 1..13 rows and over part of the blocks, a row the same bits in any call, and the exact integer sum's
    value to the epilogue's rounding. Built as the machine targets it, forced to AVX2, and forced portable."""
    out = run_kernel_check("linear_q4_check", flags, tmp_path)
    assert out.startswith("ok (") and (not path or out == f"ok ({path})")


@pytest.mark.parametrize("group_size", [0, 32], ids=["per_channel", "group32"])
def test_linear_q4_matches_torchao_and_gives_a_row_the_bits_of_a_one_token_call(tiny_checkpoint, group_size,
                                                                                 tmp_path):
    """--pte-linear linear_q4: every linear of every method runs our kernel (each layer as one layerskip::decoder_layer
    call, export/fused_layer.py, the head through linear_q4), whose numbers are torchao's 8da4w (to float rounding),
    per output channel and per group of 32 inputs; rows keep their bits in calls of any row count in every method, and
    greedy self-speculation, with and without lookup, equals plain decoding and the full call."""
    from models.checkpoint import load_model
    from quant.torchao_schemes import quantize_model
    from runtime.eager import EagerBackend

    m = export(tiny_checkpoint, tmp_path, quant="int4", group_size=group_size, pte_linear="linear_q4")
    assert m.group_size == group_size and m.extra["linear"] == "linear_q4"
    model, _ = load_model(tiny_checkpoint)
    quantize_model(model, "int4", group_size)
    expected = call_sequence(EagerBackend(model, m.exit_layer, m.max_seq_len))
    backend = open_artifact(m.directory).backend
    scale = max(float(np.abs(e).max()) for e in expected)
    assert max_diff(call_sequence(backend), expected) <= 1e-4 * scale
    together, alone = verify_together_and_alone(backend)
    assert np.array_equal(together, alone)
    (rows, logits), (rows_alone, logits_alone) = drafts_together_and_alone(backend)
    assert np.array_equal(rows, rows_alone) and np.array_equal(logits, logits_alone)
    ar = generate(backend, PROMPT, GenerationConfig(max_new_tokens=60, self_speculative=False, full_model_baseline=True))
    for lookup in (0, DEFAULT_LOOKUP):  # exit drafts where lookup matches nothing (this model's text rarely repeats)
        spec = generate(backend, PROMPT, GenerationConfig(max_new_tokens=60, num_speculations=3, lookup=lookup,
                                                          unmatched_step="exit"))
        assert spec.tokens == ar.tokens and 0 < spec.stats.accepted
    layers, exit_layer = m.model_config["num_hidden_layers"], m.exit_layer
    for method, count in (("draft", exit_layer), ("verify", layers - exit_layer), ("forward", layers)):
        calls = instructions(m.path("program"), method)  # a layer is one call (export/fused_layer.py), then the head
        assert calls["layerskip::decoder_layer"] == count and calls["layerskip::linear_q4"] == 1, method
        assert calls["layerskip::rms_norm"] == 1 and "DELEGATE" not in calls, method  # the final norm is ours too
        assert "layerskip::row_sdpa" not in calls and "llama::update_cache" not in calls, method


def test_joined_linear_q4_is_its_parts_side_by_side():
    """The .pte joins each layer's q/k/v and gate/up LinearQ4s into one (quant.linear_q4.join_projections): the joined
    weights are the parts' stacked (unpacked exactly), its output is theirs side by side, and the layer computes what
    it computed before (the kernel's bits per channel are checked by linear_q4_check.cpp, whose blocks are
    independent of their neighbours)."""
    from conftest import tiny_model
    from export.to_pte import XnnpackAttention
    from quant.linear_q4 import JoinedMLP, LinearQ4, join_projections, use_linear_q4
    from quant.torchao_schemes import quantize_model

    model = tiny_model()
    quantize_model(model, "int4", 32)
    use_linear_q4(model)
    layer = model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(1, 3, model.config.hidden_size)
    with torch.no_grad():
        separate = [torch.cat([p(x) for p in parts], -1), mlp(x)]
        for layer in model.layers:
            layer.self_attn = XnnpackAttention(layer.self_attn)
        assert join_projections(model) == 5 * model.config.num_hidden_layers
        joined_attn, joined_mlp = model.layers[0].self_attn, model.layers[0].mlp
        assert isinstance(joined_mlp, JoinedMLP) and joined_attn.q_proj is None
        q, scale = joined_attn.qkv_proj.dense_weights()
        assert torch.equal(q, torch.cat([p.dense_weights()[0] for p in parts]))
        assert torch.equal(scale, torch.cat([p.dense_weights()[1] for p in parts]))
        assert joined_attn.qkv_sizes == [p.out_features for p in parts]
        torch.testing.assert_close(joined_attn.qkv_proj(x), separate[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(joined_mlp(x), separate[1], rtol=1e-6, atol=1e-6)
    assert isinstance(joined_attn.qkv_proj, LinearQ4)


def test_fused_layer_computes_what_the_layers_ops_did():
    """A linear_q4 .pte's layer as one layerskip::decoder_layer call (export/fused_layer.py): its torch reference gives
    the logits and writes the caches the layer's ops did, over a prompt and a step after it (the kernel itself is
    checked against torchao's eager model through the .pte: test_linear_q4_matches_torchao_...)."""
    from conftest import tiny_model
    from export.fused_layer import FusedDecoderLayer, fuse_layers
    from export.to_pte import prepare_for_executorch
    from quant.linear_q4 import join_projections, use_linear_q4
    from quant.torchao_schemes import quantize_model

    model = tiny_model()
    quantize_model(model, "int4", 32)
    use_linear_q4(model)
    prepare_for_executorch(model, 16, "row_sdpa")
    join_projections(model)
    tokens = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))

    def decode():
        for cache in model.caches:
            cache.k.zero_(), cache.v.zero_()
        with torch.no_grad():
            logits = [model(tokens[:, :5], torch.tensor([0])), model(tokens[:, 5:], torch.tensor([5]))]
        return logits, [torch.cat([c.k, c.v]).clone() for c in model.caches]

    expected_logits, expected_caches = decode()
    assert fuse_layers(model) == model.config.num_hidden_layers
    assert all(isinstance(layer, FusedDecoderLayer) for layer in model.layers)
    logits, caches = decode()
    for got, expected in zip(logits + caches, expected_logits + expected_caches):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert caches[0][:, 7:].abs().sum() == 0 and caches[0][:, :7].abs().sum() > 0  # positions 0..6 written


@pytest.mark.parametrize("flags,message", [
    (dict(quant="int8"), "--pte-linear linear_q4 computes 4-bit linears; it needs --quant int4, not 'int8'"),
    (dict(quant="int4", pte_linear="fast"), "--pte-linear 'fast' is unknown; use one of xnnpack, linear_q4"),
])
def test_linear_q4_refuses_what_it_cannot_compute(tiny_checkpoint, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        ExportConfig(model=tiny_checkpoint, out=tmp_path, **{"pte_linear": "linear_q4", **flags})


def test_linear_q4_is_the_default_for_large_int4_models_and_where_the_checkpoint_records_it():
    """Without --pte-linear, 8da4w models above 300M parameters get our kernel (measured faster there), others
    XNNPACK's unless their layerskip.json records the kernel measured faster for them (both shipped models: ours);
    other schemes XNNPACK's; an explicit choice stands; a recorded kernel we do not have is a clear error."""
    from export.pipeline import LINEAR_Q4_MIN_PARAMETERS
    from runtime.scale import LLAMA_3_2_1B
    from conftest import tiny_model

    assert LLAMA_3_2_1B.num_parameters() > LINEAR_Q4_MIN_PARAMETERS
    tiny = tiny_model().config
    assert ExportConfig().pte_linear_for(LLAMA_3_2_1B, "8da4w") == "linear_q4"
    assert ExportConfig().pte_linear_for(LLAMA_3_2_1B, "8da8w") == "xnnpack"
    assert ExportConfig().pte_linear_for(tiny, "8da4w") == "xnnpack"
    assert ExportConfig(pte_linear="xnnpack").pte_linear_for(LLAMA_3_2_1B, "8da4w") == "xnnpack"
    models = Path(__file__).parents[1] / "models"
    shipped = json.loads((models / "default" / "layerskip.json").read_text())
    assert ExportConfig().pte_linear_for(tiny, "8da4w", shipped) == "linear_q4"
    assert ExportConfig().pte_linear_for(tiny, "8da8w", shipped) == "xnnpack"
    assert ExportConfig(pte_linear="xnnpack").pte_linear_for(tiny, "8da4w", shipped) == "xnnpack"
    deep16 = json.loads((models / "deep16" / "layerskip.json").read_text())
    assert ExportConfig().pte_linear_for(tiny, "8da4w", deep16) == "linear_q4"
    assert ExportConfig().pte_linear_for(tiny, "8da4w", {}) == "xnnpack"
    with pytest.raises(UserError, match="pte_linear 'fast'"):
        ExportConfig().pte_linear_for(tiny, "8da4w", {"pte_linear": "fast"})


def test_the_row_sdpa_kernel_is_built_once_and_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    from runtime import kernels

    built = kernels.library()
    assert built.exists() and kernels.library() == built  # cached: the second call builds nothing
    monkeypatch.setenv("LAYERSKIP_KERNEL_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(UserError, match="no C\\+\\+ compiler 'no-such-compiler' was found: install g\\+\\+"):
        kernels.library()
    assert not (tmp_path / "kernels").exists()  # nothing half-built left


def test_row_invariant_drafts_refuse_the_fused_draft(tiny_checkpoint):
    with pytest.raises(UserError, match="--fused-draft cannot go with --pte-attention row_invariant_drafts"):
        ExportConfig(model=tiny_checkpoint, pte_attention="row_invariant_drafts", methods=WITH_FUSED_DRAFT)


def test_full_model_method_matches_eager(tiny_checkpoint, fp32_pte):
    backend = open_artifact(fp32_pte.directory).backend
    from models.checkpoint import load_model

    model, _ = load_model(tiny_checkpoint)
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT]), torch.tensor([0]))[0, -1].numpy()
    assert np.abs(backend.forward(PROMPT, 0) - expected).max() <= 1e-4


@pytest.mark.parametrize("which", ["fp32_pte", "int4_pte", "row_invariant_pte", "row_sdpa_pte"])
def test_greedy_self_speculation_equals_autoregressive_on_the_pte(which, request):
    opened = open_artifact(request.getfixturevalue(which).directory)
    ar = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=60, self_speculative=False))
    full = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=60, self_speculative=False,
                                                             full_model_baseline=True))
    spec = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=60, num_speculations=3))
    one_by_one = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=60, num_speculations=3,
                                                                   fused_draft=False))
    assert spec.tokens == one_by_one.tokens == ar.tokens == full.tokens
    assert spec.stats.accepted > 0 and spec.stats.accepted < spec.stats.drafted
    assert spec.stats.draft_calls < one_by_one.stats.draft_calls  # the fused draft_greedy method was used


@pytest.mark.parametrize("which", ["fp32_pte", "row_invariant_pte"])
def test_looked_up_drafts_go_through_the_prefix_in_one_call_and_keep_the_tokens(which, request, monkeypatch):
    check_looked_up_drafts_keep_the_tokens(open_artifact(request.getfixturevalue(which).directory).backend, monkeypatch)


@pytest.fixture(scope="module")
def per_channel_int4_pte(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("int4pc"), quant="int4", group_size=0,
                  methods=("draft", "verify"))


@pytest.mark.parametrize("which", ["int4_pte", "per_channel_int4_pte", "row_invariant_pte"])
def test_int4_pte_matches_the_torchao_quantized_eager_model(tiny_checkpoint, which, request):
    """The lowering is faithful to torchao's 8da4w numerics (XNNPACK's int8 activation rounding aside),
    per group of 32 input channels and per output channel (--group-size 0)."""
    from models.checkpoint import load_model
    from quant.torchao_schemes import quantize_model
    from runtime.eager import EagerBackend

    manifest = request.getfixturevalue(which)
    model, _ = load_model(tiny_checkpoint)
    quantize_model(model, "int4", manifest.group_size)
    expected = call_sequence(EagerBackend(model, manifest.exit_layer, manifest.max_seq_len))
    got = call_sequence(open_artifact(manifest.directory).backend)
    scale = max(float(np.abs(e).max()) for e in expected)
    assert max_diff(got, expected) <= 0.08 * scale
    if which == "per_channel_int4_pte":  # the two layouts differ: the test compares against the right one
        quantize_model(grouped := load_model(tiny_checkpoint)[0], "int4", 32)
        other = call_sequence(EagerBackend(grouped, manifest.exit_layer, manifest.max_seq_len))
        assert max_diff(other, expected) > 1e-3
        opened = open_artifact(manifest.directory)
        ar = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=60, self_speculative=False))
        spec = generate(opened.backend, PROMPT, GenerationConfig(max_new_tokens=60, num_speculations=3))
        assert spec.tokens == ar.tokens and 0 < spec.stats.accepted < spec.stats.drafted


@pytest.mark.parametrize("quant,linear", [("none", "xnnpack"), ("int4", "xnnpack"), ("int4", "linear_q4")])
def test_weights_are_stored_once(wide_checkpoint, tmp_path, quant, linear):
    """Draft and verify methods sharing weights cost no more than the full model alone as one method (+2%); with
    linear_q4 the packed weights are constants of the program, which the serializer also stores once."""
    split = export(wide_checkpoint, tmp_path / "split", quant=quant, methods=("draft", "verify"), pte_linear=linear)
    full = export(wide_checkpoint, tmp_path / "full", quant=quant, methods=("forward",), pte_linear=linear)
    assert split.file_sizes["model.pte"] <= 1.02 * full.file_sizes["model.pte"]
    if linear == "linear_q4":  # 4 bits a weight (0.5 bytes) and their scales, once
        from models.config import ModelConfig

        assert split.file_sizes["model.pte"] < 0.8 * ModelConfig.from_dict(split.model_config).num_parameters()


LOAD_MORE_METHODS = """
import sys
from runtime import rss
from runtime.executorch_backend import load_program
program = load_program(sys.argv[1], own_kernels=True, share_weights=sys.argv[2] == "1")
methods = [program.load_method(m) for m in ("draft", "verify")]
before = rss.reset_peak_rss()
methods += [program.load_method(m) for m in ("forward", "draft_verify")]
print(rss.peak_rss_mb() - before)
"""


def test_methods_share_their_packed_weights(wide_checkpoint, tmp_path):
    """With XNNPACK's weight cache (on wherever our kernels load) forward and draft_verify, loaded after draft and
    verify, pack nothing again; without it each packs its own copy of every layer (so the measure can see it). In a
    fresh process each: the option holds for the whole process."""
    artifact = export(wide_checkpoint, tmp_path / "a", methods=("draft", "verify", "forward"))
    assert artifact.methods == ["draft", "verify", "forward", "draft_verify"]
    pte = read_manifest(tmp_path / "a" / "pte").path("program")
    weights_mb = pte.stat().st_size / 2**20  # fp32, stored once

    def grown_mb(share: bool) -> float:
        done = subprocess.run([sys.executable, "-c", LOAD_MORE_METHODS, str(pte), str(int(share))], capture_output=True,
                              text=True, cwd=Path(__file__).parents[1], check=True)
        return float(done.stdout.strip().splitlines()[-1])

    assert grown_mb(share=False) > 1.5 * weights_mb
    assert grown_mb(share=True) < 0.5 * weights_mb


def used_parameters(program) -> set[str]:
    """Parameters whose placeholder feeds some node of the traced graph."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    return {spec.target for spec in program.graph_signature.input_specs
            if spec.target and spec.arg.name in placeholders and placeholders[spec.arg.name].users
            and spec.target in program.graph_signature.parameters}


def test_the_4bit_layout_is_the_checkpoints_own_else_groups_of_32():
    """layerskip.json may record the layout measured for a model (the shipped one: per channel on the
    .pte); any other checkpoint gets groups of 32, halved until they divide every width (TINY: 64)."""
    from export.pipeline import ExportConfig
    from models.config import ModelConfig
    from conftest import TINY

    config, own = ModelConfig(**TINY), {"group_size": {"pte": 0, "onnx": 128}}
    assert ExportConfig().group_size_for("pte", config, {}) == 32
    assert ExportConfig().group_size_for("xnnpack", config, own) == 0
    assert ExportConfig().group_size_for("onnx", config, own) == 64  # 128 does not divide 64
    assert ExportConfig(group_size=16).group_size_for("pte", config, own) == 16  # the flag wins
    with pytest.raises(UserError, match="group-size 48"):
        ExportConfig().group_size_for("pte", config, {"group_size": {"pte": 48}})
    shipped = json.loads((Path(__file__).parents[1] / "models" / "default" / "layerskip.json").read_text())
    assert shipped["group_size"] == {"pte": 0, "onnx": 128}


def instructions(pte_path, method: str) -> dict[str, int]:
    """How many times each operator (and "DELEGATE": an XNNPACK subgraph call) runs in one call of a method."""
    from collections import Counter

    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(Path(pte_path).read_bytes())
    program = getattr(program, "program", program)
    plan = next(p for p in program.execution_plan if p.name == method)
    counts = Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            args = instruction.instr_args
            if hasattr(args, "delegate_index"):
                counts["DELEGATE"] += 1
            elif hasattr(args, "op_index"):
                counts[plan.operators[args.op_index].name] += 1
    return counts


def test_layers_run_inside_xnnpack_apart_from_the_cache_ops(int4_pte):
    """Norms, projections, rotary and MLP of a layer stay inside XNNPACK subgraphs: at most two per layer
    (split only by the cache and SDPA ops). Under a dynamic token count, views, slices and means used to
    stay outside and cut each layer into ~6 subgraphs."""
    layers = int4_pte.model_config["num_hidden_layers"]
    ops = instructions(int4_pte.path("program"), "forward")
    assert ops["llama::custom_sdpa"] == layers
    assert ops["DELEGATE"] <= 2 * layers + 1
    assert ops["aten::mean"] == 0 and ops["aten::slice_copy"] <= 1 and ops["executorch_prim::et_view"] == 0


def test_lowering_skips_only_passes_that_exist_and_only_while_lowering():
    """The passes named are named as executorch names them (a rename would silently keep them) and the
    default pass lists are back after lowering."""
    import executorch.backends.xnnpack.xnnpack_preprocess as preprocess
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig
    from executorch.exir.program import _program
    from export.idle_passes import UNUSED_XNNPACK_PASSES, idle_passes_skipped, pass_name, pass_needs

    def names():
        edge = _program._get_aten_to_edge_passes(EdgeCompileConfig())
        return ([p.__name__ for p in preprocess.XNNPACKPassManager(None).passes],
                [pass_name(p) for p in edge[0] + edge[1] + _program.edge_to_executorch_passes(ExecutorchBackendConfig())])

    xnnpack, other = names()
    assert set(UNUSED_XNNPACK_PASSES) < set(xnnpack) and set(pass_needs()) < set(xnnpack + other)
    with idle_passes_skipped():
        assert names() == ([p for p in xnnpack if p not in UNUSED_XNNPACK_PASSES], other)
        assert preprocess.XNNPACKPassManager(None).passes[1].call is not preprocess.XNNPACKPassManager.__base__(None).passes[1].call
    assert names() == (xnnpack, other)


def program_without_grad_flags(directory: Path) -> tuple:
    """A .pte's program and data, with the requires_grad flags (which the runtime does not read) cleared."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary((directory / "model.pte").read_bytes())
    return (str(pte.program).replace("requires_grad=True", "requires_grad=False"), pte.mutable_data, pte.named_data)


def test_parallel_lowering_gives_the_same_program(tiny_checkpoint, per_channel_int4_pte, tmp_path):
    """per_channel_int4_pte was lowered in as many processes as there are cores; this one the other way."""
    from export.to_pte import default_jobs

    other = export(tiny_checkpoint, tmp_path, quant="int4", group_size=0, methods=("draft", "verify"),
                   jobs=1 if default_jobs() > 1 else 2)
    assert program_without_grad_flags(per_channel_int4_pte.directory) == program_without_grad_flags(other.directory)
    got = [call_sequence(open_artifact(m.directory).backend) for m in (per_channel_int4_pte, other)]
    assert max_diff(got[0], got[1]) == 0.0


@pytest.mark.parametrize("quant,backend,methods,attention", [
    ("int4", "xnnpack", ("draft",), "custom_sdpa"), ("none", "xnnpack", ("verify",), "custom_sdpa"),
    ("none", "portable", ("draft",), "custom_sdpa"), ("none", "xnnpack", ("verify",), "row_invariant")])
def test_fast_lowering_gives_executorchs_program(tiny_checkpoint, quant, backend, methods, attention, tmp_path,
                                                 monkeypatch):
    """Our delegate() + to_executorch() (one decomposition, idle passes skipped, delegates' outputs from
    their recorded shapes where those describe them, else run again) against ExecuTorch's own
    to_edge_transform_and_lower + to_executorch with every pass and every delegate run again, on the same
    model, methods and partitioner. (row_invariant's verify has delegates whose output sizes are not an
    input's, pos + T keys: those are run again.)"""
    from contextlib import nullcontext

    import export.idle_passes as idle_passes
    import export.to_pte as to_pte
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    def executorchs_delegate(programs, backend, constants=None):  # with our partitioner's choices (cache views)
        partitioner = [to_pte.xnnpack_partitioner()] if backend == "xnnpack" else []
        return to_edge_transform_and_lower(programs, partitioner=partitioner,
                                           constant_methods=constants,
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))

    described = []
    monkeypatch.setattr(idle_passes, "delegate_outputs",
                        lambda module, read=idle_passes.delegate_outputs: described.append(read(module)) or described[-1])
    ours = export(tiny_checkpoint, tmp_path / "ours", quant=quant, methods=methods, backend=backend, jobs=1,
                  pte_attention=attention)
    described_all = all(d is not None for d in described)
    assert (described_all if attention == "custom_sdpa" else any(described)) and (len(described) > 0) == (backend == "xnnpack")
    monkeypatch.setattr(to_pte, "delegate", executorchs_delegate)
    monkeypatch.setattr(to_pte, "idle_passes_skipped", nullcontext)
    monkeypatch.setattr(to_pte, "delegates_not_rerun", nullcontext)
    theirs = export(tiny_checkpoint, tmp_path / "theirs", quant=quant, methods=methods, backend=backend, jobs=1,
                    pte_attention=attention)
    assert program_without_grad_flags(ours.directory) == program_without_grad_flags(theirs.directory)


def test_methods_are_grouped_by_their_layers_for_the_lowering_processes():
    from export.to_pte import method_costs, method_groups

    costs = method_costs(["draft", "verify", "forward"], num_layers=30, exit_layer=8, draft_length=4)
    assert costs == {"draft": 9, "verify": 23, "forward": 31}
    assert method_groups(costs, 1) == [["draft", "verify", "forward"]]
    assert method_groups(costs, 2) == [["draft", "verify"], ["forward"]]
    assert method_groups(costs, 8) == [["forward"], ["verify"], ["draft"]]


def test_a_model_too_large_to_pay_is_lowered_in_one_process(small_vocab_model, monkeypatch):
    import export.to_pte as to_pte

    monkeypatch.setattr(to_pte.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert to_pte.default_jobs(small_vocab_model) == 2
    monkeypatch.setattr(to_pte, "PARALLEL_LOWERING_MAX_PARAMETERS", 1000)
    assert to_pte.default_jobs(small_vocab_model) == 1


@pytest.mark.parametrize("failure,message", [("raise", "ValueError: no kernel"), ("exit", "exited with code 9")])
def test_a_failed_lowering_process_fails_the_export(failure, message):
    import os

    from export.to_pte import in_processes

    parent = os.getpid()

    def lower_group(names):
        if os.getpid() != parent:
            if failure == "exit":
                os._exit(9)
            raise ValueError("no kernel")
        return {}

    with pytest.raises(RuntimeError, match=f"method.s. draft, verify in a child process failed: .*{message}"):
        in_processes(lower_group, [["forward"], ["draft", "verify"]], finish=lambda programs: None)


@pytest.mark.parametrize("slower", ["child", "parent"])
def test_the_process_that_lowers_first_hands_its_programs_over(slower, monkeypatch):
    """The other process finishes (to_executorch and save) with every group's programs."""
    import os
    import time

    import export.to_pte as to_pte

    monkeypatch.setattr(to_pte, "serialize_edge_program", lambda program: program)
    monkeypatch.setattr(to_pte, "deserialize_edge_program", lambda fields: fields)
    parent = os.getpid()

    def where() -> str:
        return "parent" if os.getpid() == parent else "child"

    def lower_group(names):
        if where() == slower:
            time.sleep(1.0)
        return {n: f"{n} lowered in the {where()}" for n in names}

    finished_in, programs = to_pte.in_processes(lower_group, [["forward"], ["draft", "verify"]],
                                                finish=lambda programs: (where(), programs))
    assert finished_in == slower
    assert programs == {"forward": "forward lowered in the parent", "draft": "draft lowered in the child",
                        "verify": "verify lowered in the child"}


def test_verify_method_holds_no_prefix_weights(tiny_checkpoint):
    from export.to_pte import prepare_for_executorch, trace
    from models.checkpoint import load_model

    model, _ = load_model(tiny_checkpoint)
    prepare_for_executorch(model, 64)
    programs = trace(model, ["draft", "verify"], exit_layer=2, max_tokens=8)
    verify_params, draft_params = used_parameters(programs["verify"]), used_parameters(programs["draft"])
    assert not any(p.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens")) for p in verify_params)
    assert any(p.startswith("model.layers.2.") for p in verify_params)
    assert not any(p.startswith(("model.layers.2.", "model.layers.3.")) for p in draft_params)
    assert {"model.lm_head.weight", "model.norm.weight"} <= verify_params & draft_params


def test_manifest_records_the_runtime_facts(fp32_pte):
    m = read_manifest(fp32_pte.directory)
    assert (m.exit_layer, m.num_speculations, m.max_seq_len, m.bos_token_id, m.eos_token_ids) == (2, 3, 128, 0, [1])
    assert m.methods == ["draft", "verify", "forward", "draft_greedy"] and len(m.source["sha256"]) == 16
    assert {"torch", "executorch", "torchao"} <= set(m.versions)
    assert (m.directory / "tokenizer.json").exists()


# ---------------------------------------------------------------- bad input


def test_cuda_provider_for_a_pte_is_a_clear_error(fp32_pte):
    with pytest.raises(UserError, match="--provider cuda runs .onnx artifacts; .* is a .pte"):
        open_artifact(fp32_pte.directory, provider="cuda")


def test_truncated_pte_is_refused(fp32_pte, tmp_path):
    copy = copy_artifact(fp32_pte.directory, tmp_path)
    data = (copy / "model.pte").read_bytes()
    (copy / "model.pte").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        open_artifact(copy)


def test_corrupt_pte_of_the_right_size_is_refused(fp32_pte, tmp_path):
    copy = copy_artifact(fp32_pte.directory, tmp_path)
    data = bytearray((copy / "model.pte").read_bytes())
    data[:64] = b"\0" * 64
    (copy / "model.pte").write_bytes(bytes(data))
    with pytest.raises(UserError, match="not a loadable ExecuTorch program"):
        open_artifact(copy)


def test_missing_manifest_is_refused(fp32_pte, tmp_path):
    copy = copy_artifact(fp32_pte.directory, tmp_path)
    (copy / "manifest.json").unlink()
    with pytest.raises(UserError, match="has no manifest.json"):
        open_artifact(copy)


def test_manifest_that_does_not_match_the_pte_is_refused(fp32_pte, tmp_path):
    copy = copy_artifact(fp32_pte.directory, tmp_path, exit_layer=1)
    with pytest.raises(UserError, match="does not match its manifest: exit_layer is 2"):
        open_artifact(copy)


@pytest.mark.parametrize("flags,message", [
    (["--exit-layer", "4"], "exit layer 4 is out of range"),
    (["--quant", "int3"], "unknown quantization scheme 'int3'"),
    (["--model", "/nonexistent"], "Checkpoint directory '/nonexistent' does not exist"),
    (["--jobs", "0"], "--jobs 0 must be >= 1"),
])
def test_export_cli_rejects_bad_input_in_one_line(tiny_checkpoint, tmp_path, flags, message):
    args = ["--model", str(tiny_checkpoint), "--out", str(tmp_path)] + flags
    proc = subprocess.run([sys.executable, "export.py", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_an_unknown_pte_attention_is_a_clear_error(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="--pte-attention 'fast' is unknown; use one of row_invariant, row_invariant_drafts, row_sdpa, custom_sdpa"):
        ExportConfig(model=tiny_checkpoint, out=tmp_path, pte_attention="fast")


def test_failed_export_leaves_the_existing_artifact_untouched(tiny_checkpoint, fp32_pte, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(fp32_pte.directory, out / "pte")
    before = (out / "pte" / "model.pte").read_bytes()
    import export.to_pte as to_pte

    def broken_to_executorch(*args, **kwargs):
        raise RuntimeError("simulated failure while lowering")

    monkeypatch.setattr(to_pte, "to_executorch", broken_to_executorch)
    with pytest.raises(RuntimeError, match="simulated"):
        export(tiny_checkpoint, out)
    assert (out / "pte" / "model.pte").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["pte"]  # no temporary directory left behind


def test_sweep_pairs_each_point_with_its_own_baseline_and_writes_the_best(tiny_checkpoint, fp32_pte, tmp_path):
    from runtime.bench import BenchConfig, run_sweep
    from runtime.measure import layer_bound_speedup

    model = Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))  # --write-recommended writes here
    e = fp32_pte.exit_layer
    reused = Path(shutil.copytree(fp32_pte.directory, tmp_path / "out" / "sweep" / f"e{e}" / "pte"))
    before = (reused / "manifest.json").stat().st_mtime_ns
    cfg = BenchConfig(model=model, sweep=True, exit_layers=(e,), draft_lengths=(1, 3), draft_thresholds=(0.0, 0.6),
                      sweep_quant="none", repeats=2, max_new_tokens=24, write_recommended=True, out=tmp_path / "out")
    sweep = run_sweep(cfg, ["def add(a, b):\n", "class Point:\n", "for i in range(10):\n"])

    assert (reused / "manifest.json").stat().st_mtime_ns == before  # the matching artifact is not re-exported
    assert [(p["exit_layer"], p["num_speculations"], p["draft_threshold"]) for p in sweep["surface"]] == [
        (e, 1, 0.0), (e, 1, 0.6), (e, 3, 0.0), (e, 3, 0.6)]
    for p in sweep["surface"]:
        assert p["greedy_identical_fraction"] == 1.0
        assert p["speedup"] == pytest.approx(p["spec_tokens_per_s"] / p["ar_tokens_per_s"])
        assert p["layer_bound_speedup"] == pytest.approx(
            layer_bound_speedup(4, e, p["mean_drafts_per_step"], p["mean_tokens_per_step"]))
        assert (p["mean_drafts_per_step"] == p["num_speculations"]) == (p["draft_threshold"] == 0.0)
    # each point carries its own baseline, measured beside it
    assert len({p["ar_tokens_per_s"] for p in sweep["surface"]}) == 4
    best = max(sweep["surface"], key=lambda p: p["speedup"])
    assert sweep["best"] == best
    written = json.loads((model / "layerskip.json").read_text())
    assert (written["exit_layer"], written["num_speculations"], written["draft_threshold"]) == (
        e, best["num_speculations"], best["draft_threshold"])
    assert written["measured"]["speedup"] == round(best["speedup"], 3)
