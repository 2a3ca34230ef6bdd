"""What the project promises about its own dependencies: the floor constraints are the lower
bounds pyproject.toml declares, the compatibility guide (docs/guides/compatibility.md) states them, no test leans on
another library's private names outside tests/internals.py, and every private name of another
library that hookdelta itself uses is listed there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def declared_floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(s for extra in project["optional-dependencies"].values() for s in extra)]
    floors = {}
    for spec in specs:
        name, sep, rest = spec.partition(">=")
        if sep:
            floors[name.strip().lower()] = rest.split(",")[0].strip()
    return floors


def test_the_floor_constraints_pin_exactly_the_declared_lower_bounds():
    pinned = {}
    for line in (ROOT / "constraints" / "floor.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, v = line.partition("==")
            pinned[name.strip()] = v.strip()
    want = {n: v for n, v in declared_floors().items() if n != "torch"}  # torch: the CPU build on disk, both lanes
    assert pinned == want, "run `python .ci/constraints.py floor` after changing pyproject.toml"
    for core in ("transformers", "safetensors", "rich", "peft", "accelerate"):
        assert core in pinned, f"{core} has no declared lower bound"


COMPATIBILITY = ROOT / "docs" / "guides" / "compatibility.md"  # (the guide the README links to)


def test_the_compatibility_table_states_the_floors():
    section = COMPATIBILITY.read_text()
    floors = declared_floors()
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors"):
        assert re.search(rf"\b{re.escape(name)}\b[^\n]*\b{re.escape(floors[name])}\b", section), (name, floors[name])


# a private attribute access (`x._name`) or a private module in a dotted path (`torch._dynamo`)
PRIVATE = re.compile(r"(?<![\w\"'])(?:[A-Za-z_]\w*)(?:\.\w+)*\.(_[A-Za-z]\w*)")
OURS = {"_hookdelta", "_store", "_pwned"}  # hookdelta's own names (the reserved child, Delta._store, a test marker)
INTERNAL_PATHS = re.compile(
    r"\b(?:peft\.tuners|peft\.utils\.[a-z_]+|transformers\.models\.[a-z_]+\.modeling_|"
    r"transformers\.pytorch_utils|nn\.modules\.(?:conv|batchnorm|linear))\b"
)


def test_no_test_reads_another_librarys_private_names_outside_the_one_helper():
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):  # (the conformance folder too)
        if path.name in ("internals.py", "test_packaging.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            names = [n for n in PRIVATE.findall(code) if not n.startswith("__") and n not in OURS]
            if names or INTERNAL_PATHS.search(code):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "move these into tests/internals.py (or use public API):\n" + "\n".join(found)


def library_private_names() -> set[str]:
    """Private names hookdelta's code reads that hookdelta does not define itself."""
    used, own = set(), set()
    for path in (ROOT / "hookdelta").rglob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r"\.(_[A-Za-z]\w*)", text))
        used |= set(re.findall(r"[\"'](_[A-Za-z]\w*)[\"']", text))  # getattr(x, "_name"), ("_a", "_b")
        used |= {
            m.rpartition(".")[2]
            for m in re.findall(r"[\"']([a-z]\w*(?:\.\w+)+)[\"']", text)
            if m.rpartition(".")[2].startswith("_") and not m.rpartition(".")[2].startswith("__")
        }
        own |= set(re.findall(r"(?:def|class) (_[A-Za-z]\w*)", text))
        own |= set(re.findall(r"self\.(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=", text))
        own |= set(re.findall(r"^\s*(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=", text, re.M))
        own |= set(
            re.findall(r"(?:__setattr__\([^,]+|__dict__\.\w+\(|STORE_NAME =)\s*,?\s*[\"'](_[A-Za-z]\w*)[\"']", text)
        )
    return {n for n in used - own - {"_original_", "_svd"} if not n.startswith("__")}  # (our buffer prefix, suffix)


def test_every_private_name_of_another_library_that_hookdelta_uses_is_listed_in_the_compatibility_guide():
    section = COMPATIBILITY.read_text()
    names = library_private_names()
    assert "_parameters" in names and "_convert_weight_packed_for_cpu_inverse" in names  # the scan sees them
    missing = sorted(n for n in names if f"`{n}`" not in section and not re.search(rf"\.{n}\b", section))
    assert not missing, f"list these in docs/guides/compatibility.md: {missing}"


def test_the_version_is_one_in_pyproject_the_package_and_the_changelog():
    import tomllib

    import hookdelta

    root = Path(__file__).resolve().parent.parent
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    assert hookdelta.__version__ == version
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)  # semantic versioning
    changelog = (root / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, flags=re.M)
    assert released and released[0] == version, "CHANGELOG.md's newest released section is not this version"
    assert changelog.index("## [Unreleased]") < changelog.index(f"## [{version}]")


def test_the_package_ships_its_type_hints():
    import importlib.resources

    assert importlib.resources.files("hookdelta").joinpath("py.typed").is_file()
