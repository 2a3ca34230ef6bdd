"""The file fuzzer (issue 30): tests/fuzz_worker.py in its own process under a memory cap
(RLIMIT_AS), mutating delta.json, adapter_config.json and both safetensors headers. Every mutant
loads to what its file means or is a HookdeltaError within a second and a few MB; the model and
the files on disk are untouched (the worker asserts each; this test reads its counts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mutated_files_load_as_they_say_or_are_refused_cleanly():
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "FUZZ_EXAMPLES": os.environ.get("FUZZ_EXAMPLES", "2000"),
        "PYTHONWARNINGS": "ignore",
    }
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "fuzz_worker.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    counts = report["counts"]
    print(json.dumps(report, indent=1))  # (the closing note's mutation counts)
    total = sum(n for bucket in counts.values() for n in bucket.values())
    refused = sum(n for bucket in counts.values() for k, n in bucket.items() if k.startswith("refused"))
    assert total >= 1000 and refused > total / 2
    assert {k.split()[0] for k in counts} == {"hookdelta", "peft"}
    assert report["worst"]["seconds"] < 1.0 and report["worst"]["grown_mb"] < 16
