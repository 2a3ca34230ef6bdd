"""The documentation (docs/, mkdocs.yml): the API reference lists every public name, and every
Python block in the guides runs, in order, on a tiny model (the site itself is built with
`mkdocs build --strict` by .ci/run's newest lane)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from tiny_models import build

import hookdelta as hd

DOCS = Path(__file__).resolve().parent.parent / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))


def test_the_reference_documents_every_public_name():
    reference = (DOCS / "reference.md").read_text()
    listed = set(re.findall(r"^::: ([\w.]+)$", reference, flags=re.M))
    for name in hd.__all__:
        if name == "__version__":
            assert "__version__" in reference
            continue
        obj = getattr(hd, name)
        path = obj.__name__ if inspect.ismodule(obj) else f"{obj.__module__}.{obj.__qualname__}"
        assert path in listed, f"hd.{name} ({path}) is not in docs/reference.md"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.M | re.S)


@pytest.mark.parametrize("page", GUIDES, ids=[p.stem for p in GUIDES])
def test_every_python_block_in_a_guide_runs(page, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    assert blocks, f"{page.name} has no Python block to check"
    monkeypatch.chdir(tmp_path)
    model, inputs, _ = build("llama")
    scope = {"model": model, "inputs": inputs}  # what the guides' examples start from
    for block in blocks:
        exec(compile(block, f"{page.name}", "exec"), scope)
