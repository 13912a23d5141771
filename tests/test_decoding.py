"""The decoding loops on the eager backend: exactness of greedy, rollback, and sampling's distribution."""

import copy
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import tiny_model
from runtime.errors import UserError
from runtime import decoding
from runtime.decoding import GenerationConfig, generate
from runtime.eager import EagerBackend

PROMPT = [0, 5, 9, 33, 70]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def autoregressive_tokens(model):
    return generate(EagerBackend(model, 2, 256), PROMPT, GenerationConfig(max_new_tokens=150, self_speculative=False)).tokens


@pytest.mark.parametrize("exit_layer,d", [(1, 1), (1, 4), (2, 3), (3, 2), (3, 6)])
def test_greedy_self_speculation_equals_autoregressive(model, autoregressive_tokens, exit_layer, d):
    result = generate(EagerBackend(model, exit_layer, 256), PROMPT, GenerationConfig(max_new_tokens=150, num_speculations=d))
    assert result.tokens == autoregressive_tokens
    hist = result.stats.tokens_per_step
    assert hist.get(1, 0) > 0, "expected some steps with every draft rejected"
    if exit_layer >= 2:
        assert hist.get(d + 1, 0) > 0, "expected some steps with every draft accepted"
    assert result.stats.draft_calls == (d + 1) * result.stats.steps + 1  # + 1: the prompt


@pytest.mark.parametrize("tau", [0.05, 0.1])  # the tiny model's exit is rarely sure: top-1 p ~ 0.02-0.2
def test_adaptive_drafting_keeps_greedy_output_and_drafts_less(model, autoregressive_tokens, tau):
    d = 4
    result = generate(EagerBackend(model, 2, 256), PROMPT,
                      GenerationConfig(max_new_tokens=150, num_speculations=d, draft_threshold=tau))
    assert result.tokens == autoregressive_tokens
    s = result.stats
    assert 0 < s.early_stops < s.steps and s.drafted < d * s.steps
    # a step of k drafts makes k + 1 prefix passes: no separate fill call after an early stop
    assert s.draft_calls == s.drafted + s.steps + 1  # + 1: the prompt


def test_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    context = [1, 2, 3, 9, 1, 2, 4, 5, 6, 1, 2]
    assert decoding.lookup_drafts(context, 3, 2) == [4, 5, 6]  # the latest [1, 2] before the tail, not the first
    assert decoding.lookup_drafts(context, 2, 2) == [4, 5]  # at most k
    # past the end of the context the copy goes on over what it copied: [4, 5, 6, 1, 2] repeats
    assert decoding.lookup_drafts(context, 8, 2) == [4, 5, 6, 1, 2, 4, 5, 6]
    assert decoding.lookup_drafts(context, 3, 3) == []  # [6, 1, 2] never occurred before
    assert decoding.lookup_drafts([7, 8, 7], 3, 1) == [8, 7, 8]
    assert decoding.lookup_drafts([5, 5], 4, 1) == [5, 5, 5, 5]  # a run of one token
    assert decoding.lookup_drafts([3, 1, 2, 1, 2], 5, 2) == [1, 2, 1, 2, 1]  # the tail's own period, 2
    assert decoding.lookup_drafts([7], 3, 2) == []


@pytest.mark.parametrize("d,k,one_call", [(3, 4, True), (2, 8, True), (3, 4, False)])
def test_greedy_with_looked_up_drafts_equals_autoregressive(model, autoregressive_tokens, d, k, one_call):
    backend = EagerBackend(model, 2, 256)
    backend.has_draft_verify = one_call  # False: draft and verify calls, as artifacts without draft_verify
    result = generate(backend, PROMPT, GenerationConfig(max_new_tokens=150, num_speculations=d, lookup=k))
    assert result.tokens == autoregressive_tokens
    s = result.stats
    assert 0 < s.lookup_steps < s.steps, "expected steps drafted by lookup and steps drafted by the exit"
    # a looked-up step puts its drafts through layers < E in one call (with the verify, one_call); an exit
    # step drafts in d + 1 calls
    exit_steps = s.steps - s.lookup_steps
    assert s.draft_calls == (0 if one_call else s.lookup_steps) + (d + 1) * exit_steps + 1  # + 1: the prompt
    assert s.verify_calls == s.steps + 1
    # every token a step emitted (the last step's may pass max_new_tokens) is counted under its kind of step
    assert set(s.step_tokens) == set(s.step_time_s) == {"lookup", "exit"}
    assert sum(s.step_tokens.values()) == sum(k * v for k, v in s.tokens_per_step.items()) >= len(result.tokens) - 1
    assert s.step_tokens["lookup"] >= s.lookup_steps
    assert 0 < sum(s.step_time_s.values()) <= s.decode_time_s


def record_lookups(monkeypatch) -> list:
    """The arguments after the context of every decoding.lookup_drafts call from now on (K, n, K of a run, its match)."""
    asked = []
    real = decoding.lookup_drafts

    def recorded(context, *args):
        asked.append(args)
        return real(context, *args)

    monkeypatch.setattr(decoding, "lookup_drafts", recorded)
    return asked


def test_a_lookup_whose_match_reaches_back_further_drafts_up_to_lookup_run(model, autoregressive_tokens,
                                                                          monkeypatch):
    """Where the latest earlier occurrence of the last 2 tokens also matches the lookup_run_match tokens before
    them (a longer stretch repeating), a lookup step drafts up to lookup_run; elsewhere up to K. The backend's
    default: K itself on eager."""
    context = [9, 1, 2, 3, 4, 5, 6, 7, 8, 2, 3, 4, 5, 6]
    # [5, 6] occurred at index 5, after [2, 3, 4] as at the tail: a match of 5 tokens
    assert decoding.lookup_drafts(context, 2, 2, 4, 5) == [7, 8, 2, 3]
    assert decoding.lookup_drafts(context, 2, 2, 4, 6) == [7, 8]  # not 6: [1] before it, [8] at the tail
    assert decoding.lookup_drafts(context, 2, 2, 4, 2) == [7, 8, 2, 3]  # a 2-token match is run enough at 2
    assert decoding.lookup_drafts(context, 2, 2) == [7, 8]
    asked = record_lookups(monkeypatch)
    backend = EagerBackend(model, 2, 256)
    cfg = GenerationConfig(max_new_tokens=150, num_speculations=3, lookup=3, lookup_run=7, lookup_run_match=3)
    result = generate(backend, PROMPT, cfg)
    assert result.tokens == autoregressive_tokens
    assert {a for a in asked} == {(3, 2, 7, 3)}  # K, n, K of a run, its match, every step (room permitting)
    asked.clear()
    generate(backend, PROMPT, GenerationConfig(max_new_tokens=30, lookup=3))
    assert {a[2:] for a in asked} == {(3, decoding.RUN_MATCH)}  # eager: K itself
    assert "eager" not in decoding.LOOKUP_RUN
    with pytest.raises(UserError, match="use --lookup-run 255 or fewer"):
        generate(backend, PROMPT, GenerationConfig(max_new_tokens=4, lookup=3, lookup_run=256))


def test_the_lookup_k_a_checkpoint_records_is_the_artifacts_default(model, autoregressive_tokens, monkeypatch):
    """layerskip.json may record --lookup's K and its runs' K for a target ("with_lookup": both shipped models' .pte
    and .onnx, measured best there): the export writes them into the manifest (export/pipeline.py: lookup_defaults), and the
    runtime takes them where no K is given, before its own defaults; a K given stands."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from export.pipeline import lookup_defaults
    from runtime.generate import lookup_drafts_per_step

    shipped = json.loads((Path(__file__).parents[1] / "models" / "default" / "layerskip.json").read_text())
    assert lookup_defaults(shipped, "pte") == {"lookup": 2, "lookup_run": 6}
    assert lookup_defaults(shipped, "onnx") == {"lookup": 2, "lookup_run": 6} and lookup_defaults({}, "pte") == {}
    backend = EagerBackend(model, 2, 256)
    backend.default_lookup, backend.lookup_run = 2, 6  # as ExecuTorchBackend reads them from the manifest
    exact = SimpleNamespace(backend=backend, facts={"exact_lookup": True})
    assert lookup_drafts_per_step(None, exact) == 2 and lookup_drafts_per_step(7, exact) == 7
    assert lookup_drafts_per_step(None, SimpleNamespace(backend=backend, facts={})) == 0
    backend.default_lookup = None
    assert lookup_drafts_per_step(None, exact) == decoding.DEFAULT_LOOKUP
    asked = record_lookups(monkeypatch)
    result = generate(backend, PROMPT, GenerationConfig(max_new_tokens=40, lookup=2))
    assert result.tokens == autoregressive_tokens[:len(result.tokens)]
    assert {a[2] for a in asked} == {6}  # the recorded K of a run
    asked.clear()
    generate(backend, PROMPT, GenerationConfig(max_new_tokens=20, lookup=2, lookup_run=4))
    assert {a[2] for a in asked} == {4}


def test_a_step_without_a_2_token_match_drafts_after_a_1_token_match(model, autoregressive_tokens, monkeypatch):
    """lookup_fallback K: where the last 2 tokens never occurred before but the last one did, the step drafts
    up to K tokens that followed it (kind "lookup_1", one call); steps with neither draft from the exit. Greedy
    output stays plain decoding's. The backend's default: 0 on eager."""
    asked = []
    real = decoding.lookup_drafts

    def recorded(context, k, n, *run):
        drafts = real(context, k, n, *run)
        asked.append((n, k, bool(drafts)))
        return drafts

    monkeypatch.setattr(decoding, "lookup_drafts", recorded)
    backend = EagerBackend(model, 2, 256)
    backend.has_draft_verify = True
    result = generate(backend, PROMPT, GenerationConfig(max_new_tokens=150, num_speculations=3, lookup=4,
                                                        lookup_fallback=2))
    assert result.tokens == autoregressive_tokens
    s = result.stats
    assert set(s.step_tokens) == {"lookup", "lookup_1", "exit"}
    # a 1-token lookup (of K = 2) follows exactly the 2-token lookups that found nothing
    misses = [i for i, (n, _, found) in enumerate(asked) if n == 2 and not found]
    assert misses and all(asked[i + 1][:2] == (1, 2) for i in misses)
    fallback_found = sum(found for n, _, found in asked if n == 1)
    assert s.lookup_steps == sum(found for _, _, found in asked)  # both kinds are lookup steps, one call each
    exit_steps = s.steps - s.lookup_steps
    assert 0 < fallback_found and exit_steps == len(misses) - fallback_found
    assert s.draft_calls == 4 * exit_steps + 1 and s.verify_calls == s.steps + 1  # + 1: the prompt
    asked.clear()
    off = generate(backend, PROMPT, GenerationConfig(max_new_tokens=150, num_speculations=3, lookup=4))
    assert off.tokens == autoregressive_tokens and "lookup_1" not in off.stats.step_tokens
    assert all(n == 2 for n, _, _ in asked) and decoding.default_lookup_fallback(backend) == 0
    with pytest.raises(UserError, match="use --lookup-fallback 255 or fewer"):
        generate(backend, PROMPT, GenerationConfig(max_new_tokens=4, lookup=3, lookup_fallback=256))


def test_the_fallback_default_follows_the_backend_and_one_call_lookup_steps():
    class Named:
        def __init__(self, name, one_call):
            self.name, self.has_draft_verify = name, one_call

    defaults = {(name, one_call): decoding.default_lookup_fallback(Named(name, one_call))
                for name in ("onnxruntime-cpu", "onnxruntime-cuda", "executorch", "eager") for one_call in (True, False)}
    assert defaults == {("onnxruntime-cpu", True): 1, ("onnxruntime-cpu", False): 1, ("onnxruntime-cuda", True): 1,
                        ("onnxruntime-cuda", False): 1, ("executorch", True): 5, ("executorch", False): 0,
                        ("eager", True): 0, ("eager", False): 0}
    # where ONNX Runtime's exit steps guess by a cheap call, the exit's first draft replaces the 1-token match
    assert decoding.default_lookup_fallback(Named("onnxruntime-cpu", True), exit_guesses=1) == 0
    assert decoding.default_lookup_fallback(Named("executorch", True), exit_guesses=1) == 5


class GuessingBackend(EagerBackend):
    """An eager backend with a cheap draft call whose rows have other bits: draft_guess drafts, then spoils the
    KV and exit-cache rows it wrote, so that output stays plain decoding's only if the verifying call computes
    them again."""

    has_draft_guess = True

    def draft_guess(self, tokens, pos):
        logits = self.draft(tokens, pos)
        rows = slice(pos, pos + len(tokens))
        for cache in self.model.caches[:self.exit_layer]:
            cache.k[:, :, rows] += 1.0
            cache.v[:, :, rows] -= 1.0
        self.exit_cache[rows] *= 2.0
        return logits


@pytest.mark.parametrize("guesses", [1, 3])
def test_exit_guesses_are_computed_again_by_the_verifying_call(model, autoregressive_tokens, guesses, monkeypatch):
    """exit_guesses N: a step drafting from the exit drafts N tokens by the backend's cheap draft calls, then one
    draft_verify call computes their rows again and verifies them: plain decoding's tokens, whatever the cheap
    calls left in the caches; N calls and one verifying call per exit step."""
    backend = GuessingBackend(model, 2, 256)
    result = generate(backend, PROMPT, GenerationConfig(max_new_tokens=150, num_speculations=3, exit_guesses=guesses))
    assert result.tokens == autoregressive_tokens
    s = result.stats
    assert set(s.step_tokens) == {"exit"} and s.drafted == guesses * s.steps
    assert s.draft_calls == guesses * s.steps + 1 and s.verify_calls == s.steps + 1  # + 1: the prompt
    assert s.tokens_per_step.get(guesses + 1, 0) > 0 and s.tokens_per_step.get(1, 0) > 0
    # the spoiled rows do change the output where nothing computes them again
    monkeypatch.setattr(backend, "draft_verify", lambda tokens, pos: backend.verify(pos, len(tokens)))
    assert generate(backend, PROMPT, GenerationConfig(max_new_tokens=150, exit_guesses=guesses)).tokens != \
        autoregressive_tokens
    monkeypatch.undo()
    # at most d; after the first, the draft threshold stops them; 0: the exit step of exact draft calls
    capped = generate(backend, PROMPT, GenerationConfig(max_new_tokens=40, num_speculations=1, exit_guesses=guesses))
    assert capped.stats.drafted == capped.stats.steps
    sure = generate(backend, PROMPT, GenerationConfig(max_new_tokens=40, exit_guesses=3, draft_threshold=0.99)).stats
    assert sure.drafted == sure.steps == sure.early_stops  # the first draft goes in the verifying call's other row
    off = generate(backend, PROMPT, GenerationConfig(max_new_tokens=150, num_speculations=3, exit_guesses=0))
    assert off.tokens == autoregressive_tokens and off.stats.draft_calls == 4 * off.stats.steps + 1


def test_exit_guesses_default_to_one_where_a_cheap_draft_call_and_draft_verify_exist(model):
    backend = GuessingBackend(model, 2, 256)
    assert decoding.default_exit_guesses(backend) == 1
    backend.has_draft_verify = False
    assert decoding.default_exit_guesses(backend) == 0
    assert decoding.default_exit_guesses(EagerBackend(model, 2, 256)) == 0
    with pytest.raises(UserError, match="use --exit-guesses 255 or fewer"):
        generate(backend, PROMPT, GenerationConfig(max_new_tokens=4, exit_guesses=256))


def test_plain_decoding_counts_its_steps_as_plain(model):
    s = generate(EagerBackend(model, 2, 256), PROMPT, GenerationConfig(max_new_tokens=20, self_speculative=False)).stats
    assert s.step_tokens == {"plain": 19} and set(s.step_time_s) == {"plain"}


def test_a_higher_threshold_drafts_fewer_tokens(model):
    drafted = [generate(EagerBackend(model, 2, 256), PROMPT, GenerationConfig(
        max_new_tokens=100, num_speculations=4, draft_threshold=tau)).stats.drafted / 100 for tau in (0.0, 0.08, 0.2)]
    assert drafted[0] > drafted[1] > drafted[2]


def test_full_model_baseline_equals_split_autoregressive(model, autoregressive_tokens):
    result = generate(EagerBackend(model, 2, 256), PROMPT,
                      GenerationConfig(max_new_tokens=150, self_speculative=False, full_model_baseline=True))
    assert result.tokens == autoregressive_tokens
    assert result.stats.full_calls == 150 and result.stats.draft_calls == 0


def test_rollback_leaves_the_cache_of_a_fresh_autoregressive_run(model):
    d = 4
    spec = EagerBackend(copy.deepcopy(model), 2, 256)

    def stop_after_partial_rejection(new):
        return 1 < len(new) < d + 1

    result = generate(spec, PROMPT, GenerationConfig(max_new_tokens=200, num_speculations=d),
                      on_tokens=stop_after_partial_rejection)
    assert result.stats.stop_reason == "stop_string"
    ar = EagerBackend(copy.deepcopy(model), 2, 256)
    assert generate(ar, PROMPT, GenerationConfig(max_new_tokens=len(result.tokens), self_speculative=False)).tokens \
        == result.tokens
    valid = len(PROMPT) + len(result.tokens) - 1  # the last emitted token is not in the cache yet
    for spec_cache, ar_cache in zip(spec.model.caches, ar.model.caches):
        assert torch.allclose(spec_cache.k[:, :, :valid], ar_cache.k[:, :, :valid], atol=1e-5)
        assert torch.allclose(spec_cache.v[:, :, :valid], ar_cache.v[:, :, :valid], atol=1e-5)
    # the rejected drafts' rows are still there, stale: rollback moved the position, nothing else
    assert spec.model.caches[0].k[:, :, valid + 1].abs().sum() > 0
    assert ar.model.caches[0].k[:, :, valid + 1].abs().sum() == 0


def test_generation_stops_cleanly_at_the_cache_end(model):
    result = generate(EagerBackend(model, 2, 24), PROMPT, GenerationConfig(max_new_tokens=100, num_speculations=4))
    assert result.stats.stop_reason == "max_seq_len"
    assert len(PROMPT) + len(result.tokens) == 24 + 1  # the token after position 23 is still emitted


def test_eos_stops_and_is_kept(model, autoregressive_tokens):
    eos = autoregressive_tokens[10]
    result = generate(EagerBackend(model, 2, 256), PROMPT,
                      GenerationConfig(max_new_tokens=150, num_speculations=3, eos_token_ids=(eos,)))
    assert result.tokens == autoregressive_tokens[:autoregressive_tokens.index(eos) + 1]
    assert result.stats.stop_reason == "eos"


# ---------------------------------------------------------------- sampling


def exact_second_token_distribution(model, prompt, cfg):
    """p(x2) = sum over x1 of p(x1 | prompt) p(x2 | prompt, x1), with the same temperature/top-k/top-p."""
    with torch.no_grad():
        first = decoding.filtered_probs(model(torch.tensor([prompt]), torch.tensor([0]))[0, -1].numpy(), cfg)
        total = np.zeros_like(first)
        for x1 in range(len(first)):
            logits = model(torch.tensor([prompt + [x1]]), torch.tensor([0]))[0, -1].numpy()
            total += first[x1] * decoding.filtered_probs(logits, cfg)
    return total


def second_tokens(backend, vocab_size, cfg, n, prompt):
    """Counts of the second generated token over n seeds."""
    counts = np.zeros(vocab_size)
    for seed in range(n):
        tokens = generate(backend, prompt, GenerationConfig(**{**cfg.__dict__, "seed": seed})).tokens
        counts[tokens[1]] += 1
    return counts


def goodness_of_fit(observed, exact) -> float:
    """Chi-square p-value of observed counts against an exact distribution (0 if off its support)."""
    support = exact > 1e-9
    if observed[~support].sum() > 0:
        return 0.0
    expected = exact[support].astype(np.float64)
    return chisquare(observed[support], expected / expected.sum() * observed.sum()).pvalue


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.8, top_k=6, top_p=0.9),
                                      dict(temperature=1.0, draft_threshold=0.3),
                                      dict(temperature=1.0, lookup=3, lookup_ngram=1),
                                      dict(temperature=1.0, exit_guesses=2, draft_threshold=0.3)])
def test_self_speculative_sampling_keeps_the_distribution(small_vocab_model, settings):
    prompt = [3, 7, 1, 5, 2, 3]  # with lookup: the first token is often one of these, whose followers are drafted
    cfg = GenerationConfig(max_new_tokens=2, num_speculations=2, **settings)
    exact = exact_second_token_distribution(small_vocab_model, prompt, cfg)
    backend, vocab = EagerBackend(small_vocab_model, 1, 64), small_vocab_model.config.vocab_size
    observed = second_tokens(backend, vocab, cfg, 2000, prompt)
    assert goodness_of_fit(observed, exact) > 1e-3
    ar = second_tokens(backend, vocab, GenerationConfig(**{**cfg.__dict__, "self_speculative": False}), 2000, prompt)
    assert goodness_of_fit(ar, exact) > 1e-3
    if cfg.draft_threshold:  # the threshold must have cut some steps short and left others whole
        stats = [generate(backend, prompt, GenerationConfig(**{**cfg.__dict__, "seed": s})).stats for s in range(200)]
        assert 0 < sum(s.early_stops for s in stats) < sum(s.steps for s in stats)
    if cfg.lookup:  # some second tokens came from looked-up drafts, others from the exit's
        stats = [generate(backend, prompt, GenerationConfig(**{**cfg.__dict__, "seed": s})).stats for s in range(200)]
        assert 0 < sum(s.lookup_steps for s in stats) < sum(s.steps for s in stats)


def test_a_wrong_acceptance_rule_is_detected(small_vocab_model, monkeypatch):
    """The test above can fail: accepting every draft samples the exit layer's distribution instead."""
    prompt = [3, 7]
    cfg = GenerationConfig(max_new_tokens=2, num_speculations=2, temperature=1.0)
    exact = exact_second_token_distribution(small_vocab_model, prompt, cfg)
    original = decoding.TokenChooser.accept

    def accept_everything(self, drafts, draft_probs, verify_logits):
        n, new = original(self, drafts, draft_probs, verify_logits)
        return len(drafts), drafts + [new[-1]]

    monkeypatch.setattr(decoding.TokenChooser, "accept", accept_everything)
    observed = second_tokens(EagerBackend(small_vocab_model, 1, 64), small_vocab_model.config.vocab_size, cfg, 2000,
                             prompt)
    assert goodness_of_fit(observed, exact) < 1e-6


# ---------------------------------------------------------------- bad input


def test_bad_generation_settings_are_user_errors():
    for bad in (dict(num_speculations=0), dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0.0),
                dict(top_k=-2), dict(draft_threshold=1.0), dict(draft_threshold=-0.1), dict(lookup=-1),
                dict(lookup_run=-1), dict(lookup_run_match=0), dict(lookup_fallback=-1), dict(exit_guesses=-1),
                dict(lookup_ngram=0)):
        with pytest.raises(UserError):
            GenerationConfig(**bad)


@pytest.mark.parametrize("exit_layer", [0, 4, -1])
def test_exit_layer_out_of_range(model, exit_layer):
    with pytest.raises(UserError, match="between 1 and 3"):
        EagerBackend(model, exit_layer, 64)


def test_prompt_longer_than_the_cache(model):
    with pytest.raises(UserError, match="prompt has 40 tokens but the cache holds 32"):
        generate(EagerBackend(model, 2, 32), list(range(40)), GenerationConfig())


def test_more_looked_up_drafts_than_one_call_takes_is_a_user_error(model):
    backend = EagerBackend(model, 2, 64)
    backend.max_tokens_per_call = 8
    with pytest.raises(UserError, match="--lookup 7 or fewer"):
        generate(backend, PROMPT, GenerationConfig(max_new_tokens=4, lookup=8))
