"""The decoding loops: autoregressive and self-speculative (greedy and sampling), for any backend.

Self-speculative step (t = last emitted token at position p, d = draft length, tau = draft threshold):
    draft   : up to d calls of layers [0, E) + exit head, one token each, at p, p+1, .. -> drafts x1..xk;
              drafting stops early (k < d) at the first exit whose top-1 probability is below tau
    prefix  : if k = d, one more call for xd at p+d, so the exit cache holds t, x1..xk (an early stop
              already made that call: it is the one whose confidence was too low)
    verify  : one call of layers [E, L) on the k+1 cached hidden states -> logits for p+1 .. p+k+1
    accept  : greedy: longest prefix of drafts equal to the verifier's argmax, then its next token;
              sampling: accept x_i with prob min(1, p_i/q_i), else resample from norm(max(p - q, 0))
    rollback: the next step starts at p + accepted + 1; stale cache rows beyond it are overwritten.

With --lookup K a step first looks in the context (prompt and output) for the latest earlier occurrence
of its last n tokens (lookup_ngram, 2); the K tokens that followed it (a run that reaches the tail
repeated) are the drafts, put through layers [0, E) in one call of k+1 rows (t and the drafts) instead of one
call each, and verified as above, or through all layers in one call where the artifact has draft_verify (with
sampling, as drafts drawn from a one-hot distribution, so the acceptance rule still samples the model's
distribution). Where the match reaches back further (a repeating run), a step may draft more
(lookup_run, LOOKUP_RUN, RUN_MATCH). A step without such an occurrence looks up its last token alone (lookup_fallback,
default_lookup_fallback); steps without either draft from the exit: on a backend with a cheap draft call
(draft_guess: ONNX Runtime's unpadded one) and draft_verify, exit_guesses drafts made by cheap calls and verified
with their prefix in one draft_verify call (exit_guess_step), elsewhere as above; or, where the full-model call has
plain decoding's bits (unmatched_step "plain", default_unmatched_step), they are plain steps: one full-model call.
The multi-row prefix call computes rows that plain decoding computes one at a time, so greedy output equals plain
decoding as far as the backend's kernels give a row the same bits at any row count: by construction on .onnx
artifacts exported with --pad-drafts (runtime/onnx_backend.py) and .pte artifacts exported with --pte-attention row_sdpa
or row_invariant_drafts (export/to_pte.py), as measured elsewhere (README).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from runtime.errors import UserError
from runtime.backend import Backend, has_full_model


# K of --lookup where it is on by default (artifacts exact for it): K = 5 decoded at least as fast as
# K = 8 in every run measured, by 0-6% (shipped model and SmolLM2; README, "Thirteen sessions ago").
DEFAULT_LOOKUP = 5
# A lookup whose match reaches back RUN_MATCH tokens or more (the context repeats a longer stretch, a run)
# drafts up to LOOKUP_RUN's K, by backend; elsewhere K itself. XNNPACK's multi-row calls grow slowly with rows:
# on the exact .pte, +1-4% over the previous rule (12 after a lookup step whose drafts were all accepted) in three
# paired probes of the shipped model, +2-3% deep16, +-0 SmolLM2-135M. ONNX Runtime's int4 calls grow by ~90 us a
# row: K 13 at a match of 8 cost 2-3% there (README, "Nine sessions ago"; results/probe_lookup_runs.txt).
LOOKUP_RUN = {"executorch": 12}
RUN_MATCH = 8


def default_lookup_fallback(backend, exit_guesses: int = 0) -> int:
    """K of a step whose last 2 tokens have no earlier occurrence but its last token has (drafts after a 1-token match,
    right about half the time), where --lookup-fallback is not given. Measured against exit drafts there (README,
    "Nine sessions ago"): ONNX Runtime 1, the padding row of an exact one-row call (+2.5-4% on the shipped model,
    deep16 and SmolLM2-135M; and beside plain unmatched steps on artifacts whose rows need no padding, 1.321x vs
    1.265x and 1.670x vs 1.621x in 5 paired rounds, README "Three sessions ago"), but 0 where its exit steps guess (exit_guesses
    > 0: the exit's first draft is right more often than the 1-token match, at one unpadded draft call more; deep16
    +2.7%, the shipped model even; README, "Eight sessions ago"); XNNPACK with the row_invariant_drafts attention 5
    where a lookup step is one call (draft_verify: +5% shipped, +-0 deep16; as two calls, SmolLM2, -4%), but 0 with
    row_sdpa, whose exact draft calls cost half as much (deep16 higher in 4 of 4 paired rounds at tau 0.3, 3 of 4 at
    0.1; the shipped model even, 2 and 3 of 4; README, "Seven sessions ago"); elsewhere 0."""
    if backend.name.startswith("onnxruntime"):
        return 0 if exit_guesses else 1
    if backend.name == "executorch" and getattr(backend, "attention", "") != "row_sdpa":
        return 5 if getattr(backend, "has_draft_verify", False) else 0
    return 0


def default_exit_guesses(backend) -> int:
    """Exit drafts of a step drafted by cheap calls (exit_guess_step) where --exit-guesses is not given: 1 where the
    backend has draft_guess and draft_verify (ONNX Runtime, exported for exact lookup), else 0 (the exit step of the
    module docstring). At one draft, draft_verify's 2 rows cost what its 1 padded row does (README, "Previous
    session")."""
    return 1 if getattr(backend, "has_draft_guess", False) and getattr(backend, "has_draft_verify", False) else 0


UNMATCHED_STEPS = ("exit", "plain")


def default_unmatched_step(backend) -> str:
    """What a step of --lookup does where neither lookup matched, when --unmatched-step is not given: "plain" (one
    call through every layer, plain_call's) on a .pte whose every method attends through row_sdpa, where the
    full-model call has plain decoding's bits and, with XNNPACK's weight cache, reads the packed weights the other
    methods read: above exit steps in 11 of 12 paired rounds, 1.323x vs 1.262x plain decoding (the shipped model) and
    1.630x vs 1.536x (deep16) in the medians (README, "Four sessions ago"); and on an .onnx artifact whose calls give
    every row its bits unpadded (our attention and linear ops) and that has draft_verify: 1.336x vs 1.325x (shipped),
    1.423x vs 1.372x (deep16) in the medians of 5 paired rounds, where exit steps cost 335 / 530 us a token against
    plain decoding's 254 / 417 (README, "Three sessions ago"); elsewhere "exit"."""
    if backend.name == "executorch" and getattr(backend, "attention", "") == "row_sdpa" \
            and getattr(backend, "has_forward", False):
        return "plain"
    if getattr(backend, "rows_alike", False) and getattr(backend, "has_draft_verify", False):
        return "plain"
    return "exit"


def check_draft_threshold(tau: float) -> float:
    if not 0.0 <= tau < 1.0:
        raise UserError(f"--draft-threshold {tau} must be in [0, 1) (0: always draft d tokens).")
    return tau


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    self_speculative: bool = True  # False: plain autoregressive decoding (the baseline)
    num_speculations: int = 4  # d, draft tokens per step
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    eos_token_ids: tuple[int, ...] = ()
    full_model_baseline: bool = False  # autoregressive through the backend's single full-model call
    fused_draft: bool = True  # greedy: draft all d tokens in one call when the backend has that method
    draft_threshold: float = 0.0  # tau: stop drafting when the exit's top-1 probability falls below it (0: off)
    lookup: int = 0  # K: drafts looked up in the context, at most K per step (0: off; module docstring)
    lookup_ngram: int = 2  # tokens matched by the lookup (1 proposes too often; 2 and 3 measured alike, README)
    lookup_run: Optional[int] = None  # K where the match reaches back lookup_run_match tokens; None: LOOKUP_RUN
    lookup_run_match: int = RUN_MATCH  # matched tokens that make a run
    lookup_fallback: Optional[int] = None  # K after a 1-token match where 2 have none; None: default_lookup_fallback
    # exit drafts by cheap calls and one verifying call, at most d (0: off; None: default_exit_guesses)
    exit_guesses: Optional[int] = None
    # with lookup, a step that matched nothing: "exit" drafts, "plain" one full-model call
    # (None: default_unmatched_step)
    unmatched_step: Optional[str] = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens {self.max_new_tokens} must be >= 1.")
        if self.num_speculations < 1:
            raise UserError(f"--num-speculations {self.num_speculations} must be >= 1 (draft tokens per step).")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature} must be >= 0 (0 is greedy).")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k} must be >= 0 (0 is off).")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p {self.top_p} must be in (0, 1].")
        check_draft_threshold(self.draft_threshold)
        if self.lookup < 0:
            raise UserError(f"--lookup {self.lookup} must be >= 0 (0 is off; K: the most drafts looked up per step).")
        if self.lookup_run is not None and self.lookup_run < 0:
            raise UserError(f"--lookup-run {self.lookup_run} must be >= 0 (0: K throughout).")
        if self.lookup_run_match < 1:
            raise UserError(f"lookup_run_match {self.lookup_run_match} must be >= 1 (matched tokens).")
        if self.lookup_fallback is not None and self.lookup_fallback < 0:
            raise UserError(f"--lookup-fallback {self.lookup_fallback} must be >= 0 (0: exit drafts where 2 tokens "
                            f"have no earlier occurrence).")
        if self.exit_guesses is not None and self.exit_guesses < 0:
            raise UserError(f"--exit-guesses {self.exit_guesses} must be >= 0 (0: exit steps draft through the "
                            f"exact draft calls).")
        if self.lookup_ngram < 1:
            raise UserError(f"lookup_ngram {self.lookup_ngram} must be >= 1 (tokens matched).")
        if self.unmatched_step is not None and self.unmatched_step not in UNMATCHED_STEPS:
            raise UserError(f"--unmatched-step {self.unmatched_step!r} is unknown; use exit (drafts from the early "
                            f"exit) or plain (one full-model call).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_time_s: float = 0.0  # from the first generated token to the last
    decode_tokens_per_s: float = 0.0  # tokens after the first / decode_time_s (prompt excluded)
    drafted: int = 0
    accepted: int = 0
    early_stops: int = 0  # steps that drafted fewer than d tokens (the draft threshold)
    lookup_steps: int = 0  # steps whose drafts were looked up in the context (--lookup)
    steps: int = 0
    tokens_per_step: dict = field(default_factory=dict)  # histogram {tokens emitted in a step: steps}
    # by step kind ("lookup": drafts from the context, "lookup_1": after a 1-token match (lookup_fallback),
    # "exit": drafts from the early exit, "plain": one token, in plain decoding or where lookup matched nothing):
    # tokens emitted and seconds spent, calls and the Python between them included
    step_tokens: dict = field(default_factory=dict)
    step_time_s: dict = field(default_factory=dict)
    draft_calls: int = 0
    verify_calls: int = 0
    full_calls: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    full_time_s: float = 0.0
    stop_reason: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return sum(k * v for k, v in self.tokens_per_step.items()) / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "mean_tokens_per_step": self.mean_tokens_per_step,
                "tokens_per_step": {str(k): v for k, v in sorted(self.tokens_per_step.items())}}

    def summary(self) -> str:
        s = (f"{self.generated_tokens} tokens, {self.decode_tokens_per_s:.1f} tok/s decode, "
             f"TTFT {self.time_to_first_token_s * 1000:.0f} ms")
        if self.drafted:
            s += (f", acceptance {self.acceptance_rate:.2f}, {self.mean_tokens_per_step:.2f} tokens/step, "
                  f"{self.draft_calls} draft + {self.verify_calls} verify"
                  f"{f' + {self.full_calls} full-model' if self.full_calls else ''} calls")
        if self.lookup_steps:
            s += f", {self.lookup_steps} of {self.steps} steps drafted by lookup"
        return s + f" (stop: {self.stop_reason})"


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids (prompt excluded)
    stats: GenerationStats


class TimedBackend:
    """Counts and times every backend call into the stats."""

    def __init__(self, backend: Backend, stats: GenerationStats):
        self.backend, self.stats = backend, stats

    def _timed(self, kind: str, call, *args):
        """kind: 'draft', 'verify' or 'full' -- the stats fields {kind}_time_s and {kind}_calls."""
        t = time.perf_counter()
        out = call(*args)
        setattr(self.stats, f"{kind}_time_s", getattr(self.stats, f"{kind}_time_s") + time.perf_counter() - t)
        setattr(self.stats, f"{kind}_calls", getattr(self.stats, f"{kind}_calls") + 1)
        return out

    def draft(self, tokens, pos):
        return self._timed("draft", self.backend.draft, tokens, pos)

    def verify(self, pos, count):
        return self._timed("verify", self.backend.verify, pos, count)

    @property
    def fused_draft_length(self) -> Optional[int]:
        return getattr(self.backend, "fused_draft_length", None)

    @property
    def has_draft_verify(self) -> bool:
        return bool(getattr(self.backend, "has_draft_verify", False))

    def draft_verify(self, tokens, pos):
        """Timed as the step's verify call, which it is (with the drafts' prefix pass in it)."""
        return self._timed("verify", self.backend.draft_verify, tokens, pos)

    def draft_guess(self, tokens, pos):
        """The backend's cheap draft call; its draft call where it has none."""
        return self._timed("draft", getattr(self.backend, "draft_guess", self.backend.draft), tokens, pos)

    def draft_greedy(self, token, pos):
        return self._timed("draft", self.backend.draft_greedy, token, pos)

    def forward(self, tokens, pos):
        return self._timed("full", self.backend.forward, tokens, pos)


# ---------------------------------------------------------------- token choice


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def filtered_probs(logits: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """Temperature, top-k and top-p applied to logits [..., V] -> probabilities [..., V] (float64)."""
    logits = np.asarray(logits, np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = np.partition(logits, -cfg.top_k, axis=-1)[..., -cfg.top_k, None]  # [..., 1]
        logits = np.where(logits < kth, -np.inf, logits)
    if cfg.top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        sorted_probs = softmax(np.take_along_axis(logits, order, -1))
        # Drop a token when the tokens ranked above it already hold top_p (the first one always stays).
        drop_sorted = np.cumsum(sorted_probs, -1) - sorted_probs >= cfg.top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits = np.where(drop, -np.inf, logits)
    return softmax(logits)


class TokenChooser:
    """Greedy argmax or seeded sampling, and the speculative acceptance rule.

    Uniform draws come from the standard library's seeded Mersenne Twister: numpy.random would pull
    OpenSSL into the process (3-4 MB of resident memory in an app that only decodes)."""

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)

    def sample(self, probs: np.ndarray) -> int:
        """An index drawn from probs [V] (need not be normalized) by inverting its CDF."""
        cdf = np.cumsum(probs)
        return min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), len(cdf) - 1)

    def choose(self, logits: np.ndarray, tau: float = 0.0) -> Optional[tuple[int, Optional[np.ndarray]]]:
        """A token from logits [V], and the distribution it was drawn from (None when greedy); or None
        when the top-1 probability of that distribution (the plain softmax when greedy) is below tau.

        Drafts pass the draft threshold as tau. The confidence depends on the draft side alone, so
        stopping on it leaves the acceptance rule exact: every emitted token is still drawn from the
        verifier's distribution."""
        if self.cfg.greedy:
            token = int(logits.argmax())
            if tau and 1.0 / float(np.exp(logits - logits[token]).sum()) < tau:
                return None
            return token, None
        probs = filtered_probs(logits, self.cfg)
        if tau and probs.max() < tau:
            return None
        return self.sample(probs), probs

    def accept(self, drafts: list[int], draft_probs: list, verify_logits: np.ndarray) -> tuple[int, list[int]]:
        """(accepted draft count, tokens to emit) from the verifier's logits [d+1, V] of one step."""
        if self.cfg.greedy:
            targets = verify_logits.argmax(-1).tolist()
            n = 0
            while n < len(drafts) and drafts[n] == targets[n]:
                n += 1
            return n, drafts[:n] + [targets[n]]
        p = filtered_probs(verify_logits, self.cfg)  # [d+1, V]
        for i, (x, q) in enumerate(zip(drafts, draft_probs)):
            if self.rng.random() < min(1.0, p[i, x] / q[x]):
                continue
            residual = np.maximum(p[i] - q, 0.0)
            return i, drafts[:i] + [self.sample(residual if residual.sum() > 0 else p[i])]
        return len(drafts), drafts + [self.sample(p[len(drafts)])]


# ---------------------------------------------------------------- the loops


class Emitter:
    """Collects emitted tokens, streams them, and decides when to stop."""

    def __init__(self, cfg: GenerationConfig, stats: GenerationStats, on_tokens: Optional[Callable]):
        self.cfg, self.stats, self.on_tokens = cfg, stats, on_tokens
        self.tokens: list[int] = []
        self.t_start = time.perf_counter()
        self.t_first: Optional[float] = None

    def emit(self, new: list[int]) -> bool:
        """Append tokens (cut at EOS or the token limit); True when generation must stop."""
        stop = ""
        for i, tok in enumerate(new):
            if tok in self.cfg.eos_token_ids:
                new, stop = new[:i + 1], "eos"
                break
        room = self.cfg.max_new_tokens - len(self.tokens)
        if len(new) >= room:
            new, stop = new[:room], stop or "max_new_tokens"
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.tokens += new
        if self.on_tokens is not None and new and self.on_tokens(new):
            stop = stop or "stop_string"
        self.stats.stop_reason = stop
        return bool(stop)

    def finish(self) -> GenerationResult:
        now = time.perf_counter()
        s = self.stats
        s.generated_tokens = len(self.tokens)
        s.time_to_first_token_s = (self.t_first or now) - self.t_start
        s.decode_time_s = now - (self.t_first or now)
        s.decode_tokens_per_s = (len(self.tokens) - 1) / s.decode_time_s if s.decode_time_s > 0 else 0.0
        return GenerationResult(self.tokens, s)


def check_prompt(prompt: Sequence[int], max_seq_len: int) -> None:
    if not prompt:
        raise UserError("the prompt is empty and the tokenizer has no BOS token; pass a non-empty --prompt.")
    if len(prompt) >= max_seq_len:
        raise UserError(f"the prompt has {len(prompt)} tokens but the cache holds {max_seq_len} positions; "
                        f"shorten the prompt or export with a larger --max-seq-len.")


def prefill(calls: TimedBackend, backend: Backend, prompt: Sequence[int]) -> np.ndarray:
    """The prompt through draft then verify, in chunks the backend accepts: logits of its last token."""
    step = backend.max_tokens_per_call
    for start in range(0, len(prompt), step):
        chunk = prompt[start:start + step]
        calls.draft(chunk, start)
        logits = calls.verify(start, len(chunk))
    return logits[-1]


def prefill_full(calls: TimedBackend, backend: Backend, prompt: Sequence[int]) -> np.ndarray:
    step = backend.max_tokens_per_call
    for start in range(0, len(prompt), step):
        logits = calls.forward(prompt[start:start + step], start)
    return logits


def step_policy(backend, cfg: GenerationConfig) -> dict:
    """How a step drafts on this backend: cfg's settings with the backend's defaults filled in, checked against
    the rows a call takes. {lookup, lookup_run, lookup_run_match, lookup_fallback, exit_guesses, unmatched_step}
    (README commands)."""
    most = backend.max_tokens_per_call - 1
    for flag, k in (("--lookup", cfg.lookup), ("--lookup-run", cfg.lookup_run or 0),
                    ("--lookup-fallback", cfg.lookup_fallback or 0), ("--exit-guesses", cfg.exit_guesses or 0)):
        if k > most:
            raise UserError(f"{flag} {k} drafts need {k + 1} rows in one call, but this artifact takes at most "
                            f"{most + 1}; use {flag} {most} or fewer.")
    # K where the match reaches back lookup_run_match tokens (a backend's default is cut to what fits)
    recorded_run = getattr(backend, "lookup_run", None)  # the artifact's, where its checkpoint records one
    run_k = (min(recorded_run if recorded_run is not None else LOOKUP_RUN.get(backend.name, 0), most)
             if cfg.lookup_run is None else cfg.lookup_run)
    unmatched = cfg.unmatched_step or default_unmatched_step(backend)
    # exit guesses draft the steps that match nothing: none by default where those are plain steps
    guesses = ((default_exit_guesses(backend) if unmatched == "exit" else 0) if cfg.exit_guesses is None
               else cfg.exit_guesses)
    fallback_k = (min(default_lookup_fallback(backend, guesses), most) if cfg.lookup_fallback is None
                  else cfg.lookup_fallback)
    if unmatched == "plain" and cfg.lookup and plain_call(backend) is None:
        raise UserError(f"--unmatched-step plain makes one call through every layer, and the {backend.name} backend "
                        f"has none; use --unmatched-step exit.")
    return {"lookup": cfg.lookup, "lookup_run": max(run_k, cfg.lookup), "lookup_run_match": cfg.lookup_run_match,
            "lookup_fallback": fallback_k, "exit_guesses": guesses, "unmatched_step": unmatched}


def generate(backend: Backend, prompt: Sequence[int], cfg: GenerationConfig,
             on_tokens: Optional[Callable[[list[int]], Optional[bool]]] = None) -> GenerationResult:
    """Decode after `prompt` (token ids). `on_tokens(new_ids)` streams tokens and may return True to stop."""
    check_prompt(prompt, backend.max_seq_len)
    if cfg.full_model_baseline and not has_full_model(backend):
        raise UserError(f"the {backend.name} backend has no full-model method; drop --full-model.")
    policy = step_policy(backend, cfg)
    run_k, fallback_k, guesses = policy["lookup_run"], policy["lookup_fallback"], policy["exit_guesses"]
    plain_unmatched = bool(cfg.lookup) and policy["unmatched_step"] == "plain"
    plain_via = plain_call(backend) if plain_unmatched else None  # the one call those steps make
    backend.reset()
    stats = GenerationStats(prompt_tokens=len(prompt))
    calls = TimedBackend(backend, stats)
    chooser = TokenChooser(cfg)
    out = Emitter(cfg, stats, on_tokens)
    logits = prefill_full(calls, backend, prompt) if cfg.full_model_baseline else prefill(calls, backend, prompt)
    token, _ = chooser.choose(logits)
    pos = len(prompt)  # position of `token`, the last emitted one, not yet in the caches
    context = list(prompt) + [token] if cfg.lookup else None  # what --lookup searches
    done = out.emit([token])
    while not done:
        if pos >= backend.max_seq_len:
            stats.stop_reason = "max_seq_len"
            break
        started = time.perf_counter()
        room = backend.max_seq_len - 1 - pos  # drafts must fit at positions pos+1 .. pos+d
        if cfg.self_speculative and room > 0:
            looked_up = lookup_drafts(context, min(cfg.lookup, room), cfg.lookup_ngram, min(run_k, room),
                                      cfg.lookup_run_match) if cfg.lookup else []
            kind = "lookup"
            if not looked_up and cfg.lookup and fallback_k and cfg.lookup_ngram > 1:
                looked_up, kind = lookup_drafts(context, min(fallback_k, room), 1), "lookup_1"
            if looked_up:
                accepted, new = lookup_step(calls, chooser, token, pos, looked_up)
            elif plain_unmatched:
                kind, (accepted, new) = "plain", one_call_step(calls, chooser, token, pos, plain_via)
            elif guesses:
                kind, (accepted, new) = "exit", exit_guess_step(calls, chooser, token, pos,
                                                                   min(guesses, cfg.num_speculations, room))
            else:
                kind, (accepted, new) = "exit", speculative_step(calls, chooser, token, pos,
                                                                  min(cfg.num_speculations, room))
            if context is not None:
                context += new
        else:
            kind, (accepted, new) = "plain", autoregressive_step(calls, chooser, token, pos, cfg.full_model_baseline)
        stats.step_time_s[kind] = stats.step_time_s.get(kind, 0.0) + time.perf_counter() - started
        stats.step_tokens[kind] = stats.step_tokens.get(kind, 0) + len(new)
        stats.steps += 1
        stats.tokens_per_step[len(new)] = stats.tokens_per_step.get(len(new), 0) + 1
        pos += accepted + 1
        token = new[-1]
        done = out.emit(new)
    return out.finish()


def autoregressive_step(calls: TimedBackend, chooser: TokenChooser, token: int, pos: int,
                        full_model: bool) -> tuple[int, list[int]]:
    if full_model:
        logits = calls.forward([token], pos)
    else:
        calls.draft([token], pos)
        logits = calls.verify(pos, 1)[0]
    return 0, [chooser.choose(logits)[0]]


def plain_call(backend) -> Optional[str]:
    """The call a plain step of --lookup makes (unmatched_step "plain"): "draft_verify" on ONNX Runtime where the
    artifact has it (its rows have the bits of plain decoding's draft + verify calls; the full-model call parts from
    them on some prompts); else "forward", the full-model call (on a .pte attending through row_sdpa with plain
    decoding's bits), where there is one; None without either."""
    if backend.name.startswith("onnxruntime") and getattr(backend, "has_draft_verify", False):
        return "draft_verify"
    return "forward" if has_full_model(backend) else None


def one_call_step(calls: TimedBackend, chooser: TokenChooser, token: int, pos: int, via: str) -> tuple[int, list[int]]:
    """One token through every layer in one call (plain_call's)."""
    logits = calls.draft_verify([token], pos)[0] if via == "draft_verify" else calls.forward([token], pos)
    return 0, [chooser.choose(logits)[0]]


def speculative_step(calls: TimedBackend, chooser: TokenChooser, token: int, pos: int,
                     d: int) -> tuple[int, list[int]]:
    cfg = chooser.cfg
    if cfg.greedy and cfg.fused_draft and not cfg.draft_threshold and calls.fused_draft_length == d:
        drafts, draft_probs = calls.draft_greedy(token, pos), [None] * d
    else:
        drafts, draft_probs = draft_one_by_one(calls, chooser, token, pos, d)
    accepted, new = chooser.accept(drafts, draft_probs, calls.verify(pos, len(drafts) + 1))
    calls.stats.drafted += len(drafts)
    calls.stats.accepted += accepted
    calls.stats.early_stops += len(drafts) < d
    return accepted, new


def lookup_drafts(context: list[int], k: int, n: int, run_k: int = 0, run_match: int = 0) -> list[int]:
    """k tokens that followed the latest earlier occurrence of the context's last n tokens ([] if none); run_k
    where that occurrence matches the last run_match tokens or more (a longer stretch repeating).

    Where fewer than k follow it (the occurrence overlaps the tail: a repeating run), the copy goes on
    over what it copied, as in LZ77, so a run of period p continues with period p: shipped model, 30
    prompts, 3.58 -> 4.59 tokens per lookup step (README)."""
    tail = context[-n:]
    for j in range(len(context) - n - 1, -1, -1):
        if context[j] == tail[0] and context[j:j + n] == tail:
            start = j + n  # the first token after the occurrence
            before = run_match - n  # matched tokens needed before the n
            if run_k > k and (before <= 0 or (j >= before and context[j - before:j] == context[-run_match:-n])):
                k = run_k
            drafts = context[start:start + k]
            period = len(context) - start
            while len(drafts) < k:
                drafts.append(drafts[-period])
            return drafts
    return []


def verify_drafts(calls: TimedBackend, chooser: TokenChooser, token: int, pos: int, drafts: list[int],
                  draft_probs: Optional[list] = None) -> tuple[int, list[int]]:
    """Drafts known before the step's first call: layers < E for t and the drafts in one call (exit-cache rows
    pos .. pos+k), one verify; or both in one call, where the backend has it (draft_verify). draft_probs: the
    distributions the drafts were drawn from (sampling); None: drafts from the context, one-hot."""
    if calls.has_draft_verify:
        verify_logits = calls.draft_verify([token] + drafts, pos)
    else:
        calls.draft([token] + drafts, pos)
        verify_logits = calls.verify(pos, len(drafts) + 1)
    if draft_probs is None:
        draft_probs = [None if chooser.cfg.greedy else np.zeros(verify_logits.shape[-1]) for _ in drafts]
        for q, x in zip(draft_probs, drafts):
            if q is not None:
                q[x] = 1.0
    accepted, new = chooser.accept(drafts, draft_probs, verify_logits)
    calls.stats.drafted += len(drafts)
    calls.stats.accepted += accepted
    return accepted, new


def lookup_step(calls: TimedBackend, chooser: TokenChooser, token: int, pos: int,
                drafts: list[int]) -> tuple[int, list[int]]:
    """A step whose drafts came from the context (verify_drafts)."""
    calls.stats.lookup_steps += 1
    return verify_drafts(calls, chooser, token, pos, drafts)


def exit_guess_step(calls: TimedBackend, chooser: TokenChooser, token: int, pos: int,
                    d: int) -> tuple[int, list[int]]:
    """Up to d exit drafts from the backend's cheap draft calls (draft_guess; the draft threshold stops them
    after the first), then verify_drafts computes their rows again, with the bits of plain decoding, and
    verifies them. The cheap calls' rows are overwritten before anything reads them, so output stays plain
    decoding's; with sampling each draft's distribution is the one it was drawn from."""
    drafts, draft_probs = [], []
    x = token
    for k in range(d):
        drafted = chooser.choose(calls.draft_guess([x], pos + k), chooser.cfg.draft_threshold if k else 0.0)
        if drafted is None:
            break
        x, q = drafted
        drafts.append(x)
        draft_probs.append(q)
    accepted, new = verify_drafts(calls, chooser, token, pos, drafts, draft_probs)
    calls.stats.early_stops += len(drafts) < d
    return accepted, new


def draft_one_by_one(calls: TimedBackend, chooser: TokenChooser, token: int, pos: int, d: int):
    """Up to d drafts; on return the exit cache holds rows pos .. pos+len(drafts) (t and the drafts)."""
    drafts, draft_probs = [], []
    x = token
    for k in range(d):
        drafted = chooser.choose(calls.draft([x], pos + k), chooser.cfg.draft_threshold)
        if drafted is None:  # x's prefix pass is done; the low-confidence token is not proposed
            return drafts, draft_probs
        x, q = drafted
        drafts.append(x)
        draft_probs.append(q)
    calls.draft([x], pos + d)  # the last draft through layers < E, so verify reads only cached activations
    return drafts, draft_probs
