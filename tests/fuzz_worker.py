"""The file fuzzer's worker (issue 30), run by tests/test_fuzz_files.py in its own process under a
memory cap. Hypothesis mutates a saved delta's `delta.json`, a PEFT adapter's
`adapter_config.json` and the safetensors header of each (numbers, types, keys, nesting, shapes,
dtypes, names); every mutant must either load to the outputs its file means or be refused with
a HookdeltaError within a second, leaving the model and the original files untouched. Prints one
JSON line of counts."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from helpers import outputs, perturb, snapshot  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from internals import hook_state  # noqa: E402
from tiny_models import build  # noqa: E402

import hookdelta as hd  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "120"))
WORK = Path(tempfile.mkdtemp(prefix="hookdelta-fuzz-"))
MODEL, INPUTS, _ = build("llama")
SNAP = snapshot(MODEL)

# JSON values a mutation may put anywhere: the numbers that break things, other types, nesting
NUMBERS = st.sampled_from(
    [0, -1, 1, 2, 3, 4, 5, 8, 16, 31, 33, 2**31, 2**63, 10**30, 2_000_000, -(2**31), 0.5, -0.0, 1e308, 1e-320]
)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | NUMBERS
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(
        [
            "re:(a+)+$",
            "q_proj",
            "model.layers.0.self_attn.q_proj",
            "float16",
            "int64",
            "bool",
            "lora",
            "ia3",
            "",
            "re:.*",
        ]
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def originals() -> dict[str, Path]:
    delta = hd.attach(MODEL, hd.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    perturb(delta, std=0.2)
    dirs = {"hookdelta": WORK / "orig-hookdelta", "peft": WORK / "orig-peft"}
    delta.save(dirs["hookdelta"])
    delta.save_peft(dirs["peft"])
    delta.detach()
    return dirs


ORIG = originals()
WANT = {}
for kind, loader in (("hookdelta", hd.load), ("peft", hd.load_peft)):
    d = loader(MODEL, ORIG[kind])
    WANT[kind] = outputs(MODEL, INPUTS)
    d.detach()
HASHES = {p: hashlib.sha256(p.read_bytes()).hexdigest() for d in ORIG.values() for p in d.iterdir()}
COUNTS: dict[str, dict[str, int]] = {}
WORST = {"seconds": 0.0, "grown_mb": 0.0}


def paths(data, prefix=()):
    """Every position in a JSON document (a key path)."""
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from paths(v, prefix + (i,))


def mutate_json(data, draw):
    """One mutation: a value replaced, a key removed or added, a value wrapped or deeply nested."""
    where = draw(st.sampled_from(list(paths(data))))
    action = draw(st.sampled_from(["replace", "number", "remove", "add", "wrap", "nest"]))
    if not where:
        return draw(VALUES) if action == "replace" else data
    parent = data
    for k in where[:-1]:
        parent = parent[k]
    key = where[-1]
    if action == "replace":
        parent[key] = draw(VALUES)
    elif action == "number":
        parent[key] = draw(NUMBERS)
    elif action == "remove":
        del parent[key]
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(VALUES)
    elif action == "wrap":
        parent[key] = [parent[key]]
    elif action == "nest":
        value = parent[key]
        for _ in range(draw(st.integers(1, 200))):
            value = {"x": value}
        parent[key] = value
    return data


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header(path: Path, header: dict, body: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + body)


def mutant_dir(kind: str) -> Path:
    out = Path(tempfile.mkdtemp(dir=WORK))
    for p in ORIG[kind].iterdir():
        shutil.copy(p, out / p.name)
    return out


def attempt(kind: str, directory: Path, what: str, same_meaning: bool) -> None:
    """Load the mutant; record how it ended; check the oracle."""
    loader = hd.load if kind == "hookdelta" else hd.load_peft
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        delta = loader(MODEL, directory)
    except hd.HookdeltaError as exc:
        outcome = f"refused: {type(exc).__name__}"
        assert hd.deltas(MODEL) == {}, "a refused load left a delta behind"
        assert {n: hook_state(m) for n, m in MODEL.named_modules()} == SNAP["hooks"], "hooks left behind"
    else:
        got = outputs(MODEL, INPUTS)
        delta.detach()
        assert torch.isfinite(got).all(), f"{what}: loaded, with non-finite outputs"
        if same_meaning or torch.allclose(got, WANT[kind], atol=1e-6):
            assert torch.allclose(got, WANT[kind], atol=1e-6), f"{what}: loaded, with other outputs"
            outcome = "loaded: same outputs"
        else:  # the file says something else that is valid (another alpha, dropout, ...): what it says
            reference = reference_outputs(kind, directory)
            assert torch.allclose(got, reference, atol=1e-5), f"{what}: loaded, not as its file says"
            outcome = "loaded: another valid config, its outputs"
    elapsed = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    WORST["seconds"] = max(WORST["seconds"], elapsed)
    WORST["grown_mb"] = max(WORST["grown_mb"], grown)
    assert elapsed < 1.0, f"{what}: took {elapsed:.2f} s"
    assert grown < 16, f"{what}: the process grew by {grown:.0f} MB"
    bucket = COUNTS.setdefault(f"{kind} {what.split(':')[0]}", {})
    bucket[outcome] = bucket.get(outcome, 0) + 1
    shutil.rmtree(directory)


def reference_outputs(kind: str, directory: Path) -> torch.Tensor:
    """What a mutated-but-valid file means, computed another way: hookdelta files by attaching
    the file's config and copying in the original tensors; PEFT files by PEFT itself."""
    model, inputs, _ = build("llama")
    if kind == "hookdelta":
        meta = json.loads((directory / "delta.json").read_text())
        delta = hd.attach(model, hd.DeltaConfig.from_dict(meta["config"]))
        ref = hd.load(build("llama")[0], ORIG[kind])
        with torch.no_grad():
            for p, q in zip(delta.parameters(), ref.parameters(), strict=True):
                p.copy_(q)
        return outputs(model, inputs)
    import peft

    return outputs(peft.PeftModel.from_pretrained(model, str(directory)).eval(), inputs)


CONFIG = {"hookdelta": "delta.json", "peft": "adapter_config.json"}
TENSORS = {"hookdelta": "delta.safetensors", "peft": "adapter_model.safetensors"}
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@SETTINGS
@given(kind=st.sampled_from(["hookdelta", "peft"]), data=st.data())
def fuzz_config(kind, data):
    directory = mutant_dir(kind)
    original = json.loads((directory / CONFIG[kind]).read_text())
    mutated = mutate_json(json.loads(json.dumps(original)), data.draw)
    (directory / CONFIG[kind]).write_text(json.dumps(mutated))
    attempt(kind, directory, "config: " + json.dumps(mutated)[:300], same_meaning=mutated == original)


@SETTINGS
@given(kind=st.sampled_from(["hookdelta", "peft"]), data=st.data())
def fuzz_header(kind, data):
    directory = mutant_dir(kind)
    path = directory / TENSORS[kind]
    header, body = read_header(path)
    names = [k for k in header if k != "__metadata__"]
    name = data.draw(st.sampled_from(names))
    action = data.draw(st.sampled_from(["shape", "dtype", "rename", "remove", "add", "offsets", "length", "json"]))
    length = None
    if action == "shape":
        header[name]["shape"] = data.draw(st.lists(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 2**20, 2**40]), max_size=4))
    elif action == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "X"]))
    elif action == "rename":
        header[data.draw(st.sampled_from([name + "x", name.replace("lora_A", "lora_B"), "", "a" * 300]))] = header.pop(
            name
        )
    elif action == "remove":
        del header[name]
    elif action == "add":
        header["model.layers.0.self_attn.k_proj.lora_A.weight"] = dict(header[name])
    elif action == "offsets":
        header[name]["data_offsets"] = data.draw(
            st.lists(st.sampled_from([0, 1, 64, 10**6, 2**62]), min_size=2, max_size=2)
        )
    elif action == "length":
        length = data.draw(st.sampled_from([0, 1, 2**20, 2**63]))
    else:
        header = mutate_json(header, data.draw)
    write_header(path, header, body, length)
    attempt(kind, directory, f"header {action}: {json.dumps(header)[:300]}", same_meaning=True)


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # a mutant that slipped through to a huge allocation fails here, not on the machine
    cap = int(os.environ.get("FUZZ_MEMORY_CAP", str(6 * 2**30)))
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    start = time.perf_counter()
    fuzz_config()
    fuzz_header()
    for d in ORIG.values():
        for p in d.iterdir():
            assert hashlib.sha256(p.read_bytes()).hexdigest() == HASHES[p], f"{p} changed"
    assert {n: hook_state(m) for n, m in MODEL.named_modules()} == SNAP["hooks"]
    assert all(torch.equal(SNAP["params"][n], p) for n, p in MODEL.named_parameters(remove_duplicate=False))
    shutil.rmtree(WORK)
    print(json.dumps({"counts": COUNTS, "worst": WORST, "seconds": time.perf_counter() - start}))
