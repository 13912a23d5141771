"""`python -m runtime.generate`: streaming, JSON, stop strings, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import generate as cli

REPO = Path(__file__).resolve().parents[1]


def run_json(capsys, *args) -> dict:
    assert cli.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_output_and_self_speculation_equals_autoregressive(tiny_checkpoint, capsys):
    common = ["--model", str(tiny_checkpoint), "--prompt", "def add(a, b):", "--max-new-tokens", "40"]
    spec = run_json(capsys, *common)
    ar = run_json(capsys, *common, "--ar")
    assert spec["tokens"] == ar["tokens"] and len(spec["tokens"]) == 40
    assert spec["text"] == ar["text"]
    assert spec["settings"]["exit_layer"] == 2 and spec["settings"]["num_speculations"] == 3  # recommended
    assert spec["stats"]["drafted"] > 0 and ar["stats"]["drafted"] == 0
    assert {"time_to_first_token_s", "decode_tokens_per_s", "acceptance_rate", "mean_tokens_per_step",
            "tokens_per_step", "draft_calls", "verify_calls", "peak_rss_mb"} <= set(spec["stats"])


def test_lookup_reaches_the_decoding_loop(tiny_checkpoint, capsys, monkeypatch):
    """The loop itself is tested in test_decoding.py (this random model's text does not repeat itself)."""
    from runtime import decoding

    asked = []
    monkeypatch.setattr(decoding, "lookup_drafts", lambda context, k, n, *run: asked.append((k, n)) or [])
    common = ["--model", str(tiny_checkpoint), "--prompt", "def add(a, b):", "--max-new-tokens", "20"]
    looked_up = run_json(capsys, *common, "--lookup", "6")
    assert asked and set(asked) == {(6, 2)} and looked_up["settings"]["lookup"] == 6
    # the settings name the step policy as the loop resolved it (eager: runs of K, no fallback, no exit guesses)
    assert {k: looked_up["settings"][k] for k in ("lookup_run", "lookup_fallback", "exit_guesses")} == \
        {"lookup_run": 6, "lookup_fallback": 0, "exit_guesses": 0}
    guessing = run_json(capsys, *common, "--exit-guesses", "2", "--lookup-fallback", "3")
    assert (guessing["settings"]["exit_guesses"], guessing["settings"]["lookup_fallback"]) == (2, 3)
    assert guessing["stats"]["drafted"] == 2 * guessing["stats"]["steps"]  # two guesses a step: no threshold here
    assert looked_up["tokens"] == run_json(capsys, *common)["tokens"]
    assert looked_up["settings"]["unmatched_step"] == "exit"  # eager: exit drafts where nothing matched
    plain = run_json(capsys, *common, "--lookup", "6", "--unmatched-step", "plain")
    assert plain["settings"]["unmatched_step"] == "plain" and plain["stats"]["full_calls"] == plain["stats"]["steps"]


def test_streaming_prints_the_text_and_a_summary(tiny_checkpoint, capsys):
    assert cli.main(["--model", str(tiny_checkpoint), "--prompt", "class Point:", "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("class Point:")
    summary = err.strip().splitlines()[-1]
    assert "self-speculative" in summary and "20 tokens" in summary and "acceptance" in summary


def test_prompt_file_and_sampling_are_reproducible(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("for i in range(10):")
    args = ["--model", str(tiny_checkpoint), "--prompt-file", str(tmp_path / "p.txt"), "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "30"]
    first, second = run_json(capsys, *args), run_json(capsys, *args)
    assert first["tokens"] == second["tokens"]
    assert first["prompt"] == "for i in range(10):"


def test_stop_string_ends_generation_there(tiny_checkpoint, capsys):
    base = run_json(capsys, "--model", str(tiny_checkpoint), "--prompt", "def add(", "--max-new-tokens", "60")
    stop = base["text"][10:13]
    stopped = run_json(capsys, "--model", str(tiny_checkpoint), "--prompt", "def add(", "--max-new-tokens", "60",
                       "--stop", stop)
    assert stopped["text"] == base["text"][:base["text"].index(stop)]
    assert stopped["stats"]["stop_reason"] == "stop_string"


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir"], "Checkpoint directory '/no/such/dir' does not exist"),
    (["--exit-layer", "0"], "exit layer 0 is out of range"),
    (["--exit-layer", "4"], "pass --exit-layer between 1 and 3"),
    (["--num-speculations", "0"], "--num-speculations 0 must be >= 1"),
    (["--max-seq-len", "8"], "prompt has"),
    (["--lookup", "-1"], "--lookup -1 must be >= 0"),
    (["--artifact", "/no/such/artifact"], "Artifact directory '/no/such/artifact' does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_checkpoint, args, message):
    base = [] if args[0] in ("--model", "--artifact") else ["--model", str(tiny_checkpoint)]
    proc = subprocess.run([sys.executable, "-m", "runtime.generate", *base, *args, "--prompt",
                           "def add(a, b):\n    return a + b\n"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_config_that_is_not_llama(tmp_path, tiny_checkpoint, capsys):
    import shutil

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    assert cli.main(["--model", str(ckpt), "--prompt", "x"]) == 2
    assert "model_type='mistral', not 'llama'" in capsys.readouterr().err


def test_corrupt_weights(tmp_path, tiny_checkpoint, capsys):
    import shutil

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert cli.main(["--model", str(ckpt), "--prompt", "x"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_a_plain_checkpoint_decodes_with_ar_and_names_how_to_choose_an_exit_otherwise(tiny_checkpoint, tmp_path,
                                                                                     capsys):
    """Without layerskip.json, --ar needs no exit layer (any split gives the same tokens); self-speculation
    says in one line how to choose one."""
    import shutil

    plain = Path(shutil.copytree(tiny_checkpoint, tmp_path / "plain"))
    (plain / "layerskip.json").unlink()
    common = ["--prompt", "def add(a, b):", "--max-new-tokens", "30", "--ar"]
    ar = run_json(capsys, "--model", str(plain), *common)
    assert ar["settings"]["exit_layer"] == 2  # L // 2 of the 4-layer model, stated in the JSON
    assert ar["tokens"] == run_json(capsys, "--model", str(plain), *common, "--exit-layer", "1")["tokens"]
    assert cli.main(["--model", str(plain), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "no recommended exit layer" in err and "models.evaluate" in err and "--ar" in err
    assert "Traceback" not in err
