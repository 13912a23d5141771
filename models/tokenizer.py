"""Text <-> token ids through a checkpoint's tokenizer.json (Hugging Face `tokenizers`, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.errors import UserError

BOS, EOS = "<|bos|>", "<|eos|>"


class TextTokenizer:
    """Encodes without the tokenizer's own special-token template; BOS is prepended explicitly so
    that checkpoints whose tokenizer.json adds BOS itself (Llama 3) do not get it twice."""

    def __init__(self, path: Path | str, bos_token_id: Optional[int]):
        path = Path(path)
        if not path.exists():
            raise UserError(f"Tokenizer '{path}' does not exist; copy the checkpoint's tokenizer.json there.")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise UserError(f"Tokenizer '{path}' could not be read ({e}); restore the file.") from None
        self.bos_token_id = bos_token_id

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) with BOS and EOS as ids 0 and 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
