"""Small llama.cpp GGUF files for the import tests, written with the gguf package's writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "default" / "tokenizer.json"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf Q/K row order (interleaved rotary pairs), which an importer undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# K-quant blocks (256 weights each) as ggml lays them out: bytes per block and where its float16 scales
# sit, with a scale that keeps the dequantized weights near the tiny models' magnitude (|w| <~ 0.3).
# The gguf package dequantizes these types but cannot quantize to them, so the tests write random
# blocks: any bytes are a valid block once its float16 scales are finite.
K_QUANT_BLOCKS = {"Q2_K": (84, (80, 82), 5e-3), "Q3_K": (110, (108,), 2e-3), "Q4_K": (144, (0, 2), 2e-4),
                  "Q5_K": (176, (0, 2), 1e-4), "Q6_K": (210, (208,), 5e-5)}


def random_k_quant(rows: int, cols: int, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """A [rows, cols] weight as random `qtype` blocks: uint8 [rows, cols / 256 * block bytes]."""
    size, scale_offsets, scale = K_QUANT_BLOCKS[qtype]
    blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for offset in scale_offsets:
        d = (scale * rng.uniform(0.5, 1.0, blocks.shape[:2])).astype(np.float16)  # [rows, blocks]
        blocks[:, :, offset:offset + 2] = d[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def tiny_hf_llama(tied: bool = True, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, ffn: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = json.loads(TOKENIZER.read_text())["model"]["vocab"]
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         tie_word_embeddings=tied, bos_token_id=0,
                         eos_token_id=1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() == 1 else 0.2)
    return model


def write_gguf(path: Path, model, qtype: str = "F32", architecture: str = "llama") -> Path:
    """`model` (a transformers LlamaForCausalLM) as a GGUF file with its 2-D weights stored as `qtype`
    (a K-quant: random blocks of that type instead of the model's weights, see random_k_quant)."""
    import gguf
    from gguf.quants import quantize

    c = model.config
    tok = json.loads(TOKENIZER.read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {t["id"] for t in tok.get("added_tokens", [])}
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-test-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, ours in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{ours}.weight"
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, c.num_key_value_heads)
        if data.ndim == 2 and qtype in K_QUANT_BLOCKS:
            w.add_tensor(names[name], random_k_quant(*data.shape, qtype, rng), raw_dtype=qt)
        elif data.ndim == 2 and qtype != "F32":
            w.add_tensor(names[name], quantize(data, qt), raw_dtype=qt)
        else:
            w.add_tensor(names[name], data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
