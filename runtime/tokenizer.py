"""Text <-> token ids through a checkpoint's or artifact's tokenizer.json (Hugging Face `tokenizers`, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer

from runtime.errors import UserError


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
