"""Measurements the benchmark is made of: decoding passes, per-call latency, peak RSS, peers."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from runtime.decoding import GenerationConfig, generate, prefill, step_policy

MODES = ("ar", "ar_full", "spec")  # autoregressive via draft+verify, via the full-model call, self-speculative
LOOKUP_MODE = "spec_lookup"  # self-speculative with drafts looked up in the context too (--lookup K)


def mode_config(mode: str, d: int, max_new_tokens: int, eos: tuple[int, ...], tau: float = 0.0,
                lookup: int = 0) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, self_speculative=mode in ("spec", LOOKUP_MODE),
                            num_speculations=d, full_model_baseline=mode == "ar_full", eos_token_ids=eos,
                            draft_threshold=tau, lookup=lookup if mode == LOOKUP_MODE else 0)


@dataclass
class Pass:
    """One pass of a prompt set in one mode."""

    decode_tokens_per_s: float
    ttft_ms_median: float
    generated: int
    acceptance_rate: float
    mean_tokens_per_step: float
    mean_drafts_per_step: float  # d without a draft threshold, fewer with one
    histogram: dict
    draft_ms_per_call: float
    verify_ms_per_call: float
    tokens: list  # per prompt, for the exactness check
    lookup_step_fraction: float = 0.0  # steps drafted by lookup in the context (--lookup)
    steps_by_kind: dict = field(default_factory=dict)  # {lookup|lookup_1|exit|plain: {token_share, us_per_token}}


def run_pass(backend, prompts: list[list[int]], cfg: GenerationConfig) -> Pass:
    decode_tokens = decode_s = drafted = accepted = steps = emitted = lookup_steps = 0.0
    draft_calls = verify_calls = draft_s = verify_s = 0.0
    ttfts, tokens, hist, kind_tokens, kind_s = [], [], {}, {}, {}
    for ids in prompts:
        result = generate(backend, ids, cfg)
        s = result.stats
        for kind, n in s.step_tokens.items():
            kind_tokens[kind] = kind_tokens.get(kind, 0) + n
            kind_s[kind] = kind_s.get(kind, 0.0) + s.step_time_s[kind]
        decode_tokens += s.generated_tokens - 1
        decode_s += s.decode_time_s
        ttfts.append(s.time_to_first_token_s * 1000)
        drafted, accepted, steps = drafted + s.drafted, accepted + s.accepted, steps + s.steps
        lookup_steps += s.lookup_steps
        emitted += sum(k * v for k, v in s.tokens_per_step.items())
        for k, v in s.tokens_per_step.items():
            hist[k] = hist.get(k, 0) + v
        draft_calls, verify_calls = draft_calls + s.draft_calls, verify_calls + s.verify_calls + s.full_calls
        draft_s, verify_s = draft_s + s.draft_time_s, verify_s + s.verify_time_s + s.full_time_s
        tokens.append(result.tokens)
    return Pass(decode_tokens / decode_s if decode_s else 0.0, statistics.median(ttfts), int(decode_tokens),
                accepted / drafted if drafted else 0.0, emitted / steps if steps else 0.0,
                drafted / steps if steps else 0.0, {str(k): v for k, v in sorted(hist.items())},
                1000 * draft_s / draft_calls if draft_calls else 0.0,
                1000 * verify_s / verify_calls if verify_calls else 0.0, tokens,
                lookup_steps / steps if steps else 0.0, steps_by_kind(kind_tokens, kind_s))


def steps_by_kind(kind_tokens: dict, kind_s: dict) -> dict:
    """Each step kind's share of the emitted tokens and its cost per token (us), Python included."""
    total = sum(kind_tokens.values())
    return {kind: {"token_share": n / total, "us_per_token": 1e6 * kind_s[kind] / n}
            for kind, n in sorted(kind_tokens.items()) if n}


def peer_pass(decoder, prompts: list[list[int]], max_new_tokens: int) -> Pass:
    """One pass of a peer's plain decoding (runtime/peers.py), timed as run_pass times ours."""
    decode_tokens = decode_s = 0.0
    ttfts, tokens = [], []
    for ids in prompts:
        new, ttft, decode = decoder.generate(ids, max_new_tokens)
        decode_tokens += len(new) - 1
        decode_s += decode
        ttfts.append(ttft * 1000)
        tokens.append(new)
    return Pass(decode_tokens / decode_s if decode_s else 0.0, statistics.median(ttfts), int(decode_tokens),
                0.0, 1.0, 0.0, {}, 0.0, 0.0, tokens)


def run_modes(backend, prompts: list[list[int]], d: int, max_new_tokens: int, eos: tuple[int, ...],
              repeats: int, modes=MODES, tau: float = 0.0, peers: Optional[dict] = None, lookup: int = 0) -> dict:
    """Each mode `repeats` times, interleaved, after one warm-up prompt each; medians and every repeat.
    `tau`: the draft threshold of self-speculation. `peers`: {name: decoder} whose plain decoding runs
    interleaved with ours (runtime/peers.py); their greedy output is compared with our AR's. `lookup`: K > 0
    adds the mode spec_lookup (self-speculation with drafts looked up in the context, at most K)."""
    peers = peers or {}
    modes = [m for m in modes if m != "ar_full" or callable(getattr(backend, "forward", None))]
    modes += [LOOKUP_MODE] if lookup else []
    cfgs = {m: mode_config(m, d, max_new_tokens, eos, tau, lookup) for m in modes}
    for m in modes:
        generate(backend, prompts[0], cfgs[m])  # warm-up: first-call allocation, weight packing
    for decoder in peers.values():
        decoder.generate(prompts[0], max_new_tokens)
    runs = {m: [] for m in [*modes, *peers]}
    for _ in range(repeats):
        for m in modes:
            runs[m].append(run_pass(backend, prompts, cfgs[m]))
        for name, decoder in peers.items():
            runs[name].append(peer_pass(decoder, prompts, max_new_tokens))
    out = {}
    for m, passes in runs.items():
        best = sorted(passes, key=lambda p: p.decode_tokens_per_s)[len(passes) // 2]  # the median pass
        out[m] = {"decode_tokens_per_s": best.decode_tokens_per_s,
                  "decode_tokens_per_s_repeats": [p.decode_tokens_per_s for p in passes],
                  "ttft_ms_median": best.ttft_ms_median, "generated_tokens": best.generated,
                  "acceptance_rate": best.acceptance_rate, "mean_tokens_per_step": best.mean_tokens_per_step,
                  "mean_drafts_per_step": best.mean_drafts_per_step,
                  "tokens_per_step_histogram": best.histogram, "draft_ms_per_call": best.draft_ms_per_call,
                  "verify_ms_per_call": best.verify_ms_per_call,
                  **({"lookup_step_fraction": best.lookup_step_fraction} if m == LOOKUP_MODE else {}),
                  **({"steps_by_kind": best.steps_by_kind, "step_policy": step_policy(backend, cfgs[m])}
                     if m in ("spec", LOOKUP_MODE) else {})}
    if "ar" in runs:  # greedy self-speculation must reproduce autoregressive output
        if "spec" in runs:
            out.update(greedy_identity(backend, prompts, runs["spec"][-1].tokens, runs))
        if LOOKUP_MODE in runs:  # by construction only with --pad-drafts / row_invariant_drafts: measured
            out[LOOKUP_MODE].update(greedy_identity(backend, prompts, runs[LOOKUP_MODE][-1].tokens, runs))
    baselines = [out[m]["decode_tokens_per_s"] for m in ("ar", "ar_full") if m in out]
    if LOOKUP_MODE in out and baselines:
        out[LOOKUP_MODE]["speedup"] = out[LOOKUP_MODE]["decode_tokens_per_s"] / max(baselines)
    if "spec" in out and baselines:
        out["speedup"] = out["spec"]["decode_tokens_per_s"] / max(baselines)
        out["speedup_vs"] = "ar_full" if out.get("ar_full", {}).get("decode_tokens_per_s", 0) >= out.get(
            "ar", {}).get("decode_tokens_per_s", 0) else "ar"
    if peers:
        out["peers"] = {name: out.pop(name) for name in peers}
        if "ar" in runs:
            ours = runs["ar"][-1].tokens
            for name, decoder in peers.items():
                out["peers"][name]["greedy_identical_to_ar"] = sum(
                    decoder.matches(a, b) for a, b in zip(runs[name][-1].tokens, ours)) / len(ours)
        plain = {m: out[m]["decode_tokens_per_s"] for m in ("ar", "ar_full") if m in out}
        plain.update({name: p["decode_tokens_per_s"] for name, p in out["peers"].items()})
        out["fastest_plain"] = max(plain, key=plain.get)
        if "spec" in out:
            out["speedup_vs_fastest_plain"] = out["spec"]["decode_tokens_per_s"] / plain[out["fastest_plain"]]
        if LOOKUP_MODE in out:
            out[LOOKUP_MODE]["speedup_vs_fastest_plain"] = (out[LOOKUP_MODE]["decode_tokens_per_s"]
                                                            / plain[out["fastest_plain"]])
    return out


def greedy_identity(backend, prompts: list[list[int]], tokens: list[list[int]], runs: dict) -> dict:
    """How many prompts' tokens equal plain decoding's (draft + verify calls; and the full-model call's, another
    graph, equal where its rounding agrees), and where they part."""
    out = {"greedy_identical_fraction": sum(a == b for a, b in zip(tokens, runs["ar"][-1].tokens)) / len(tokens)}
    if "ar_full" in runs:
        full = zip(tokens, runs["ar_full"][-1].tokens)
        out["greedy_identical_to_full_call_fraction"] = sum(a == b for a, b in full) / len(tokens)
    out["greedy_divergences"] = first_divergences(backend, prompts, tokens, runs["ar"][-1].tokens)
    return out


def first_divergences(backend, prompts: list[list[int]], spec_tokens: list[list[int]],
                      ar_tokens: list[list[int]]) -> list[dict]:
    """Where greedy self-speculation left plain decoding, and how close the call was there.

    For each prompt whose tokens differ: the first differing index, and plain decoding's logits at it,
    replayed through the same calls (prefill, then one draft + one 1-token verify per token): `gap` is
    the logit of plain decoding's token minus that of the token self-speculation emitted, `top` the
    former. Where fp32 artifacts agree and int4 ones part by a fraction of a logit, the multi-row
    verify rounded differently from 1-row calls and int8 activations amplified it (README, "Seventeen sessions ago")."""
    out = []
    for n, (ids, spec, ar) in enumerate(zip(prompts, spec_tokens, ar_tokens)):
        i = next((k for k, (a, b) in enumerate(zip(spec, ar)) if a != b), None)
        if i is None:
            continue  # identical, or one is a prefix of the other (a stop string or EOS cut it)
        backend.reset()
        logits = prefill(backend, backend, ids)  # the calls untimed: the backend itself serves as them
        for k in range(i):  # ar[k] sits at position len(ids) + k
            backend.draft([ar[k]], len(ids) + k)
            logits = backend.verify(len(ids) + k, 1)[0]
        out.append({"prompt": n, "index": i, "ar_token": ar[i], "spec_token": spec[i],
                    "top": float(logits[ar[i]]), "gap": float(logits[ar[i]] - logits[spec[i]]),
                    "replayed": int(logits.argmax()) == ar[i]})
    return out


def greedy_tokens(backend, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
    return [generate(backend, ids, cfg).tokens for ids in prompts]


# ---------------------------------------------------------------- per-call latency


def _median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def last_step_position(backend, d: int) -> int:
    """The furthest position a step of d drafts and its verify can start at."""
    return backend.max_seq_len - d - 2


def per_call_latency(backend, d: int, position: int = 200, n: int = 100) -> dict:
    """Median latency of each call at a fixed position (at most last_step_position), after a prompt
    fills the caches below it."""
    position = min(position, last_step_position(backend, d))
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, 200, size=position).tolist()
    backend.reset()
    for start in range(0, position, backend.max_tokens_per_call):
        chunk = prompt[start:start + backend.max_tokens_per_call]
        backend.draft(chunk, start)
        backend.verify(start, len(chunk))
    backend.draft([5] * (d + 1), position)  # the exit cache rows verify reads
    out = {"draft_1": _median_ms(lambda: backend.draft([5], position), n)}
    for t in sorted({1, 2, d, d + 1}):
        out[f"verify_{t}"] = _median_ms(lambda: backend.verify(position, t), n)
    if callable(getattr(backend, "forward", None)):
        out["full_1"] = _median_ms(lambda: backend.forward([5], position), n)
    out["ar_step_split"] = out["draft_1"] + out["verify_1"]
    return out


def predicted_speedup(calls: dict, d: int, acceptance: float) -> float:
    """Speedup the per-call costs predict at a per-token acceptance rate (draft tokens i.i.d.)."""
    tokens_per_step = (1 - acceptance ** (d + 1)) / (1 - acceptance) if acceptance < 1 else d + 1
    step = (d + 1) * calls["draft_1"] + calls[f"verify_{d + 1}"]
    ar = min(calls["ar_step_split"], calls.get("full_1", float("inf")))
    return tokens_per_step * ar / step


def layer_bound_speedup(num_layers: int, exit_layer: int, drafts_per_step: float, tokens_per_step: float) -> float:
    """The most self-speculation can gain at a measured tokens/step, under costs that favour it:
    a call costs the layers it runs, whatever its token count (memory-bound), and the LM head and
    per-call overheads are free. A step of k drafts runs (k+1) x E draft layers (an early stop's
    last call is the one that found the exit unsure) + L-E verify layers for tokens_per_step tokens;
    plain decoding runs L layers per token. No runtime can beat this bound without a better model
    (higher acceptance at a lower E). drafts_per_step = d without a draft threshold."""
    return tokens_per_step * num_layers / ((drafts_per_step + 1) * exit_layer + num_layers - exit_layer)


def call_bound_speedup(calls: dict, drafts_per_step: float, tokens_per_step: float) -> float:
    """The layer bound's step at the artifact's own per-call costs (per_call_latency: medians at one position, nothing
    between calls): (k+1) draft calls and a verify of k+1 rows (linear between the row counts measured) for
    tokens_per_step tokens, against the cheaper plain call. What drafting from the exit reaches if the loop between
    calls were free; its gap to the layer bound is what the calls cost beyond their layers' share (the LM head, each
    call's fixed cost, rows that cost compute once the weights are read), its gap to the measured speedup what the
    loop costs."""
    measured = sorted((int(name.split("_")[1]), ms) for name, ms in calls.items() if name.startswith("verify_"))
    verify = float(np.interp(drafts_per_step + 1, [rows for rows, _ in measured], [ms for _, ms in measured]))
    plain = min(calls["ar_step_split"], calls.get("full_1", float("inf")))
    return tokens_per_step * plain / ((drafts_per_step + 1) * calls["draft_1"] + verify)


# ---------------------------------------------------------------- quality through the artifact


def heldout_windows(tokenizer, bos_id: int, eos_id: int, count: int = 8, length: int = 256) -> list[list[int]]:
    """`count` evenly spaced windows of the held-out corpus split (the split the model never trained on)."""
    from models.data import corpus_files, encode_files, split_files

    root, files = corpus_files()
    ids = encode_files(tokenizer, split_files(root, files)[1], bos_id, eos_id)
    starts = np.linspace(0, len(ids) - length - 1, count).astype(int)
    return [ids[s:s + length].tolist() for s in starts]


def heldout_quality(backend, windows: list[list[int]]) -> dict:
    """Next-token loss and top-1 accuracy of the backend's full-model logits (draft then verify, in chunks)."""
    nll = correct = count = 0.0
    for ids in windows:
        backend.reset()
        ids = ids[:backend.max_seq_len]  # a window longer than the cache is cut to it
        inputs, targets = ids[:-1], np.asarray(ids[1:])
        logits = []
        for start in range(0, len(inputs), backend.max_tokens_per_call):
            chunk = inputs[start:start + backend.max_tokens_per_call]
            backend.draft(chunk, start)
            logits.append(np.array(backend.verify(start, len(chunk)), np.float64))  # a copy: the call's buffer is reused
        logits = np.concatenate(logits)  # [len(ids) - 1, vocab]
        top = logits.max(-1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(-1))
        nll += float((log_z - logits[np.arange(len(targets)), targets]).sum())
        correct += float((logits.argmax(-1) == targets).sum())
        count += len(targets)
    backend.reset()
    return {"loss": nll / count, "perplexity": float(np.exp(nll / count)), "top1_accuracy": correct / count,
            "tokens": int(count)}


# ---------------------------------------------------------------- Hugging Face transformers peers


def hf_generate(model_dir: Path, prompts: list[list[int]], max_new_tokens: int, eos: tuple[int, ...],
                exit_layer: Optional[int] = None, threads: int = 0) -> dict:
    """transformers' greedy generate, plain or with LayerSkip's assistant_early_exit, on the same checkpoint."""
    import torch
    from transformers import LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    kwargs = dict(do_sample=False, eos_token_id=list(eos), pad_token_id=eos[0])
    if exit_layer is not None:
        kwargs["assistant_early_exit"] = exit_layer
    decode_tokens = decode_s = 0.0
    outputs = []
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, **kwargs)  # warm-up
        for ids in prompts:
            x = torch.tensor([ids])
            t = time.perf_counter()
            model.generate(x, max_new_tokens=1, **kwargs)
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(x, max_new_tokens=max_new_tokens, **kwargs)[0, len(ids):].tolist()
            total = time.perf_counter() - t
            outputs.append(out)
            decode_tokens += len(out) - 1
            decode_s += max(total - ttft, 1e-9)
    return {"decode_tokens_per_s": decode_tokens / decode_s, "tokens": outputs}
