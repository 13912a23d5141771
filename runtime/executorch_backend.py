"""The ExecuTorch backend: runs the draft / verify / forward (and draft_verify) methods of a .pte through
executorch.runtime.

Logits leave it as numpy views of the method outputs (no copy), valid until the next call.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from runtime.artifact import Manifest, check_fact
from runtime.errors import UserError


def load_program(path, own_kernels: bool = False, share_weights: bool = True):
    """The program, with the kernels our graphs use registered (custom cache/SDPA ops, quantized ops; with
    own_kernels, our row_sdpa and linear_q4: runtime/kernels). Where our kernel library is loaded, XNNPACK packs a
    weight once for all methods (share_weights; runtime.kernels.share_xnnpack_weights)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.runtime import Runtime

    executorch_runtime = Runtime.get()  # the XNNPACK backend registered, to take the option below
    if own_kernels:
        from runtime.kernels import share_xnnpack_weights

        share_xnnpack_weights(share_weights)

    try:
        return executorch_runtime.load_program(path)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"'{path}' is not a loadable ExecuTorch program ({str(e).splitlines()[0]}); "
                        f"it is corrupt or from another version: re-export it.") from None


class ExecuTorchBackend:
    name = "executorch"

    def __init__(self, manifest: Manifest, threads: int = 0, preload: Optional[tuple[str, ...]] = None):
        if threads:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(threads)
        self.attention = manifest.extra.get("attention", "")  # export/to_pte.py: row_sdpa, row_invariant, ...
        self.program = load_program(manifest.path("program"), own_kernels=self.attention == "row_sdpa"
                                    or manifest.extra.get("linear") == "linear_q4")
        for fact, expected in (("exit_layer", manifest.exit_layer), ("max_seq_len", manifest.max_seq_len),
                               ("max_tokens_per_call", manifest.max_tokens_per_call)):
            check_fact(manifest, fact, self._constant(fact), expected)
        self.exit_layer = manifest.exit_layer
        self.num_layers = manifest.shape.num_layers
        self.max_seq_len = manifest.max_seq_len
        self.max_tokens_per_call = manifest.max_tokens_per_call
        fused = "draft_greedy" in manifest.methods
        self.has_draft_verify = "draft_verify" in manifest.methods
        self.has_forward = "forward" in manifest.methods
        self.fused_draft_length = manifest.num_speculations if fused else None
        # --lookup's K and its runs' K measured best for this model (export/pipeline.py: lookup_defaults), or None
        self.default_lookup, self.lookup_run = manifest.extra.get("lookup"), manifest.extra.get("lookup_run")
        # Methods are loaded when first called; `preload` (default: the self-speculative ones, with forward where
        # steps of --lookup that match nothing call it: decoding.default_unmatched_step) up front, so that loading is
        # not timed as decoding. With XNNPACK's weight cache (load_program) a method packs only weights no method
        # loaded before packed.
        self._loaded = {}
        default = ("draft", "verify") + (("draft_greedy",) if fused else ())
        default += ("draft_verify",) if self.has_draft_verify else ()
        default += ("forward",) if self.has_forward and self.attention == "row_sdpa" else ()
        for name in preload if preload is not None else default:
            self._get(name)
        self.exit_cache = np.zeros((self.max_seq_len, manifest.shape.hidden_size), np.float32)  # layer-E hidden states
        # Token ids and the position live in tensors made once, written in place through numpy views
        # (two torch.tensor() calls were half of the Python time per decoded token).
        token_ids = torch.zeros(1, self.max_tokens_per_call, dtype=torch.long)
        self._token_ids = token_ids.numpy()
        self._token_views = [token_ids[:, :t] for t in range(self.max_tokens_per_call + 1)]  # [1, t] each
        self._position = torch.zeros(1, dtype=torch.long)
        self._position_np = self._position.numpy()
        # --pte-attention row_invariant: verify also takes the key mask [T, L], L = pos + T (and forward, in
        # artifacts of its first version, whose full-model method attended the same way: no key_mask_methods).
        # Its row t is 0 up to the row's position pos + t, then -inf: columns max_seq_len - 1 - pos onwards
        # of row t of `_key_masks` [max_tokens_per_call, 2 * max_seq_len], made once (a slice per call,
        # not a new array: 1-4 us less of Python per call).
        s = self.max_seq_len
        self._key_masks = None
        if manifest.extra.get("attention", "").startswith("row_invariant"):
            columns = np.arange(2 * s)
            rows = np.arange(self.max_tokens_per_call)[:, None]
            self._key_masks = np.where(columns < s + rows, 0.0, -np.inf).astype(np.float32)
        masked = manifest.extra.get("key_mask_methods", ["forward", "verify"])
        self._forward_mask = self._key_masks is not None and "forward" in masked
        self._draft_mask = self._key_masks is not None and "draft" in masked  # --pte-attention row_invariant_drafts

    def _key_mask(self, pos: int, count: int) -> tuple:
        """() for custom_sdpa artifacts, else (the key mask [count, L],)."""
        if self._key_masks is None:
            return ()
        keys = max(pos + count, 2)  # the programs take at least 2 keys; a masked one adds exactly 0
        first = self.max_seq_len - 1 - pos
        mask = self._key_masks[:count, first:first + keys]  # [count, keys], rows 2 * max_seq_len apart
        return (torch.from_numpy(mask if count == 1 else np.ascontiguousarray(mask)),)

    def _constant(self, name: str):
        if name not in self.program.method_names:
            return None
        return self._method(name).execute([])[0]

    def _get(self, name: str):
        if name not in self._loaded:
            self._loaded[name] = self._method(name)
        return self._loaded[name]

    def _method(self, name: str):
        try:
            return self.program.load_method(name)
        except (RuntimeError, KeyError) as e:
            raise UserError(f"the .pte has no loadable method '{name}' ({e}); re-export the artifact.") from None

    def _inputs(self, tokens, pos):
        t = len(tokens)
        self._token_ids[0, :t] = tokens
        self._position_np[0] = pos
        return self._token_views[t], self._position

    # Rows and outputs move through numpy views: torch's slicing and item assignment cost a few
    # microseconds more per call, which adds up over the 4-5 calls of a self-speculative step.

    def draft(self, tokens, pos):
        mask = self._key_mask(pos, len(tokens)) if self._draft_mask else ()
        hidden, logits = self._get("draft").execute(self._inputs(tokens, pos) + mask)
        self.exit_cache[pos:pos + len(tokens)] = hidden.numpy()[0]
        return logits.numpy()[0]

    def draft_greedy(self, token, pos):
        """All d greedy drafts in one call; fills exit-cache rows pos .. pos+d."""
        drafts, hidden = self._get("draft_greedy").execute(self._inputs([token], pos))
        self.exit_cache[pos:pos + hidden.shape[1]] = hidden.numpy()[0]
        return drafts.tolist()

    def verify(self, pos, count):
        hidden = torch.from_numpy(self.exit_cache[pos:pos + count][None])  # [1, count, dim], contiguous
        self._position_np[0] = pos
        return self._get("verify").execute((hidden, self._position) + self._key_mask(pos, count))[0].numpy()[0]

    def draft_verify(self, tokens, pos):
        """draft and verify in one call (artifacts with that method): logits [count, V]; fills exit-cache rows."""
        hidden, logits = self._get("draft_verify").execute(self._inputs(tokens, pos) + self._key_mask(pos, len(tokens)))
        self.exit_cache[pos:pos + len(tokens)] = hidden.numpy()[0]
        return logits.numpy()[0]

    def forward(self, tokens, pos):
        mask = self._key_mask(pos, len(tokens)) if self._forward_mask else ()
        return self._get("forward").execute(self._inputs(tokens, pos) + mask)[0].numpy()[0]

    def reset(self):
        # The custom SDPA attends only to positions < start + T, so stale cache rows need no clearing.
        self.exit_cache.fill(0.0)
