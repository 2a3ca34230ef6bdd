"""A method added the way docs/guides/layout.md says, entirely in one file (here), with no edit to the
library: a learned per-output scale on linear layers, y' = (1 + s) ⊙ y. Everything the
library offers must then work for it: default positions from roles, attach / disable /
detach, merge / unmerge, save / load, visualize. The references are the manual formula and
the untouched model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from helpers import assert_restored, outputs, perturb, snapshot
from tiny_models import build

import hookdelta as hd
from hookdelta.config import DeltaConfig, check_float
from hookdelta.engine import Piece
from hookdelta.errors import UnsupportedModuleError


class OutputScale(Piece):
    hooks = frozenset({"post"})
    merges_by = "value"  # (1 + s) ⊙ W: a product, so only the kept original undoes it

    def __init__(self, key: str, out_features: int, init: float) -> None:
        super().__init__(key)
        self.s = nn.Parameter(torch.full((out_features,), init))

    def post_forward(self, module, args, kwargs, output):
        return output * (1 + self.s).to(output.dtype)

    def merged_weights(self, module):
        scale = (1 + self.s).float()
        out = {"weight": module.weight.detach().float() * scale[:, None]}
        if module.bias is not None:
            out["bias"] = module.bias.detach().float() * scale
        return out


@dataclass(frozen=True, kw_only=True)
class OutputScaleConfig(DeltaConfig):
    init: float = 0.0

    method = "test_output_scale"
    default_targets = ("attn.o", "ffn.out")

    def validate(self) -> None:
        check_float(self, "init", low=-1.0, low_open=True)

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        pieces = []
        for path in sites:
            module = model.get_submodule(path)
            if not isinstance(module, nn.Linear):
                raise UnsupportedModuleError(f"{path!r} is not nn.Linear")
            pieces.append(OutputScale(path, module.out_features, self.init))
        return pieces


@pytest.fixture()
def llama():
    return build("llama")[:2]


def test_defaults_come_from_roles_and_the_formula_holds(llama):
    model, inputs = llama
    bare = snapshot(model)
    delta = hd.attach(model, OutputScaleConfig())
    assert sorted(delta.sites) == sorted(hd.match(model, ["attn.o", "ffn.out"]))
    perturb(delta, std=0.1)
    got = outputs(model, inputs)
    # the reference: the same scale applied by hand to a copy's weights (y' = (1+s) ⊙ (W x + b))
    delta.disable()
    plain = outputs(model, inputs)
    handles = [
        model.get_submodule(p.site_path).register_forward_hook(lambda m, a, y, p=p: y * (1 + p.s.detach()))
        for p in delta.pieces.values()
    ]
    want = outputs(model, inputs)
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
    delta.detach()
    assert_restored(model, bare)


def test_merge_matches_hooks_and_unmerge_is_exact(llama):
    model, inputs = llama
    bare = snapshot(model)
    delta = hd.attach(model, OutputScaleConfig())
    perturb(delta, std=0.1)
    hooked = outputs(model, inputs)
    delta.merge()
    torch.testing.assert_close(outputs(model, inputs), hooked, rtol=1e-4, atol=1e-5)
    delta.unmerge()
    delta.detach()
    assert_restored(model, bare)


def test_save_load_and_visualize(llama, tmp_path, capsys):
    model, inputs = llama
    delta = hd.attach(model, OutputScaleConfig(init=0.5))
    perturb(delta, std=0.1)
    want = outputs(model, inputs)
    delta.save(tmp_path / "d")
    fresh = build("llama")[0]
    loaded = hd.load(fresh, tmp_path / "d")
    assert loaded.config == OutputScaleConfig(init=0.5)
    torch.testing.assert_close(outputs(fresh, inputs), want, rtol=0, atol=0)
    hd.visualize(fresh)
    assert "test_output_scale" in capsys.readouterr().out


def test_its_bad_field_is_refused_by_name():
    with pytest.raises(hd.ConfigError, match="init"):
        OutputScaleConfig(init=-2.0)
