"""The hook engine's input and output plumbing, independent of any delta method."""

import torch
import torch.nn as nn
from helpers import perturb
from transformers.modeling_outputs import BaseModelOutput

import hookdelta as hd
from hookdelta.engine import first_input, map_output


def test_map_output_reaches_the_main_tensor_of_every_output_shape():
    t = torch.ones(2)
    plus = lambda x: x + 1  # noqa: E731
    assert torch.equal(map_output(t, plus), t + 1)
    out = map_output((t, "cache"), plus)
    assert torch.equal(out[0], t + 1) and out[1] == "cache"
    d = map_output({"hidden": t, "other": 3}, plus)
    assert torch.equal(d["hidden"], t + 1) and d["other"] == 3
    mo = BaseModelOutput(last_hidden_state=t)
    new = map_output(mo, plus)
    assert isinstance(new, BaseModelOutput) and torch.equal(new.last_hidden_state, t + 1)
    assert torch.equal(mo.last_hidden_state, t), "the original output is not modified in place"


def test_first_input_positional_or_keyword():
    x = torch.zeros(1)
    assert first_input((x,), {}) is x
    assert first_input((), {"input": x}) is x


def test_lora_works_when_the_layer_is_called_by_keyword():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(input=x)

    net, x = Net(), torch.randn(2, 4)
    delta = hd.attach(net, hd.LoRAConfig(r=2, targets="fc"))
    perturb(delta, std=0.3)
    p = delta.pieces["fc"]
    expected = x @ net.fc.weight.T + net.fc.bias + p.scale * (x @ p.lora_A.T) @ p.lora_B.T
    torch.testing.assert_close(net(x), expected)
