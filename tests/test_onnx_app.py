"""Running an .onnx artifact as an app installed from requirements-onnx.txt would: no PyTorch, no exporter.

Each subprocess makes `import torch` fail before anything else is imported, then generates through
the command line; its tokens must equal those of the same command in a process that has torch.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_checkpoint
from export.pipeline import ExportConfig, run_export
from runtime.generate import main as generate_main
from runtime.loader import open_artifact
from test_decoding import exact_second_token_distribution, goodness_of_fit, second_tokens

pytestmark = pytest.mark.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
# Top-level packages the app path may load besides the standard library and our `runtime`.
APP_PACKAGES = {"numpy", "onnxruntime", "tokenizers"}
HEAVY = ("torch", "executorch", "torchao", "onnx", "onnxscript", "export", "models", "quant", "transformers")

CHILD = """
import json, sys
sys.modules["torch"] = None  # every `import torch` now raises ImportError
from runtime.generate import main
rc = main(sys.argv[1:])
loaded = sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None})
print(json.dumps({"rc": rc, "loaded": loaded}), file=sys.stderr)
"""

SETTINGS = {"greedy_self_speculative": [], "greedy_autoregressive": ["--ar"],
            "greedy_full_model": ["--ar", "--full-model"],
            "sampling_self_speculative": ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "3"]}


@pytest.fixture(scope="module")
def int4_onnx(tiny_checkpoint, tmp_path_factory):
    return run_export(ExportConfig(model=tiny_checkpoint, out=tmp_path_factory.mktemp("app"), backend="onnx",
                                   quant="int4", max_seq_len=128, max_tokens_per_call=16))[0]


def argv(artifact: Path, extra: list[str]) -> list[str]:
    return ["--artifact", str(artifact), "--prompt", "def add(a, b):", "--max-new-tokens", "40", "--json", *extra]


def run_without_torch(args: list[str]) -> tuple[dict, dict]:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), json.loads(proc.stderr.strip().splitlines()[-1])


def run_here(args: list[str], capsys) -> dict:
    assert generate_main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("setting", SETTINGS)
def test_generation_without_torch_equals_the_torch_process(int4_onnx, setting, capsys):
    args = argv(int4_onnx.directory, SETTINGS[setting])
    without, child = run_without_torch(args)
    assert "torch" in sys.modules  # this process has it: the comparison is torch-path vs torch-free path
    assert without["tokens"] == run_here(args, capsys)["tokens"]
    assert len(without["tokens"]) == 40 or without["stats"]["stop_reason"] == "eos"
    assert child["rc"] == 0
    assert not set(HEAVY) & set(child["loaded"]), f"the app path loaded {set(HEAVY) & set(child['loaded'])}"
    assert APP_PACKAGES <= set(child["loaded"])
    if setting == "greedy_self_speculative":
        assert 0 < without["stats"]["accepted"] < without["stats"]["drafted"]


def test_a_bad_artifact_is_a_clean_error_without_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv(tmp_path / "missing", [])], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0  # the child's own exit; main() returned 2
    assert json.loads(proc.stderr.strip().splitlines()[-1])["rc"] == 2
    assert "error: Artifact directory" in proc.stderr and "Traceback" not in proc.stderr


def test_the_eager_path_without_torch_names_the_full_install():
    proc = subprocess.run([sys.executable, "-c", CHILD, "--prompt", "x"], capture_output=True, text=True, cwd=ROOT)
    assert json.loads(proc.stderr.strip().splitlines()[-1])["rc"] == 2
    assert "needs torch" in proc.stderr and "pip install -e ." in proc.stderr and "Traceback" not in proc.stderr


def test_the_export_out_directory_names_the_artifact_inside(int4_onnx, capsys):
    out = int4_onnx.directory.parent  # export.py --out OUT wrote OUT/onnx
    assert generate_main(["--artifact", str(out), "--prompt", "x"]) == 2
    assert f"pass --artifact {out / 'onnx'}" in capsys.readouterr().err


def test_app_requirements_pin_what_pyproject_pins():
    pins = dict(re.findall(r"^([a-z_-]+)(\S*)$", (ROOT / "requirements-onnx.txt").read_text(), re.M))
    assert set(pins) == APP_PACKAGES
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name, spec in pins.items():
        assert f'"{name}{spec}"' in pyproject, f"requirements-onnx.txt pins {name}{spec}, pyproject.toml does not"


# ---------------------------------------------------------------- sampling through ONNX Runtime


@pytest.fixture(scope="module")
def small_vocab_onnx(small_vocab_model, tmp_path_factory):
    checkpoint = write_checkpoint(tmp_path_factory.mktemp("small") / "ckpt", small_vocab_model, exit_layer=1, d=2)
    return run_export(ExportConfig(model=checkpoint, out=checkpoint.parent / "art", backend="onnx", max_seq_len=16,
                                   max_tokens_per_call=4))[0]


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.8, top_k=6, top_p=0.9)])
def test_self_speculative_sampling_through_onnx_runtime_keeps_the_distribution(small_vocab_model,
                                                                                  small_vocab_onnx, settings):
    from runtime.decoding import GenerationConfig

    prompt = [3, 7]
    cfg = GenerationConfig(max_new_tokens=2, num_speculations=2, **settings)
    exact = exact_second_token_distribution(small_vocab_model, prompt, cfg)
    backend = open_artifact(small_vocab_onnx.directory).backend
    observed = second_tokens(backend, small_vocab_model.config.vocab_size, cfg, 2000, prompt)
    assert goodness_of_fit(observed, exact) > 1e-3
