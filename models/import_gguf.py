"""Import a llama-architecture GGUF file (llama.cpp's format) as a Hugging Face checkpoint directory.

    python -m models.import_gguf FILE.gguf --out DIR

DIR gets config.json, model.safetensors (fp32), tokenizer.json (+ tokenizer_config.json, the chat
template when the file has one) and generation_config.json: a plain checkpoint every tool takes
(`--model DIR`; self-speculation then needs `--exit-layer E`, `python -m models.evaluate` helps
choose it). Every tool also takes `--model FILE.gguf` directly: the file is imported once into a
cache folder keyed by its content (models/import_gguf.py: cached_import).

The work is Hugging Face transformers' GGUF loader, `load_gguf_checkpoint` (the `gguf` package's
reader and dequantization, llama.cpp's Q/K row permutation undone, the config and the tokenizer
rebuilt from the file's metadata): this module checks the file first, so that a wrong architecture,
an unsupported tensor type or a truncated file is one clear line, and writes the directory
atomically. Dequantized weights are fp32, so a 4-bit file grows ~7x on disk.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import UserError, run_command

# Tensor types the gguf package dequantizes (gguf.quants); llama.cpp's others (IQ*, TQ*) are refused.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")
INSTALL = "pip install -e '.[gguf]'"


def check_gguf(path: Path) -> None:
    """The file exists, parses as GGUF, is a llama model, and holds only tensor types we can read."""
    from gguf import GGUFReader

    if not path.is_file():
        raise UserError(f"GGUF file '{path}' does not exist; pass a llama.cpp .gguf model file.")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / struct and numpy errors on bad bytes
        raise UserError(f"'{path}' is not a readable GGUF file ({type(e).__name__}: {str(e)[:80]}); it may be "
                        f"truncated or not GGUF at all: download it again.") from None
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field else "unknown"
    if architecture != "llama":
        raise UserError(f"'{path}' holds a '{architecture}' model; only the llama architecture (Llama, SmolLM, "
                        f"Mistral-style) is supported.")
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if unsupported:
        raise UserError(f"'{path}' has tensors of type {', '.join(unsupported)}, which cannot be dequantized here; "
                        f"use a file quantized as one of {', '.join(SUPPORTED_TYPES)}.")


@contextmanager
def read_once():
    """The gguf package parses all of a file's metadata in each GGUFReader (5 s for SmolLM2's 49k-token
    vocabulary and merges), and transformers opens one per call (three per import) and builds gguf's
    tensor-name map once per tensor (6 s for SmolLM2's 272): here each file is parsed once and each map
    built once. SmolLM2's import: 32 -> 12-17 s."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"reading GGUF files needs the gguf and transformers packages: {INSTALL}") from None

    default_reader, default_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = default_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(default_name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = default_reader, default_name_map


def import_gguf(path: Path | str, out: Path | str) -> Path:
    """Write the checkpoint directory `out` (replaced atomically; a failure leaves it untouched)."""
    with read_once():
        return read_and_write(Path(path), Path(out))


def read_and_write(path: Path, out: Path) -> Path:
    check_gguf(path)
    try:
        import torch
        from safetensors.torch import save_file
        from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:
        raise UserError(f"importing GGUF files needs transformers: {INSTALL}") from None
    print(f"[gguf] reading {path.name} ...", file=sys.stderr, flush=True)
    config = LlamaConfig(**load_gguf_checkpoint(str(path))["config"])
    config.architectures = ["LlamaForCausalLM"]  # what tools that dispatch on it read (ORT GenAI's builder)
    with torch.device("meta"):  # names and shapes only: tells the loader how GGUF tensors map to ours
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    weights = {name: torch.as_tensor(t).float().contiguous() for name, t in tensors.items()}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": path.name})
        tokenizer.save_pretrained(tmp)
        if not (tmp / "tokenizer.json").exists():
            raise UserError(f"'{path}' has a tokenizer transformers cannot save as tokenizer.json; it is not supported.")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parameters = sum(w.numel() for w in weights.values())
    print(f"[gguf] wrote {out}: {config.num_hidden_layers} layers, {parameters / 1e6:.1f}M parameters, "
          f"vocabulary {config.vocab_size}", file=sys.stderr, flush=True)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("LAYERSKIP_EDGE_CACHE", Path.home() / ".cache" / "layerskip-edge")) / "gguf"


def cached_import(path: Path) -> Path:
    """`--model FILE.gguf`: the imported checkpoint directory, imported on first use."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    except OSError as e:
        raise UserError(f"GGUF file '{path}' cannot be read ({e.strerror}); pass a llama.cpp .gguf model file.") from None
    out = cache_root() / f"{path.stem}-{digest.hexdigest()[:16]}"
    return out if (out / "config.json").exists() else import_gguf(path, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", type=Path, help="a llama-architecture .gguf file")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    a = p.parse_args(argv)
    return run_command(lambda: import_gguf(a.gguf, a.out))


if __name__ == "__main__":
    sys.exit(main())
