"""IA³ (Liu et al. 2022): learned vectors that rescale activations, initialized to ones.
Keys, values (and other output targets): out -> l ⊙ out. Feed-forward targets (the FFN's
down projection): the *input* is rescaled, x -> l ⊙ x. Both fold into the weight on merge
(rows or columns scaled), and the original is kept so unmerge is exact."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..config import DeltaConfig, PeftCodec, Selector, exact, has_callable, normalize_selector
from ..engine import Piece, current, map_first_input, map_output
from ..errors import SelectorError, UnsupportedModuleError
from ..modules import is_conv1d, is_linear_like, layer_dims, resolve_site
from ..placement import layer_like, like_tensor
from ..roles import experts_transposed
from ..selection import match, model_order


class Rescale(Piece):
    """l ⊙ output (on_input=False) or the layer applied to l ⊙ input (on_input=True)."""

    merges_by = "value"  # the merge multiplies; only the kept original undoes it
    rescales = True

    def __init__(self, key: str, module: nn.Module, width: int, on_input: bool, like: torch.Tensor) -> None:
        super().__init__(key)
        self.ia3_l = nn.Parameter(torch.ones(width, device=like.device, dtype=like.dtype))
        self.on_input = self.rewrites_input = on_input
        self.hooks = frozenset({"pre"} if on_input else {"post"})  # one hook, on the side that is scaled
        self.conv1d = is_conv1d(module)

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not self.on_input:
            return args, kwargs
        return map_first_input(args, kwargs, lambda x: x * self.ia3_l.to(x.dtype))

    def post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.on_input:
            return output
        return map_output(output, lambda h: h * self.ia3_l.to(h.dtype))

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        w, gain = current(module, "weight").float(), self.ia3_l.float()  # differentiable: also the weight path (Piece)
        # nn.Linear weight is [out, in]; Conv1D stores [in, out]
        out_axis, in_axis = (1, 0) if self.conv1d else (0, 1)
        axis = in_axis if self.on_input else out_axis
        shape = [1, 1]
        shape[axis] = -1
        merged = {"weight": w * gain.reshape(shape)}
        bias = module._parameters.get("bias")
        if bias is not None and not self.on_input:
            merged["bias"] = bias.float() * gain
        return merged

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return f"ia3 ⊙{'input' if self.on_input else 'output'}[{self.ia3_l.shape[0]}]"


class RescaleExperts(Piece):
    """IA³ on a fused experts tensor [experts, out, in] (or [experts, in, out], `transposed`):
    one vector per expert, l [experts, width], scaling each expert's inputs (on_input: the
    feed-forward's down projection) or outputs. Acts as the weight it would merge, W ⊙ l over
    the scaled dim, swapped in for the call (the scaled activations live inside the experts'
    own code, where no hook reaches)."""

    merges_by = "value"
    rescales = True

    def __init__(
        self, key: str, name: str, weight: torch.Tensor, on_input: bool, transposed: bool, like: torch.Tensor
    ) -> None:
        super().__init__(key.rpartition(".")[0], key)
        self.swaps, self.param_name, self.on_input = (name,), name, on_input
        # the scaled dim: the input dim is the last one, or the middle one when stored [experts, in, out]
        self.dim = -1 if on_input != transposed else -2
        self.ia3_l = nn.Parameter(
            torch.ones(weight.shape[0], weight.shape[self.dim], device=like.device, dtype=like.dtype)
        )

    def _value(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.ia3_l.to(weight.dtype).unsqueeze(-1 if self.dim == -2 else -2)

    def swap(self, module: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self._value(weight)

    def merged_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {self.param_name: self._value(current(module, self.param_name).float())}

    def delta_weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return self.delta_from_merged(module)

    def describe(self) -> str:
        return f"{self.param_name}: ia3 ⊙{'input' if self.on_input else 'output'}{list(self.ia3_l.shape)}"


@dataclass(frozen=True, kw_only=True)
class IA3Config(DeltaConfig):
    """IA³. targets: layers whose output is rescaled (default: keys and values);
    feedforward_targets: layers whose input is rescaled (default: the FFN down projection)."""

    feedforward_targets: Selector | None = None

    method = "ia3"
    expert_sites = "parameter"
    default_targets = ("attn.k", "attn.v")

    def validate(self) -> None:
        object.__setattr__(
            self, "feedforward_targets", normalize_selector("feedforward_targets", self.feedforward_targets)
        )

    def select(self, model: nn.Module) -> list[str]:
        sites = super().select(model)
        return model_order(model, sites + self._feedforward(model))

    def portable(self, delta: Any) -> dict[str, Any]:
        data = super().portable(delta)
        if has_callable(self.to_dict()):  # the sites whose input is scaled
            data["feedforward_targets"] = [exact(p.key) for p in delta.pieces.values() if p.on_input] or None
        return data

    def _feedforward(self, model: nn.Module) -> list[str]:
        if self.feedforward_targets is not None:
            return match(model, self.feedforward_targets, self.exclude, self.layers)
        if self.targets is not None:
            return []
        try:  # by default the feed-forward output layer's input, where the model has one
            return match(model, ("ffn.out",), self.exclude, self.layers)
        except SelectorError:
            return []

    def build(self, model: nn.Module, sites: Sequence[str]) -> list[Piece]:
        ff = set(self._feedforward(model))
        pieces: list[Piece] = []
        for path in sites:
            module, name = resolve_site(model, path)
            param = module._parameters[name] if name is not None else None
            if name is not None and param is not None and param.dim() == 3:  # fused experts, per expert
                pieces.append(
                    RescaleExperts(
                        path,
                        name,
                        param,
                        path in ff,
                        experts_transposed(model, path),
                        like_tensor(model, path.rpartition(".")[0], param),
                    )
                )
                continue
            if name is not None or not is_linear_like(module):
                raise UnsupportedModuleError(
                    f"IA3 rescales linear layers; {path!r} is a {type(module).__name__}. Narrow the targets."
                )
            width_in, width_out = layer_dims(model, module, path)
            on_input = path in ff
            like = layer_like(model, path, module)
            pieces.append(Rescale(path, module, width_in if on_input else width_out, on_input, like))
        return pieces


class IA3Codec(PeftCodec):
    """PEFT's IA3 files: ia3_l as [out, 1] where outputs are scaled, [1, in] where inputs are
    (PEFT's feedforward modules); hookdelta keeps it flat."""

    peft_type = "IA3"
    understood = frozenset({"feedforward_modules", "fan_in_fan_out", "modules_to_save", "init_ia3_weights"})
    suffixes = {".ia3_l": "ia3_l"}

    def to_config(
        self,
        model: nn.Module,
        peft_config: dict[str, Any],
        named: dict[str, dict[str, torch.Tensor]],
        common: dict[str, Any],
    ) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        feedforward = [s for s, ts in named.items() if ts["ia3_l"].shape[0] == 1]
        cfg = IA3Config(
            targets=[exact(s) for s in named], feedforward_targets=[exact(s) for s in feedforward] or None, **common
        )
        return cfg, {f"{s}.{n}": t.reshape(-1) for s, ts in named.items() for n, t in ts.items()}

    def from_delta(self, delta: Any, pieces: list[Piece]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        odd = [p.key for p in pieces if isinstance(p, RescaleExperts)]
        if odd:
            raise UnsupportedModuleError(
                f"PEFT's IA3 has no fused experts tensors (target_parameters), such as "
                f"{odd[0]!r}; save delta {delta.name!r} with delta.save() instead"
            )
        tensors = {
            p.key + ".ia3_l": p.ia3_l.detach().reshape((1, -1) if p.on_input else (-1, 1)).contiguous() for p in pieces
        }
        fields = {
            "peft_type": "IA3",
            "init_ia3_weights": True,
            "feedforward_modules": [p.key for p in pieces if p.on_input],
            **self.tuner_fields(delta, pieces),
        }
        return fields, tensors


IA3Config.peft_codec = IA3Codec()
