"""DoRA (Liu et al. 2024) on LoRA's pieces: the LoRA-updated weight, renormalized per output
row (per embedding dimension, per output channel) and scaled by a trained magnitude m."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine import current, first_input
from ..modules import Layer
from ..placement import live_weight
from .lora_layers import LoRAConv, LoRAEmbedding, LoRALinear

if TYPE_CHECKING:
    from .lora import LoRAConfig


class DoRALinear(LoRALinear):
    """DoRA: the LoRA-updated weight, renormalized per output row and scaled by a trained
    magnitude. Computed on the output side as PEFT does: with c = m / ‖W + ΔW‖ (the norm
    detached from the graph, as the DoRA paper recommends),
    y = base(x) + (c − 1)·(W·x) + c·s·B·A·x, so W + ΔW is never applied to the input."""

    merges_by = "value"  # merging rescales the weight; only the kept original undoes it
    additive = False
    reads_weight = True  # the norm of W + ΔW

    def lowrank(self, module: Layer) -> None:
        return None  # the magnitude rescales the base term too

    def __init__(self, cfg: LoRAConfig, key: str, module: Layer, like: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__(cfg, key, module, like)
        with torch.no_grad():
            self.magnitude = nn.Parameter(self._rows(weight.detach()).norm(dim=1).to(like.device, like.dtype))

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.conv1d else weight  # [out, in]

    def _scale(self, module: Layer) -> torch.Tensor:
        with torch.no_grad():  # the norm is a constant for autograd (as the paper and PEFT do): no graph, no
            w = self._rows(live_weight(module)).to(self.lora_A.dtype)  # saved copy of the weight
            norm = (w + (self.lora_B @ self.lora_A) * self.scale).norm(dim=1)
        return self.magnitude / norm

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        x = first_input(args, kwargs).to(self.lora_A.dtype)
        c = self._scale(module)
        dropped = self.drop(module, x)
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scale
        if dropped is x:  # the host output already holds W·x (+ bias)
            bias = module._parameters.get("bias")
            base = output.to(c.dtype) - (bias.to(c.dtype) if bias is not None else 0)
        else:  # PEFT computes the base term on the dropped-out input
            base = F.linear(dropped, self._rows(live_weight(module)).to(c.dtype))
        delta = (c - 1) * base + c * lora
        return output + delta.to(output.dtype)

    def merged_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        w = self._rows(current(module, "weight")).float()  # differentiable: also the weight path (see Piece)
        updated = w + (self.lora_B.float() @ self.lora_A.float()) * self.scale
        merged = updated * (self.magnitude.float() / updated.norm(dim=1).detach()).unsqueeze(1)
        out = {"weight": merged.T if self.conv1d else merged}
        return out

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return "DoRA " + super().describe()


class DoRAEmbedding(LoRAEmbedding):
    """DoRA on nn.Embedding, as PEFT computes it: the magnitude m and the norm are per embedding
    dimension (a column of the [num, dim] table), c = m / ‖W + ΔW‖ (the norm detached), and the
    lookup becomes c ⊙ (W[ids] + s·(Aᵀ[ids])·Bᵀ)."""

    merges_by, additive, reads_weight = "value", False, True

    def __init__(
        self, cfg: LoRAConfig, key: str, module: nn.Embedding, like: torch.Tensor, weight: torch.Tensor
    ) -> None:
        super().__init__(cfg, key, module, like)
        with torch.no_grad():
            self.magnitude = nn.Parameter(weight.detach().float().norm(dim=0).to(like.device, like.dtype))

    def lowrank(self, module: Layer) -> None:
        return None  # the magnitude rescales the looked-up rows too

    def _updated(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + ((self.lora_B @ self.lora_A) * self.scale).T.to(weight.dtype)

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        with torch.no_grad():  # the norm is a constant for autograd, as in DoRA and PEFT
            norm = self._updated(live_weight(module).to(self.lora_A.dtype)).norm(dim=0)
        c = self.magnitude / norm
        lora = F.embedding(first_input(args, kwargs), self.lora_A.T, module.padding_idx) @ self.lora_B.T * self.scale
        return (c * output.to(c.dtype) + c * lora).to(output.dtype)

    def merged_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        updated = self._updated(current(module, "weight").float())
        return {"weight": updated * (self.magnitude.float() / updated.norm(dim=0).detach())[None, :]}

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return "DoRA " + super().describe()


class DoRAConv(LoRAConv):
    """DoRA on an ungrouped Conv1d/2d/3d, as PEFT computes it: c = m / ‖W + ΔW‖ per output
    channel (the norm detached), y = base(x) + (c − 1)·(W ⊛ x) + c·s·B ⊛ A ⊛ x."""

    merges_by, additive, reads_weight = "value", False, True

    def __init__(self, cfg: LoRAConfig, key: str, module: Layer, like: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__(cfg, key, module, like)
        shape = (1, -1) + (1,) * (weight.dim() - 2)  # PEFT's layout: [1, out, 1, ...]
        with torch.no_grad():
            self.magnitude = nn.Parameter(
                weight.detach().float().flatten(1).norm(dim=1).reshape(shape).to(like.device, like.dtype)
            )

    def lowrank(self, module: Layer) -> None:
        return None

    def _updated(self, weight: torch.Tensor) -> torch.Tensor:
        r = self.r
        dw = (self.lora_B.reshape(-1, r) @ self.lora_A.reshape(r, -1)).reshape(weight.shape) * self.scale
        return weight + dw.to(weight.dtype)

    def post_forward(self, module: Layer, args: tuple, kwargs: dict, output: Any) -> Any:
        with torch.no_grad():
            norm = self._updated(live_weight(module).to(self.lora_A.dtype)).flatten(1).norm(dim=1)
        c = self.magnitude / norm.reshape(self.magnitude.shape)
        x = self.drop(module, first_input(args, kwargs)).to(self.lora_A.dtype)
        lora = self.conv(module._conv_forward(x, self.lora_A, None), self.lora_B) * self.scale
        if self.p and module.training:  # PEFT computes the base term on the dropped-out input
            base = module._conv_forward(x, live_weight(module).to(c.dtype), None)
        else:  # the host output already holds W ⊛ x (+ bias)
            bias = module._parameters.get("bias")
            base = output.to(c.dtype) - (bias.to(c.dtype).reshape(self.magnitude.shape) if bias is not None else 0)
        return output + ((c - 1) * base + c * lora).to(output.dtype)

    def merged_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        updated = self._updated(current(module, "weight").float())
        norm = updated.flatten(1).norm(dim=1).detach()
        out = self.magnitude.float().reshape(-1) / norm
        return {"weight": updated * out.reshape((-1,) + (1,) * (updated.dim() - 1))}

    def delta_weights(self, module: Layer) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return "DoRA " + super().describe()
