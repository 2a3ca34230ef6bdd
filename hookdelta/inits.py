"""LoRA initialisations that read the model's data or its full-precision weights (PEFT's
`init_lora_weights` "lora_ga", "corda", "loftq", "eva"): plain functions that gather what the init needs,
then attach the LoRA, whose pieces take their first factors from it.

    delta = hd.inits.lora_ga(model, hd.LoRAConfig(r=8, init="lora_ga"), train_step)
    delta = hd.inits.corda(model, hd.LoRAConfig(r=8, init="corda"), run_model, method="ipm")
    delta = hd.inits.loftq(qmodel, hd.LoRAConfig(r=8, init="loftq"), "path/to/float/model")
    delta = hd.inits.eva(model, hd.LoRAConfig(r=8, init="eva"), batches)

Each gives PEFT's factors from the same weights, data and seed. PEFT then writes the base
(LoRA-GA and CorDA take their principal part out of it); hookdelta never does: as for PiSSA, the
first factors stay as a frozen residual, so a fresh LoRA-GA or CorDA delta changes nothing.
LoftQ is for quantized bases: its factors carry the quantization error, s·B·A ≈ W − Q (PEFT
writes B·A ≈ W − Q whatever the scale s; the two agree when alpha = r).

The gathered statistics reach the pieces through `supplied()` for the length of one attach; a
saved delta loads without them (its tensors, residual included, come from the file).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn as nn

from .errors import ConfigError, UnsupportedModuleError

_local = threading.local()
DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")
DATA_INITS = ("lora_ga", "corda", "loftq", "eva")


@contextlib.contextmanager
def _supplying(init: str, data: dict[str, Any]) -> Iterator[None]:
    previous = getattr(_local, "data", None)
    _local.data = (init, data)
    try:
        yield
    finally:
        _local.data = previous


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """A saved delta being rebuilt: data inits make placeholders (the file holds the values)."""
    previous = getattr(_local, "loading", False)
    _local.loading = True
    try:
        yield
    finally:
        _local.loading = previous


def is_loading() -> bool:
    """Whether a saved delta is being rebuilt (its values come from the file, not from an init)."""
    return bool(getattr(_local, "loading", False))


def supplied(init: str, key: str) -> Any:
    """What the running hd.inits call gathered for site `key`; None while a saved delta loads."""
    if getattr(_local, "loading", False):
        return None
    held = getattr(_local, "data", None)
    if held is None or held[0] != init or key not in held[1]:
        raise ConfigError(
            f"LoRAConfig(init={init!r}) takes its first factors from data or weights: attach it "
            f"with hd.inits.{init}(model, config, ...), not hd.attach"
        )
    return held[1][key]


def _check(model: nn.Module, config: Any, init: str) -> list[str]:
    from .methods.lora import LoRAConfig
    from .modules import is_linear_like
    from .quantized import is_quantized

    if not isinstance(config, LoRAConfig) or config.init != init:
        raise ConfigError(f"hd.inits.{init} takes a LoRAConfig(init={init!r}), got {config!r}")
    if config.use_dora or config.target_parameters is not None or config.fused_slices is not None:
        raise ConfigError(
            f"hd.inits.{init} initialises plain LoRA on linear layers (no DoRA, fused slices or parameter targets)"
        )
    sites = config.select(model)
    for key in sites:
        module = model.get_submodule(key)
        if not is_linear_like(module):
            raise UnsupportedModuleError(
                f"hd.inits.{init} initialises LoRA on linear layers; {key!r} is a "
                f"{type(module).__name__}. Narrow the targets."
            )
        quantized = is_quantized(module)
        if init == "loftq" and not quantized:
            raise UnsupportedModuleError(
                f"hd.inits.loftq: {key!r} is not quantized; LoftQ starts a LoRA on a "
                "quantized base from its quantization error"
            )
        if init in ("lora_ga", "corda") and quantized:
            raise UnsupportedModuleError(
                f"hd.inits.{init}: {key!r} is quantized; it needs full-precision weights"
                + (" and gradients" if init == "lora_ga" else "")
            )
    return sites


def _attach(model: nn.Module, config: Any, init: str, data: dict[str, Any], name: str | None) -> Any:
    from .delta import attach

    with _supplying(init, data):
        return attach(model, config, name=name)


# -- LoRA-GA (Wang et al. 2024): the factors from the SVD of the full weights' gradient -----------


def lora_ga(
    model: nn.Module,
    config: Any,
    train_step: Callable[[], Any],
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    name: str | None = None,
) -> Any:
    """LoRA-GA: `train_step()` runs forward and backward on a few batches (PEFT's
    `preprocess_loraga`); the adapted layers' weight gradients, averaged over the backward passes,
    give the factors by PEFT's rule (`direction`, `scale`, `stable_gamma`: its LoraGAConfig)."""
    if direction not in DIRECTIONS or scale not in SCALES:
        raise ConfigError(
            f"hd.inits.lora_ga: direction must be one of {list(DIRECTIONS)} and scale one of "
            f"{list(SCALES)}, got {direction!r}, {scale!r}"
        )
    if isinstance(stable_gamma, bool) or not isinstance(stable_gamma, (int, float)) or not stable_gamma > 0:
        raise ConfigError(f"hd.inits.lora_ga: stable_gamma must be a positive number, got {stable_gamma!r}")
    sites = _check(model, config, "lora_ga")
    weights = {key: cast(torch.Tensor, model.get_submodule(key).weight) for key in sites}  # (linear layers)
    flags = {p: p.requires_grad for p in model.parameters()}
    counts = dict.fromkeys(sites, 0)
    handles = []
    was_training = model.training
    try:
        for p in flags:
            p.requires_grad_(False)
        for key, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_hook(lambda g, key=key: counts.__setitem__(key, counts[key] + 1)))
        model.train()
        with torch.enable_grad():
            train_step()
        grads = {}
        for key, w in weights.items():
            if not counts[key] or w.grad is None:
                raise ConfigError(
                    f"hd.inits.lora_ga: train_step() gave no gradient at {key!r}; it must run the "
                    "model forward and call backward()"
                )
            grads[key] = (w.grad.detach() / counts[key], direction, scale, float(stable_gamma))
    finally:
        for h in handles:
            h.remove()
        ours = {id(w) for w in weights.values()}
        for p, flag in flags.items():
            p.requires_grad_(flag)
            if id(p) in ours:
                p.grad = None
        model.train(was_training)
    return _attach(model, config, "lora_ga", grads, name)


def lora_ga_factors(
    data: Any, weight: torch.Tensor, r: int, s: float, conv1d: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's lora_ga_init, step for step (its randomized SVD draws from the global RNG)."""
    grad, direction, scale, gamma = data
    grad = grad.float()
    grad = grad.T if conv1d else grad  # [out, in]
    u, sv, v = torch.svd_lowrank(grad, q=min(4 * r, min(grad.shape)), niter=4)
    vh = v.t()
    u, sv, vh = u[:, : 2 * r], sv[: 2 * r], vh[: 2 * r]
    if direction == "ArBr":
        a, b, s_b = vh[1 : 2 * r : 2], u[:, 0 : 2 * r : 2], sv[0 : 2 * r : 2]
    elif direction == "A2rBr":
        a, b, s_b = vh[r : 2 * r], u[:, :r], sv[:r]
    elif direction == "ArB2r":
        a, b, s_b = vh[:r], u[:, r : 2 * r], sv[r : 2 * r]
    else:
        idx = torch.randperm(2 * r)[:r]
        a, b, s_b = vh[idx], u[:, idx], sv[idx]
    b = b @ torch.diag(s_b)
    if scale == "stable":  # (PEFT takes the stored weight's first dim: the input width for Conv1D)
        b = b * (weight.shape[0] ** 0.25) / (gamma**0.5)
    elif scale == "weight_svd":
        w = weight.detach().float()
        _, w_s, _ = torch.svd_lowrank(w.T if conv1d else w, q=r, niter=4)
        if s_b[0] > 0:
            b = b * (w_s[0] / s_b[0])
    elif scale == "gd_scale":
        a, b = a / s, b / s
    return a.to(dtype), b.to(dtype)


# -- CorDA (Yang et al. 2024): the SVD of W·C, C the inputs' covariance ---------------------------


def corda(
    model: nn.Module, config: Any, run_model: Callable[[], Any], *, method: str = "ipm", name: str | None = None
) -> Any:
    """CorDA: `run_model()` runs the model on calibration samples, one per call (PEFT's
    `preprocess_corda`); each adapted layer's input covariance C gives the SVD of W·C, whose top r
    triplets ("ipm", instruction-previewed) or bottom r ("kpm", knowledge-preserved) start the LoRA."""
    if method not in ("ipm", "kpm"):
        raise ConfigError(f"hd.inits.corda: method must be 'ipm' or 'kpm', got {method!r}")
    sites = _check(model, config, "corda")
    sums: dict[str, Any] = dict.fromkeys(sites, 0)
    counts = dict.fromkeys(sites, 0)

    def see(path: str, x: torch.Tensor) -> None:
        x = x.detach().squeeze(0).float()
        if x.dim() != 2:
            raise ConfigError(
                f"hd.inits.corda: {path!r} got an input of shape {tuple(x.shape)}; CorDA (as PEFT's) "
                "reads one sample per call: run_model must feed batches of one"
            )
        x = x / torch.max(x).abs()  # (PEFT's normalisation: by the largest value's magnitude)
        if not torch.isfinite(x).all():
            raise ConfigError(f"hd.inits.corda: a calibration input at {path!r} is not finite")
        sums[path] = sums[path] + x.t() @ x
        counts[path] += 1

    from .engine import watching_inputs

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), watching_inputs(model, sites, see):
            run_model()
    finally:
        model.train(was_training)
    missing = [k for k in sites if not counts[k]]
    if missing:
        raise ConfigError(f"hd.inits.corda: run_model() never reached {missing[:3]}")
    data = {k: (sums[k] / counts[k], method) for k in sites}
    return _attach(model, config, "corda", data, name)


def corda_factors(
    data: Any, weight: torch.Tensor, r: int, s: float, conv1d: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's collect_eigens_for_layer, crop and corda_init."""
    cov, method = data
    w = weight.detach().float()
    w = w.T if conv1d else w
    cov = cov.float()
    damp = 0.01
    eye = torch.eye(cov.shape[0], device=cov.device)
    while True:  # (PEFT's damping: doubled until the inverse is good)
        fixed = cov + eye * torch.mean(torch.diag(cov)) * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    u, sv, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inv).transpose(0, 1)
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    u, sv, v = u[:, keep], sv[keep] / s, v[:, keep]
    return v.t().mul(sv.sqrt().view(-1, 1)).to(dtype), u.mul(sv.sqrt()).to(dtype)


# -- LoftQ (Li et al. 2023): the factors carry the quantization error -----------------------------


def loftq(model: nn.Module, config: Any, weights: Any, *, name: str | None = None) -> Any:
    """LoftQ on a quantized base (PEFT's `replace_lora_weights_loftq`): `weights` holds the float
    weights the model was quantized from (a state dict, a safetensors file, or a model folder with
    model.safetensors or its sharded index); each layer's factors are the top-r SVD of W − Q."""
    sites = _check(model, config, "loftq")
    floats = _float_weights(model, weights, sites)
    return _attach(model, config, "loftq", floats, name)


def _float_weights(model: nn.Module, weights: Any, sites: list[str]) -> dict[str, torch.Tensor]:
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = {
        key: [f"{key}.weight"]
        + ([f"{key[len(prefix) + 1 :]}.weight"] if prefix and key.startswith(prefix + ".") else [])
        for key in sites
    }
    if isinstance(weights, dict):
        lookup: Callable[[str], torch.Tensor | None] = weights.get
    elif isinstance(weights, (str, os.PathLike)):
        lookup = _safetensors_lookup(os.fspath(weights))
    else:
        raise ConfigError(f"hd.inits.loftq: weights must be a state dict or a path, got {type(weights).__name__}")
    out = {}
    for key, candidates in names.items():
        found = next((t for t in (lookup(n) for n in candidates) if t is not None), None)
        if found is None:
            raise ConfigError(f"hd.inits.loftq: the float weights have no {candidates[0]!r}")
        out[key] = found
    return out


def _safetensors_lookup(path: str) -> Callable[[str], torch.Tensor | None]:
    from safetensors import safe_open

    files: dict[str, str] = {}
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            path = os.path.join(path, "model.safetensors")
    if not files:
        if not os.path.isfile(path):
            raise ConfigError(f"hd.inits.loftq: no safetensors weights at {path}")
        with safe_open(path, framework="pt") as f:
            files = {k: path for k in f.keys()}

    def lookup(name: str) -> torch.Tensor | None:
        if name not in files:
            return None
        with safe_open(files[name], framework="pt") as f:
            return f.get_tensor(name)

    return lookup


def loftq_factors(
    data: Any, quantized: torch.Tensor, r: int, s: float, conv1d: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's _loftq_init_new: L = U·√S, R = √S·Vh of W − Q; A = R, B = L / s."""
    w = data.float().to(quantized.device)
    q = quantized.detach().float()
    if w.shape != q.shape:
        w = w.T  # (a Conv1D checkpoint stores [in, out])
    if w.shape != q.shape:
        raise ConfigError(f"hd.inits.loftq: the float weight is {tuple(data.shape)}, the layer {tuple(q.shape)}")
    residual = w - q
    residual = residual.T if conv1d else residual
    u, sv, vh = torch.linalg.svd(residual, full_matrices=False)
    root = sv[:r].sqrt()
    return (root[:, None] * vh[:r]).to(dtype), (u[:, :r] * root / s).to(dtype)


# -- EVA (Paischer et al. 2024): A from the principal directions of each layer's inputs -----------


class _IncrementalPCA:
    """PEFT's IncrementalPCA (sklearn's, in torch) as EVA runs it: randomized SVD with q = 2k, four
    iterations and its own seed 42 (the global RNG is left alone), signs by the largest |Vt| entry."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.components: torch.Tensor | None = None  # (set with the rest by the first partial_fit)
        self.singular, self.seen = torch.tensor([0.0]), torch.tensor([0])
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.clone()
        n = x.shape[0]
        components = self.components
        if components is None:
            self.mean, self.var, self.seen = None, None, torch.tensor([0])
        mean, var, total = self._mean_var(x)
        if components is None or self.mean is None:  # (the first fit: both are None)
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            correction = torch.sqrt(self.seen.double() / total * n) * (self.mean - batch_mean)
            x = torch.vstack((self.singular.view(-1, 1) * components, x, correction))
        with torch.random.fork_rng():
            torch.manual_seed(42)
            _, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=4)
        vt = v.mH
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])
        vt = vt * signs.view(-1, 1)
        self.seen, self.mean, self.var = total, mean, var
        self.components, self.singular = vt[: self.k], s[: self.k]
        self.ratio = (s**2 / torch.sum(var * total))[: self.k]

    def _mean_var(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        new_count = torch.tensor([x.shape[0]])
        total = self.seen + new_count
        last_sum = torch.zeros(x.shape[1], dtype=torch.float64) if self.mean is None else self.mean * self.seen
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        t = x - new_sum / new_count
        correction = t.sum(dim=0, dtype=torch.float64).square()
        new_var = t.square().sum(dim=0, dtype=torch.float64) - correction / new_count
        if self.var is None:
            return mean, new_var / total, total
        ratio = self.seen.double() / new_count
        var = (self.var * self.seen + new_var + ratio / total * (last_sum / ratio - new_sum).square()) / total
        return mean, var, total


def eva(
    model: nn.Module,
    config: Any,
    batches: Any,
    *,
    rho: float = 2.0,
    tau: float = 0.99,
    whiten: bool = False,
    adjust_scaling_factors: bool = True,
    use_label_mask: bool = True,
    label_mask_value: int = -100,
    name: str | None = None,
) -> Any:
    """EVA (PEFT's `get_eva_state_dict` + `initialize_lora_eva_weights`): each adapted layer's
    inputs over `batches` (dicts of model inputs, cycled until every kept direction's cosine to its
    last estimate is at least `tau`) give A = their top principal directions, B = 0; the rank
    budget r·layers is redistributed by explained variance, each layer capped at round(r·rho)
    (layers that get no rank are left out; alpha follows the rank when adjust_scaling_factors).
    Padding (attention_mask) and, with use_label_mask, label_mask_value positions are skipped."""
    import dataclasses
    import itertools
    import re

    from .config import exact, pattern_value
    from .engine import watching_inputs

    for what, value, low in (("rho", rho, 1.0), ("tau", tau, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
            raise ConfigError(f"hd.inits.eva: {what} must be a number >= {low}, got {value!r}")
    batches = list(batches)
    if not batches or not all(isinstance(b, dict) and isinstance(b.get("input_ids"), torch.Tensor) for b in batches):
        raise ConfigError(
            "hd.inits.eva: batches must be a non-empty list of dicts of model inputs, each with "
            "input_ids (the attention_mask and labels say which positions count)"
        )
    sites = _check(model, config, "eva")
    ranks = {k: config.rank_for(k) for k in sites}
    budget = sum(ranks.values())
    cap = {k: round(r * rho) for k, r in ranks.items()}
    positions: list[Any] = [None]

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x[positions[0].T.unbind()].float()

    def select(inputs: dict[str, Any]) -> torch.Tensor:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        if use_label_mask and "labels" in inputs:
            mask = mask & (inputs["labels"] != label_mask_value)
        return mask.nonzero()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            seen: dict[str, torch.Tensor] = {}  # layers that read the same input share one PCA (q, k, v)
            positions[0] = select(batches[0])
            with watching_inputs(model, sites, lambda k, x: seen.setdefault(k, rows(x))):
                model(**batches[0])
            owner: dict[str, str] = {}
            for k in sites:
                owner[k] = next((o for o in dict.fromkeys(owner.values()) if torch.equal(seen[o], seen[k])), k)
            for group in {o for o in owner.values()}:
                members = [k for k in sites if owner[k] == group]
                top = max(cap[k] for k in members)
                for k in members:
                    cap[k] = top
            most = max(int(select(b).shape[0]) for b in batches)
            short = [k for k in sites if cap[k] > most]
            if short:  # (its PCA would wait forever for a batch with enough rows)
                raise ConfigError(
                    f"hd.inits.eva: {short[0]!r} needs batches of at least {cap[short[0]]} counted positions "
                    f"(rank x rho), but the largest batch has {most}; give longer or more rows per batch, or a "
                    "smaller rho"
                )
            pca = {k: _IncrementalPCA(cap[k]) for k in sites if owner[k] == k}
            converged = {k: torch.zeros(cap[k], dtype=torch.bool) for k in pca}
            done = dict.fromkeys(pca, False)
            dist = dict(cap)

            def see(k: str, x: torch.Tensor) -> None:
                if k not in pca or done[k]:
                    return
                states = rows(x)
                if states.shape[0] < cap[k]:
                    return
                before = pca[k].components
                pca[k].partial_fit(states)
                after = pca[k].components
                if before is not None and after is not None:
                    converged[k] = torch.nn.functional.cosine_similarity(after, before) >= tau

            with watching_inputs(model, list(pca), see):
                for inputs in itertools.cycle(batches):
                    for k in pca:  # (PEFT's bookkeeping: a layer stops, or starts again, by its current ranks)
                        done[k] = bool(torch.all(converged[k][: dist[k]]))
                    if all(done.values()):
                        break
                    positions[0] = select(inputs)
                    model(**inputs)
                    if all(p.components is not None for p in pca.values()):
                        dist = _distribute(pca, owner, sites, budget, cap)
    finally:
        model.train(was_training)
    directions: dict[str, torch.Tensor] = {}
    for k in sites:
        p, rank = pca[owner[k]], dist[k]
        if p.components is None:  # (cannot happen: the loop above ends once every PCA is fitted)
            raise ConfigError(f"hd.inits.eva: no inputs reached {k!r}")
        u = p.components[:rank]
        if whiten:
            u = u / p.singular[:rank].sqrt().reshape(-1, 1)
        directions[k] = u
    kept = [k for k in sites if dist[k] > 0]
    if not kept:
        raise ConfigError("hd.inits.eva gave every layer rank 0")
    alphas = {
        k: pattern_value(config.alpha_pattern, k, config.alpha) * (dist[k] / ranks[k] if adjust_scaling_factors else 1)
        for k in kept
    }
    fitted = dataclasses.replace(
        config,
        targets=[exact(k) for k in kept],
        exclude=None,
        layers=None,
        rank_pattern={re.escape(k): dist[k] for k in kept if dist[k] != config.r} or None,
        alpha_pattern={re.escape(k): a for k, a in alphas.items() if a != config.alpha} or None,
    )
    return _attach(model, fitted, "eva", directions, name)


def _distribute(
    pca: dict[str, Any], owner: dict[str, str], sites: list[str], budget: int, cap: dict[str, int]
) -> dict[str, int]:
    """PEFT's _get_rank_distribution: the budget goes to the largest explained-variance ratios."""
    from collections import Counter

    keys, values = zip(*[(k, c) for k in sites for c in pca[owner[k]].ratio[: cap[k]]], strict=True)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    dist = {k: counts.get(k, 0) for k in sites}
    for k in sites:  # a layer that shares another's PCA never has more rank than its owner
        if owner[k] != k and dist[owner[k]] < dist[k]:
            dist[owner[k]], dist[k] = dist[k], dist[owner[k]]
    return dist
