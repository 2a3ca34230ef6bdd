"""The dispatcher alone: a Site and toy pieces on a plain nn.Linear, no delta, no store, no
method (the way accelerate tests its ModelHook). Expected outputs are computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from internals import forward_hooks, forward_pre_hooks, parameter_slot

from hookdelta.engine import Piece, Site, is_ours


class Add(Piece):
    hooks = frozenset({"post"})

    def __init__(self, c: float) -> None:
        super().__init__("")
        self.c = c

    def post_forward(self, module, args, kwargs, output):
        return output + self.c


class Times(Piece):
    hooks = frozenset({"post"})

    def __init__(self, c: float) -> None:
        super().__init__("")
        self.c = c

    def post_forward(self, module, args, kwargs, output):
        return output * self.c


class ScaleInput(Piece):
    hooks = frozenset({"pre"})

    def __init__(self, c: float) -> None:
        super().__init__("")
        self.c = c

    def pre_forward(self, module, args, kwargs):
        return (args[0] * self.c,) + args[1:], kwargs


class NegateWeight(Piece):
    swaps = ("weight",)

    def __init__(self) -> None:
        super().__init__("")

    def swap(self, module, name, weight):
        return -weight


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return nn.Linear(4, 3), torch.randn(2, 4)


def live_site(layer, *pieces):
    site = Site(layer, "")
    for stamp, piece in enumerate(pieces):
        piece.stamp = stamp
        piece.set_live(True)
        site.add(piece)
    return site


def test_a_post_piece_rewrites_the_output_and_costs_nothing_when_off(layer):
    module, x = layer
    piece = Add(1.5)
    site = live_site(module, piece)
    assert torch.equal(module(x), F.linear(x, module.weight, module.bias) + 1.5)
    assert len(forward_hooks(module)) == 1 and not forward_pre_hooks(module)
    piece.set_live(False)
    site.refresh()
    assert not forward_hooks(module) and not forward_pre_hooks(module)  # off: no hook at all
    assert torch.equal(module(x), F.linear(x, module.weight, module.bias))


def test_a_pre_piece_rewrites_the_input(layer):
    module, x = layer
    live_site(module, ScaleInput(2.0))
    assert torch.equal(module(x), F.linear(2.0 * x, module.weight, module.bias))
    assert len(forward_pre_hooks(module)) == 1 and not forward_hooks(module)


def test_a_swap_lasts_one_call_even_when_it_raises(layer):
    module, x = layer
    weight = module.weight
    live_site(module, NegateWeight())
    assert torch.equal(module(x), F.linear(x, -weight, module.bias))
    assert parameter_slot(module, "weight") is weight
    with pytest.raises(RuntimeError):
        module(torch.randn(2, 5))  # wrong width: the forward raises inside the swap
    assert parameter_slot(module, "weight") is weight


def test_pieces_at_one_site_run_in_attach_order_with_one_hook(layer):
    module, x = layer
    add, times = Add(1.0), Times(3.0)
    site = live_site(module, add, times)
    base = F.linear(x, module.weight, module.bias)
    assert torch.equal(module(x), (base + 1.0) * 3.0)
    assert len(forward_hooks(module)) == 1
    add.set_live(False)  # off and on again: it keeps its place, first
    site.refresh()
    assert torch.equal(module(x), base * 3.0)
    add.set_live(True)
    site.refresh()
    assert torch.equal(module(x), (base + 1.0) * 3.0)


def test_pre_post_and_swap_pieces_together(layer):
    module, x = layer
    live_site(module, ScaleInput(2.0), NegateWeight(), Add(0.5))
    assert torch.equal(module(x), F.linear(2.0 * x, -module.weight, module.bias) + 0.5)
    assert len(forward_pre_hooks(module)) == 1 and len(forward_hooks(module)) == 1


def test_discarding_every_piece_leaves_no_hook(layer):
    module, x = layer
    pieces = [Add(1.0), ScaleInput(2.0), NegateWeight()]
    site = live_site(module, *pieces)
    for piece in pieces:
        site.discard(piece)
    assert not site.pieces and not forward_hooks(module) and not forward_pre_hooks(module)
    assert torch.equal(module(x), F.linear(x, module.weight, module.bias))


def test_another_hook_keeps_its_place_among_the_pieces(layer):
    module, x = layer
    first = Add(1.0)
    site = live_site(module, first)
    handle = module.register_forward_hook(lambda m, a, o: o * 2.0)  # registered after the piece
    base = F.linear(x, module.weight, module.bias)
    for _ in range(2):  # off and on: the piece goes back in front of it, not behind
        first.set_live(False)
        site.refresh()
        first.set_live(True)
        site.refresh()
        assert torch.equal(module(x), (base + 1.0) * 2.0)
    assert sum(is_ours(h) for h in forward_hooks(module).values()) == 1
    handle.remove()


def test_a_piece_through_a_childs_weight_swaps_it_for_the_parents_call():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.child = nn.Linear(4, 3)

        def forward(self, x):
            return F.linear(x, self.child.weight, self.child.bias)  # never calls the child

    torch.manual_seed(0)
    parent, x = Parent(), torch.randn(2, 4)

    class Shift(Piece):
        def delta_weights(self, module):
            return {"weight": torch.ones_like(module.weight)}

    piece = Shift("")
    piece.through = "child"
    live_site(parent, piece)
    assert torch.equal(parent(x), F.linear(x, parent.child.weight + 1, parent.child.bias))
    assert isinstance(parameter_slot(parent.child, "weight"), nn.Parameter)  # put back after the call
