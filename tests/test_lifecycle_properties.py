"""Property test: any sequence of lifecycle calls keeps the model either correctly adapted or
exactly as it was, and ends bit-identical to the original.

Steps: attach (LoRA, BitFit, IA3 or a bottleneck adapter, random layers), detach, enable /
disable, merge / unmerge (refusals must change nothing), save + reload, `with` blocks
(nested, with and without an exception inside), `model.to(float64)` and back,
`copy.deepcopy`, and the user's own forward hooks registered and removed at random layers.
After every step the output equals a reference computed by hand from the untouched base
weights, the deltas' tensors and the user's hooks, run in the order they were added.

A second machine runs the same steps on the model offloaded by accelerate (weights on meta,
copied in per call): merges are refused there, everything else must hold.

CI runs a fixed-seed search (HOOKDELTA_PROPERTY_EXAMPLES, default 200) and a random-seed one.
"""

import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn
from helpers import assert_restored, perturb, same_bits, snapshot
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from internals import forward_hooks, forward_pre_hooks

import hookdelta as hd
from hookdelta.engine import is_ours
from hookdelta.methods.adapter import ACTIVATIONS

accelerate = pytest.importorskip("accelerate")

pytestmark = [
    pytest.mark.lora,
    pytest.mark.bitfit,
    pytest.mark.ia3,
    pytest.mark.adapter,
    pytest.mark.loha,
    pytest.mark.lokr,
    pytest.mark.vera,
    pytest.mark.oft,
    pytest.mark.boft,
    pytest.mark.fourierft,
    pytest.mark.delora,
    pytest.mark.gralora,
    pytest.mark.miss,
    pytest.mark.c3a,
    pytest.mark.shira,
    pytest.mark.vblora,
    pytest.mark.randlora,
    pytest.mark.adalora,
]

LAYERS = ["a", "b", "c"]
# (BOFT is left out: its output scale sets the layer's current bias aside, so the reference would
# have to track which bias deltas were merged before it; tests/test_peft_methods.py covers it)
METHODS = ["lora", "bitfit", "ia3", "adapter", "loha", "lokr", "vera", "oft", "pissa"]
# PEFT's catalogue (issue 28), in a machine of their own (CatalogueLifecycle) beside the first ones
CATALOGUE = ["fourierft", "delora", "gralora", "miss", "c3a", "shira", "vblora", "randlora", "adalora"]
EXAMPLES = int(os.environ.get("HOOKDELTA_PROPERTY_EXAMPLES", "200"))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def config(method, layers, r):
    if method == "lora":
        return hd.LoRAConfig(r=r, alpha=2.0, targets=layers)
    if method == "bitfit":
        return hd.BitFitConfig(targets=layers)
    if method == "ia3":
        return hd.IA3Config(targets=layers)
    if method == "loha":
        return hd.LoHaConfig(r=r, alpha=3.0, targets=layers)
    if method == "lokr":
        return hd.LoKrConfig(r=r, alpha=3.0, targets=layers)
    if method == "vera":
        return hd.VeRAConfig(r=r + 2, targets=layers)
    if method == "oft":
        return hd.OFTConfig(oft_block_size=2, use_cayley_neumann=False, targets=layers)
    if method == "boft":
        return hd.BOFTConfig(boft_block_size=2, targets=layers)
    if method == "pissa":  # LoRA started from the weight's SVD, its principal part a frozen residual
        return hd.LoRAConfig(r=r, alpha=2.0, targets=layers, init="pissa")
    if method == "fourierft":
        return hd.FourierFTConfig(n_frequency=4 * r, scaling=3.0, targets=layers)
    if method == "delora":
        return hd.DeLoRAConfig(r=r, delora_lambda=2.0, targets=layers)
    if method == "gralora":
        return hd.GraLoRAConfig(r=2 * r, gralora_k=2, alpha=3.0, targets=layers)
    if method == "miss":
        return hd.MiSSConfig(r=r + 1, targets=layers)
    if method == "c3a":
        return hd.C3AConfig(block_size=2, targets=layers)
    if method == "shira":
        return hd.SHiRAConfig(r=1, random_seed=r, targets=layers)
    if method == "vblora":
        return hd.VBLoRAConfig(r=r, vector_length=2, num_vectors=4, targets=layers)
    if method == "randlora":
        return hd.RandLoRAConfig(r=r, randlora_alpha=2.0, targets=layers)
    if method == "adalora":
        return hd.AdaLoRAConfig(init_r=r, target_r=1, alpha=2.0, targets=layers)
    return hd.AdapterConfig(targets=layers, bottleneck_dim=r, non_linearity="tanh")


def weight_change(d, piece, p):
    """ΔW [out, in] of the additive weight methods, by hand from the piece's tensors (float64)."""
    m = d.method
    if m == "fourierft":  # Re(IFFT2) of the spectrum placed at the seed's frequencies, times scaling
        out, inp = piece.shape
        dense = torch.zeros(out, inp, dtype=torch.complex128)
        for k, (i, j) in enumerate(piece.indices.T.tolist()):
            dense[i, j] = p["fourierft_spectrum"][k]
        return torch.fft.ifft2(dense).real * piece.scale
    if m == "delora":  # Σₖ λ/r · bₖaₖᵀ / (‖aₖ‖‖bₖ‖), columns scaled by the base's column norms
        a, b, lam = p["delora_A"], p["delora_B"], p["delora_lambda"]
        dw = sum(
            lam
            / a.shape[0]
            * torch.outer(b[:, k], a[k])
            / (a[k].norm().clamp(min=1e-4) * b[:, k].norm().clamp(min=1e-4))
            for k in range(a.shape[0])
        )
        return dw * piece.delora_w_norm.double()
    if m == "gralora":  # block (input n, output c): A[n][:, c-th rank group] @ B[c][n-th rank group]
        a, b, k = p["gralora_A"], p["gralora_B"], piece.k
        s_, ins, outs = a.shape[2] // k, a.shape[1], b.shape[2]
        dw = torch.zeros(k * outs, k * ins, dtype=a.dtype)
        for n in range(k):
            for c in range(k):
                block = a[n][:, c * s_ : (c + 1) * s_] @ b[c][n * s_ : (n + 1) * s_]
                dw[c * outs : (c + 1) * outs, n * ins : (n + 1) * ins] = block.T
        return dw * piece.scale
    if m == "miss":  # ΔW[o, i] = block[i mod r, o]
        block = p["miss_block"]
        inp = piece.shape[1]
        return torch.stack([block[i % block.shape[0]] for i in range(inp)], dim=1)
    if m == "c3a":  # block-circulant, ΔW[m·b+q, n·b+j] = kernel[m, n, (j − q) mod b] / in
        kern = p["c3a_kernel"]
        mm, nn_, b = kern.shape
        dw = torch.zeros(mm * b, nn_ * b, dtype=kern.dtype)
        for i in range(mm * b):
            for j in range(nn_ * b):
                dw[i, j] = kern[i // b, j // b, (j % b - i % b) % b]
        return dw / (nn_ * b)
    if m == "shira":  # the values at the seed's entries
        out, inp = piece.shape
        dw = torch.zeros(out * inp, dtype=torch.float64)
        dw[piece.flat] = p["shira_weight"]
        return dw.view(out, inp)
    if m == "vblora":  # each length-L piece: softmax over its top-k logits of the bank's vectors
        bank = d.pieces["vblora_vector_bank"].bank.detach().double()

        def mix(logits):
            top, idx = logits.topk(piece.topk, dim=-1)
            return (torch.softmax(top, -1)[..., None] * bank[idx]).sum(-2)

        a = mix(p["vblora_logits_A"]).reshape(piece.r, -1)
        b = mix(p["vblora_logits_B"]).transpose(1, 2).reshape(-1, piece.r)
        return b @ a
    if m == "randlora":  # PEFT's: scaled bases λ ⊙ A ⊙ γ against the shared B, in PEFT's index order
        bases = d.pieces["randlora_bases"]
        small, big, n = min(piece.in_f, piece.out_f), max(piece.in_f, piece.out_f), piece.n_bases
        scaled = (
            p["randlora_lambda"][:, :, None] * bases.randlora_A.double()[:, :n, :small] * p["randlora_gamma"][None]
        ).flatten(end_dim=1)
        up = bases.randlora_B.double()[:big, :n, :].flatten(start_dim=1)
        dw = up @ scaled if small == piece.in_f else (scaled.T @ up.T)
        return dw * piece.scale
    # adalora: s·B·diag(E)·A
    return piece.scale * p["lora_B"] @ (p["lora_A"] * p["lora_E"])


WEIGHT_METHODS = tuple(CATALOGUE)


def user_scale(module, args, output):
    """A user's forward hook that does not commute with the deltas."""
    return output * 1.5 + 0.25


def user_clamp(module, args, output):
    return output.clamp(-0.3, 0.3)


USER_HOOKS = {"scale": user_scale, "clamp": user_clamp}


def reference(model, base, x, hooks=(), only=None):
    """The output by hand: each layer computes W0·x + b0 from the original weights, then each
    enabled delta (merged or not; with `only`, just those named) and each user hook there, in
    the order they were added (a delta counts from its attach): LoRA adds s·B·A·x, BitFit adds
    its bias, IA3 multiplies by l, an adapter adds s·up(f(down(h))), LoHa and LoKr add their ΔW·x,
    OFT and BOFT rotate the input (x -> x·R, R block-diagonal Cayley) before all of them, BOFT
    also scales the output (bias aside) at its turn, PiSSA is a LoRA minus its frozen initial
    factors, a user hook is its function."""
    h = x.to(base["a.weight"].dtype)
    for i, name in enumerate(LAYERS):
        inp = h
        # OFT rotates the layer's input in a pre-hook: the layer, every post piece and every user
        # hook there see the rotated input (in attach order when several rotate)
        rotations = sorted(
            (d.pieces[name].stamp, d)
            for d in hd.deltas(model).values()
            if d.enabled and d.method in ("oft", "boft") and name in d.pieces and (only is None or d.name in only)
        )
        eye = torch.eye(2, dtype=h.dtype)
        for _, d in rotations:  # 2×2 Cayley blocks (I − Q)(I + Q)⁻¹, Q = [[0, v], [−v, 0]]
            if d.method == "oft":
                vs = d.pieces[name].oft_R.detach().to(h.dtype)[:, 0].tolist()
            else:  # BOFT's Q is the skew part of a trained 2×2 matrix: v = (m01 − m10) / 2
                m = d.pieces[name].boft_R.detach().to(h.dtype)[0]
                vs = (0.5 * (m[:, 0, 1] - m[:, 1, 0])).tolist()
            skew = [torch.tensor([[0.0, v], [-v, 0.0]], dtype=h.dtype) for v in vs]
            inp = inp @ torch.block_diag(*[torch.linalg.solve(eye + k, eye - k, left=False) for k in skew])
        h = inp @ base[f"{name}.weight"].T + base[f"{name}.bias"]
        steps = [
            (d.pieces[name].stamp, d)
            for d in hd.deltas(model).values()
            if d.enabled and d.method != "oft" and name in d.pieces and (only is None or d.name in only)
        ]
        steps += [(key, fn) for key, layer, fn in hooks if layer == name]
        for _, d in sorted(steps, key=lambda step: step[0]):
            if not isinstance(d, hd.Delta):
                h = d(None, (inp,), h)
                continue
            p = {k: t.detach().to(h.dtype) for k, t in d.pieces[name].named_parameters()}
            if d.method == "lora":
                h = h + d.pieces[name].scale * inp @ p["lora_A"].T @ p["lora_B"].T
                if getattr(d.pieces[name], "residual", False):  # PiSSA: minus the frozen initial factors
                    a0, b0 = d.pieces[name].base_A.double(), d.pieces[name].base_B.double()
                    h = h - d.pieces[name].scale * inp @ a0.T @ b0.T
            elif d.method == "boft":  # the output scale, bias aside (the rotation was applied above)
                bias = base[f"{name}.bias"]
                h = (h - bias) * p["boft_s"].reshape(-1) + bias
            elif d.method == "bitfit":
                h = h + p["bias"]
            elif d.method == "ia3":
                h = h * p["ia3_l"]
            elif d.method == "loha":  # s·(W1a·W1b ⊙ W2a·W2b)·x
                dw = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
                h = h + d.pieces[name].scale * inp @ dw.T
            elif d.method == "lokr":  # s·(W1 ⊗ W2)·x, W1 or W2 low-rank where the rank is small
                w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
                w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
                h = h + d.pieces[name].scale * inp @ torch.kron(w1, w2).T
            elif d.method in WEIGHT_METHODS:
                h = h + inp @ weight_change(d, d.pieces[name], p).T
            elif d.method == "vera":  # b ⊙ B(d ⊙ A x), A and B the frozen shared projections
                a, b = (d.pieces[name].vera_A.double(), d.pieces[name].vera_B.double())
                h = h + p["vera_lambda_b"] * ((p["vera_lambda_d"] * (inp @ a.T)) @ b.T)
            else:
                f = ACTIVATIONS[d.pieces[name].non_linearity]
                h = h + d.pieces[name].scale * (
                    f(h @ p["down.weight"].T + p["down.bias"]) @ p["up.weight"].T + p["up.bias"]
                )
        if i < 2:
            h = torch.tanh(h)
    return h


def state(model):
    """What must not move when a call is refused: every tensor of the model, bit for bit,
    and each delta's flags."""
    tensors = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    tensors.update({n: t.detach().clone() for n, t in model.named_parameters() if "_hookdelta" in n})
    flags = {n: (d.enabled, d.merged) for n, d in hd.deltas(model).items()}
    return tensors, flags


def assert_state(model, before):
    tensors, flags = state(model)
    assert flags == before[1]
    assert tensors.keys() == before[0].keys() and all(same_bits(tensors[k], before[0][k]) for k in tensors)


class Boom(Exception):
    pass


class Lifecycle(RuleBasedStateMachine):
    offloaded = False

    def __init__(self):
        super().__init__()
        self.model = MLP()
        self.base = {k: v.double() for k, v in self.model.state_dict().items()}
        if self.offloaded:
            accelerate.cpu_offload(self.model, execution_device=torch.device("cpu"))
        self.snap = snapshot(self.model)
        self.x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
        self.count = 0
        self.hooks: list[tuple[int, str, object, object]] = []  # (key, layer, function, handle) of user hooks
        self.hooked: dict[str, int] = {}  # layer -> user hooks ever registered there

    def names(self):
        return list(hd.deltas(self.model))

    def new(self, method, layers, r):
        """A new perturbed delta, or None where it would go beside another's merged input rewrite
        (OFT): refused, with nothing changed."""
        self.count += 1
        before = state(self.model)
        try:
            d = hd.attach(self.model, config(method, layers, r), name=f"d{self.count}")
        except hd.UnsupportedModuleError as exc:
            assert "rewrites the input" in str(exc)
            assert any(
                p.rewrites_input for dd in hd.deltas(self.model).values() for p in dd.pieces.values() if p.key in layers
            )
            assert_state(self.model, before)
            return None
        perturb(d, std=0.3, seed=self.count)
        return d

    def pick(self, data):
        return hd.deltas(self.model)[data.draw(st.sampled_from(self.names()))]

    def check(self, model=None):
        model = model or self.model
        hooks = [(k, layer, fn) for k, layer, fn, _ in self.hooks]
        with torch.no_grad():
            out = model(self.x.to(model.a.bias.dtype))  # (float64 inside dtype_round_trip)
            torch.testing.assert_close(out.double(), reference(model, self.base, self.x, hooks), rtol=1e-4, atol=1e-5)

    def hook_ahead(self, d):
        """Whether a user hook was registered before the delta at one of its layers (it must then
        refuse to merge: the hook would see the merged delta). Not for input rewrites (OFT): an
        earlier hook sees their effect on the output merged or not."""
        return any(
            layer in d.pieces and key < d.pieces[layer].stamp and not d.pieces[layer].rewrites_input
            for key, layer, _, _ in self.hooks
        )

    @rule(data=st.data(), kind=st.sampled_from(sorted(USER_HOOKS)))
    def user_hook(self, data, kind):
        # mostly where a delta is: there the order matters
        busy = sorted({n for d in hd.deltas(self.model).values() for n in LAYERS if n in d.pieces})
        layer = data.draw(st.sampled_from(busy or LAYERS))
        handle = getattr(self.model, layer).register_forward_hook(USER_HOOKS[kind])
        self.hooks.append((handle.id, layer, USER_HOOKS[kind], handle))
        self.hooked[layer] = self.hooked.get(layer, 0) + 1

    @precondition(lambda self: self.hooks)
    @rule(data=st.data())
    def remove_user_hook(self, data):
        entry = data.draw(st.sampled_from(self.hooks))
        entry[3].remove()
        self.hooks.remove(entry)

    @rule(
        method=st.sampled_from(METHODS),
        layers=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True),
        r=st.integers(1, 3),
    )
    def attach(self, method, layers, r):
        self.new(method, layers, r)

    def detached(self, d):
        """Detach `d`; False where it is merged under a later, non-commuting merge (then unmerging
        it is refused, and nothing changed)."""
        before = state(self.model)
        try:
            d.detach()
        except hd.MergeError:
            assert_state(self.model, before)
            return False
        return True

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def detach(self, data):
        d = self.pick(data)
        if not self.detached(d):
            return
        with pytest.raises(hd.DeltaStateError):  # a detached delta refuses everything
            d.enable()

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def toggle(self, data):
        d = self.pick(data)
        if d.merged:
            before = state(self.model)
            with pytest.raises(hd.DeltaStateError):
                d.disable()
            assert_state(self.model, before)
        elif d.enabled:
            d.disable()
        else:
            d.enable()

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def merge_or_unmerge(self, data):
        d = self.pick(data)
        if d.merged:
            before = state(self.model)
            try:
                d.unmerge()
            except hd.MergeError:  # a later, non-commuting delta is merged at the same layer
                assert_state(self.model, before)
                assert len(self.names()) > 1
            return
        before = state(self.model)
        try:
            d.merge()
        except (hd.MergeError, hd.DeltaStateError):  # not mergeable, disabled, would not commute, offloaded
            assert_state(self.model, before)
            assert (
                not d.enabled or d.method == "adapter" or len(self.names()) > 1 or self.hook_ahead(d) or self.offloaded
            )
        else:
            assert not self.offloaded and not self.hook_ahead(d)

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def save_and_reload(self, data):
        d = self.pick(data)
        directory = tempfile.mkdtemp(dir=self.tmp)  # one per save: examples share the test's tmp_path
        d.save(directory)
        name = d.name
        if not self.detached(d):
            return
        try:
            loaded = hd.load(self.model, directory)
        except hd.UnsupportedModuleError as exc:  # it would now go beside another delta's merged input rewrite
            assert "rewrites the input" in str(exc)
            return
        assert loaded.name == name and not loaded.merged and loaded.enabled

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def route_block(self, data):
        """Each row of the batch through its own delta (or none), some deltas kept for every row:
        each row equals the reference with only its delta and the kept ones; inside the block
        lifecycle changes are refused; nothing changes."""
        found = hd.deltas(self.model)
        live = [n for n, d in found.items() if d.enabled and not d.merged]
        merged = [n for n, d in found.items() if d.merged]
        keep = data.draw(st.lists(st.sampled_from(live), unique=True, max_size=2)) if live else []
        keep += merged if data.draw(st.booleans()) else []
        rows = data.draw(st.lists(st.sampled_from([n for n in live if n not in keep] + [None]), min_size=5, max_size=5))
        before = state(self.model)
        hooks = [(k, layer, fn) for k, layer, fn, _ in self.hooks]
        try:
            with hd.route(self.model, rows, keep=keep):
                with torch.no_grad():
                    got = self.model(self.x)
                with pytest.raises(hd.DeltaStateError, match="inside hd.route"):
                    self.pick(data).disable()
        except hd.DeltaStateError as e:
            assert "merged into the weights" in str(e) and set(merged) - set(keep)
            assert_state(self.model, before)
            return
        assert_state(self.model, before)
        for j, name in enumerate(rows):
            want = reference(self.model, self.base, self.x, hooks, only={name, *keep})[j]
            torch.testing.assert_close(got[j].double(), want, rtol=1e-4, atol=1e-5)

    @precondition(lambda self: any(d.method == "lora" for d in hd.deltas(self.model).values()))
    @rule(data=st.data(), how=st.sampled_from(["cat", "linear"]))
    def combine(self, data, how):
        """A weighted combination of LoRA deltas: with `cat` (or `linear` of one delta) each layer's
        update is exactly sum(w·s·B·A) of the sources; deltas on other layers are refused."""
        loras = [n for n, d in hd.deltas(self.model).items() if d.method == "lora"]
        chosen = data.draw(
            st.lists(st.sampled_from(loras), min_size=1, max_size=1 if how == "linear" else 3, unique=True)
        )
        weights = {n: data.draw(st.floats(-1.5, 1.5, allow_nan=False)) for n in chosen}
        sources = [hd.deltas(self.model)[n] for n in chosen]
        before = state(self.model)
        self.count += 1
        try:
            new = hd.combine(self.model, weights, how=how, name=f"d{self.count}")
        except hd.ConfigError as e:
            assert "same layers" in str(e) and len({tuple(sorted(d.pieces)) for d in sources}) > 1
            assert_state(self.model, before)
            return
        except hd.UnsupportedModuleError as e:  # the new delta would go on top of an input rewrite, or
            # a source's update is more than s·B·A (PiSSA: s·(B·A − B₀·A₀)), which combining B and A would lose
            assert "rewrites the input" in str(e) or (
                "PiSSA" in str(e) and any(d.config.init == "pissa" for d in sources)
            )
            assert_state(self.model, before)
            return
        for piece in new.pieces.values():
            got = piece.scale * piece.lora_B.detach().double() @ piece.lora_A.detach().double()
            want = sum(
                weights[d.name]
                * d.piece(piece.key).scale
                * d.piece(piece.key).lora_B.detach().double()
                @ d.piece(piece.key).lora_A.detach().double()
                for d in sources
            )
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    @rule(
        method=st.sampled_from(METHODS),
        layers=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=2, unique=True),
        nested=st.sampled_from(["none", "attach", "disabled"]),
        fail=st.sampled_from(["no", "inner", "outer"]),
    )
    def with_block(self, method, layers, nested, fail):
        before = state(self.model)
        with torch.no_grad():
            out = self.model(self.x)
        try:
            outer = self.new(method, layers, 2)
            if outer is None:
                return
            with outer:
                self.check()
                inner = self.new("lora", layers[:1], 1) if nested == "attach" else None
                if inner is not None:
                    with inner:
                        self.check()
                        if fail == "inner":
                            raise Boom
                elif nested == "disabled":
                    first = next(d for d in hd.deltas(self.model).values() if not d.merged)
                    with first.disabled():
                        self.check()
                        if fail == "inner":
                            raise Boom
                self.check()
                if fail == "outer":
                    raise Boom
        except Boom:
            pass
        assert_state(self.model, before)
        with torch.no_grad():
            assert same_bits(self.model(self.x), out)

    @precondition(lambda self: not self.offloaded)  # accelerate's weight map stays float32
    @rule()
    def dtype_round_trip(self):
        before = state(self.model)
        self.model.double()
        self.check()
        self.model.float()
        assert_state(self.model, before)
        # .double()/.float() give the parameters new storage (torch's doing): track the new addresses
        self.snap["ptrs"] = {
            n: p.data_ptr() for n, p in self.model.named_parameters(remove_duplicate=False) if n in self.snap["ptrs"]
        }

    @precondition(lambda self: not self.offloaded)
    @rule()
    def deepcopy(self):
        clone = copy.deepcopy(self.model)
        with torch.no_grad():
            assert same_bits(clone(self.x), self.model(self.x))
        before = state(self.model)
        for d in list(hd.deltas(clone).values())[::-1]:  # tearing the copy down leaves the model alone
            d.detach()
        assert hd.deltas(clone) == {} and not any(
            is_ours(h) for m in clone.modules() for h in [*forward_hooks(m).values(), *forward_pre_hooks(m).values()]
        )
        base = clone.state_dict()
        assert all(same_bits(base[k], self.snap["params"][k]) for k in self.snap["params"])
        assert {n: p.requires_grad for n, p in clone.named_parameters()} == self.snap["flags"]
        assert_state(self.model, before)

    @invariant()
    def output_matches_reference(self):
        self.check()

    @invariant()
    def keys_and_hooks(self):
        assert list(self.model.state_dict()) == self.snap["keys"]
        for name in LAYERS:
            layer = getattr(self.model, name)
            live = [d for d in hd.deltas(self.model).values() if d.enabled and not d.merged and name in d.pieces]
            pre = [d for d in live if d.method in ("oft", "boft")]  # they rotate the input in a pre hook
            live = [d for d in live if d.method != "oft"]
            ours = sum(1 for h in forward_hooks(layer).values() if is_ours(h))
            if not self.hooked.get(name):
                assert ours == (1 if live else 0), "one dispatcher, only where a live delta is"
            else:  # one more per user hook it ran on either side of, at most (until the next change there)
                assert (ours > 0) == bool(live) and ours <= 1 + self.hooked[name]
            ours_pre = sum(1 for h in forward_pre_hooks(layer).values() if is_ours(h))
            assert len(forward_pre_hooks(layer)) == ours_pre and (ours_pre > 0) == bool(pre)
            assert ours_pre <= 1 + self.hooked.get(name, 0)  # split around user hooks as the post side is

    def teardown(self):
        for d in list(hd.deltas(self.model).values())[::-1]:
            d.detach()
        for entry in self.hooks:
            entry[3].remove()
        assert_restored(self.model, self.snap)


class OffloadedLifecycle(Lifecycle):
    offloaded = True


class CatalogueLifecycle(Lifecycle):
    """The same machine, also attaching the catalogue's additive weight methods."""

    @rule(
        method=st.sampled_from(CATALOGUE),
        layers=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True),
        r=st.integers(1, 3),
    )
    def attach_catalogue(self, method, layers, r):
        self.new(method, layers, r)


SETTINGS = dict(stateful_step_count=15, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def _tmp_for_machine(tmp_path):
    Lifecycle.tmp = tmp_path


def test_lifecycle_fixed_seed():
    run_state_machine_as_test(Lifecycle, settings=settings(max_examples=EXAMPLES, derandomize=True, **SETTINGS))


def test_lifecycle_random_seed():
    run_state_machine_as_test(Lifecycle, settings=settings(max_examples=max(20, EXAMPLES // 4), **SETTINGS))


def test_lifecycle_with_the_catalogue_methods():
    run_state_machine_as_test(
        CatalogueLifecycle, settings=settings(max_examples=max(20, EXAMPLES // 2), derandomize=True, **SETTINGS)
    )


def test_lifecycle_on_an_offloaded_model():
    run_state_machine_as_test(
        OffloadedLifecycle, settings=settings(max_examples=max(20, EXAMPLES // 4), derandomize=True, **SETTINGS)
    )


# -- the test can fail: planted bugs it must catch ------------------------------------------


def _skip_flag_restore(monkeypatch):
    from hookdelta.store import DeltaStore

    monkeypatch.setattr(DeltaStore, "unfreeze", lambda self, model, name: self.freezers.remove(name))


def _ia3_merge_forgets_bias(monkeypatch):
    from hookdelta.methods.ia3 import Rescale

    original = Rescale.merged_weights
    monkeypatch.setattr(Rescale, "merged_weights", lambda self, module: {"weight": original(self, module)["weight"]})


def _disable_keeps_hooks(monkeypatch):
    from hookdelta.engine import Site

    original = Site.refresh
    monkeypatch.setattr(Site, "refresh", lambda self: original(self) if any(p.live for p in self.pieces) else None)


def _hooks_go_back_at_the_end(monkeypatch):
    from hookdelta.engine import Site

    monkeypatch.setattr(Site, "_place", lambda self: None)


def _merge_ignores_user_hooks(monkeypatch):
    from hookdelta.engine import Site

    monkeypatch.setattr(Site, "foreign_clash", lambda self, piece: None)


@pytest.mark.parametrize(
    "plant",
    [
        _skip_flag_restore,
        _ia3_merge_forgets_bias,
        _disable_keeps_hooks,
        _hooks_go_back_at_the_end,
        _merge_ignores_user_hooks,
    ],
)
def test_the_machine_catches_a_planted_bug(plant, monkeypatch):
    plant(monkeypatch)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            Lifecycle,
            settings=settings(
                max_examples=300,
                derandomize=True,
                phases=[Phase.generate],
                report_multiple_bugs=False,
                **{**SETTINGS, "stateful_step_count": 25},
            ),
        )
