"""Glue shared by the trainer integrations: lazy imports, flow/policy checks, padded-batch alignment,
and the online flow-matching update.

Nothing here imports trl or verl. The maths lives in the core API (`flow_reward`,
`latent_flow_loss`, `flow_pairs`, `shape_advantages`); this module only lines
up padded trainer batches with it.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import _checks
from ..checkpoint import load_flow_field
from ..config import FlowConfig
from ..field import VelocityField
from ..flow import flow_matching_loss
from ..latents import pair_index, selected_pairs
from ..tap import find_decoder_layers

FlowLike = Union[VelocityField, str, os.PathLike]
FLOW_OPTIMIZER_NAME = "flow_optimizer.pt"
FLOW_GENERATOR_NAME = "flow_generator_{rank}.pt"  # one per process: the flow's noise generator


def require(module: str, extra: str):
    """Import `module`, or raise an ImportError that says which flowkern extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"flowkern.integrations.{extra} needs the '{module}' package, which could not be "
                          f"imported ({exc}); install it with: pip install flowkern[{extra}]") from exc


def resolve_flow(flow: FlowLike, flow_config: Optional[FlowConfig], *, arg: str = "flow",
                 config_arg: str = "flow_config") -> tuple[VelocityField, FlowConfig]:
    """The (field, config) pair for an integration, from a `VelocityField` or a checkpoint path.

    A flowkern checkpoint carries its `FlowConfig`; an explicit `flow_config` wins over it.
    An official ``flow_model.bin`` or a bare `VelocityField` has none, so `flow_config` is then required.
    """
    if flow is None:
        raise TypeError(f"{arg} is required: pass a flowkern.VelocityField or the path of a flow checkpoint")
    source_config = None
    if isinstance(flow, (str, os.PathLike)):
        field, source_config = load_flow_field(flow)
        where = f"the checkpoint at {os.fspath(flow)}"
    elif isinstance(flow, VelocityField):
        field, where = flow, "a VelocityField"
    else:
        raise TypeError(f"{arg} must be a flowkern.VelocityField or a checkpoint path, got {type(flow).__name__}")
    config = flow_config if flow_config is not None else source_config
    if config is None:
        raise ValueError(f"{config_arg} is missing: {where} carries no FlowConfig, so pass "
                         f"{config_arg}=flowkern.FlowConfig(...) with the settings the flow was trained with")
    if not isinstance(config, FlowConfig):
        raise TypeError(f"{config_arg} must be a flowkern.FlowConfig, got {type(config).__name__}")
    if config.depth != field.depth:
        raise ValueError(f"{config_arg}.depth ({config.depth}) differs from the depth of {arg} ({field.depth})")
    warn_if_untrained(field, arg)
    return field, config


def warn_if_untrained(field: VelocityField, arg: str = "flow") -> bool:
    """Warn (and return True) when the field's output layer is all zero, i.e. v ≡ 0: an untrained flow."""
    out = field.final_layer.linear
    if bool(out.weight.any()) or bool(out.bias.any()):
        return False
    warnings.warn(f"{arg}: the VelocityField's output layer is all zero, so v ≡ 0 and the flow 'deviation' only ranks "
                  f"tokens by latent norm plus noise. Start from a pretrained flow: run `flowkern-pretrain --model "
                  f"DIR --data FILE --out DIR` and pass flow='DIR', or load a released flow_model.bin.",
                  UserWarning, stacklevel=3)
    return True


def unwrap_module(module: nn.Module) -> nn.Module:
    """Peel DDP / FSDP1 / DeepSpeed / torch.compile wrappers off a model (FSDP2 modules are already bare)."""
    while True:
        attr = _WRAPPERS.get(type(module).__name__)
        inner = getattr(module, attr, None) if attr else None
        if not isinstance(inner, nn.Module):
            return module
        module = inner


# Wrapper class name -> the attribute holding the wrapped model.
_WRAPPERS = {
    "DistributedDataParallel": "module",
    "DataParallel": "module",
    "DeepSpeedEngine": "module",
    "PipelineEngine": "module",
    "FullyShardedDataParallel": "_fsdp_wrapped_module",
    "OptimizedModule": "_orig_mod",
}


def policy_hidden_size(model: nn.Module) -> int:
    """The hidden size D of an HF causal LM (the text tower's, for multimodal models)."""
    config = getattr(unwrap_module(model), "config", None)
    if config is None:
        raise ValueError(f"cannot read the hidden size of {type(model).__name__}: it has no HF `config`")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if not isinstance(size, int):
        raise ValueError(f"cannot read the hidden size of {type(model).__name__} from its config")
    return size


def check_flow_fits_policy(field: VelocityField, model: nn.Module, *, arg: str = "flow") -> None:
    """The flow's dim must equal the policy's hidden size."""
    hidden = policy_hidden_size(model)
    if field.dim != hidden:
        raise ValueError(f"{arg} has dim {field.dim} but the policy's hidden size is {hidden}: the flow must be "
                         f"trained on this policy's latents")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder layers of `model`, also when each layer is wrapped by FSDP1 or activation checkpointing."""
    base = unwrap_module(model)
    try:
        return find_decoder_layers(base)
    except ValueError:
        pass
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if name.split(".")[-1] not in ("layers", "h") or any(t in name.lower() for t in ("vision", "visual", "audio")):
            continue
        inner = module[0]
        for attr in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "module"):
            inner = getattr(inner, attr, inner)
        kind = type(inner).__name__
        if kind.endswith("DecoderLayer") or kind.endswith("Block"):
            return module
    return find_decoder_layers(base)  # raises the core's error, which names the candidates


def as_bool_mask(name: str, mask: torch.Tensor, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A 0/1 (any integer, bool or float) mask as bool, checking its values and, if given, its shape."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1")
    return mask != 0


def scored_mask(action_mask: torch.Tensor, attention_mask: torch.Tensor, config: FlowConfig) -> torch.Tensor:
    """Action tokens whose flow context is a real token of the same row.

    In a padded batch the pair of the last real token (``token_pre``) or of the first
    (``token_post``) would be a pad; like the sequence ends of DESIGN.md §1 those tokens
    get no score. ``identity`` pairs a token with itself.
    """
    real = attention_mask.bool()
    T, s = real.shape[1], config.shift
    context_real = torch.zeros_like(real)
    if config.context_mode == "identity":
        context_real = real
    elif s < T and config.context_mode == "token_pre":
        context_real[:, :T - s] = real[:, s:]
    elif s < T:
        context_real[:, s:] = real[:, :T - s]
    return action_mask.bool() & real & context_real


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True per row of a [B, T] bool mask (rows must have one)."""
    T = mask.shape[-1]
    return T - 1 - mask.flip(-1).to(torch.uint8).argmax(-1)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `t` over the ranks of `group` in place when torch.distributed runs with several ranks."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def broadcast_module(module: nn.Module, group=None) -> None:
    """Copy the parameters and buffers of the first rank of `group` to every rank (no-op without distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return
    src = 0 if group is None else dist.get_global_rank(group, 0)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src, group=group)


# Pairs per noise block of the online update: the draws of a token depend only on its block, never on the chunking.
NOISE_BLOCK = 256


def _block_draws(seed: int, start: int, stop: int, repeats: int, n_layers: int, dim: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit-normal t [repeats, L·m] and ε [repeats, L·m, D] of pairs ``start:stop`` (m = stop - start), layer-major.

    Pair p's draws come from block ``p // NOISE_BLOCK``, whose generator is seeded with ``seed + block``,
    so any chunking of the pairs sees the same t and ε for every (repeat, layer, pair).
    """
    gen = torch.Generator(device=device)
    ts, eps = [], []
    for block in range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1):
        gen.manual_seed(seed + block)
        lo = block * NOISE_BLOCK
        a, b = max(start, lo) - lo, min(stop, lo + NOISE_BLOCK) - lo
        t = torch.sigmoid(torch.randn((repeats, n_layers, NOISE_BLOCK), generator=gen, device=device))
        e = torch.randn((repeats, n_layers, NOISE_BLOCK, dim), generator=gen, device=device)
        ts.append(t[:, :, a:b])
        eps.append(e[:, :, a:b])
    m = stop - start
    return (torch.cat(ts, 2).reshape(repeats, n_layers * m),
            torch.cat(eps, 2).reshape(repeats, n_layers * m, dim))


def check_max_tokens(name: str, value: Optional[int]) -> Optional[int]:
    """`value` if it is None or a positive integer, else a ValueError naming `name`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return value


def flow_update(field: VelocityField, optimizer: torch.optim.Optimizer, latents: Sequence[torch.Tensor],
                layer_fracs: Sequence[float], mask: torch.Tensor, weights: torch.Tensor, config: FlowConfig, *,
                generator: Optional[torch.Generator] = None, repeats: int = 1, backend: str = "auto",
                process_group=None, max_tokens: Optional[int] = None) -> Optional[float]:
    """One optimiser step of flow matching on the masked tokens of a padded batch (DESIGN.md §1, online update).

    Every token selected by `mask` [B, T] (bool) at every hooked layer is a
    flow-matching target, paired by ``config.context_mode``; row i weighs
    ``weights[i]`` (1 for a correct rollout, the soft weight otherwise). The loss
    is the weighted mean over all tokens, layers and ranks: each rank scales its
    local mean by its share of the global weight and gradients are summed across
    ranks, so every rank applies the same update to its copy of the flow.

    With `max_tokens`, the tokens go through the flow in chunks of at most that many
    (each at every hooked layer and repeat) and the gradients are accumulated, so the
    update's activation memory is bounded by the chunk whatever the batch. The noise
    of each token is drawn from per-block generators seeded by one draw from
    `generator` (`NOISE_BLOCK`), so every chunking gives the same update as one chunk,
    up to float summation order.

    Returns the global loss, or None when no token has weight anywhere (no step is taken).
    """
    check_max_tokens("max_tokens", max_tokens)
    device = field.input_proj.weight.device
    latents = [latent.to(device) for latent in latents]
    token_w = mask.to(device).float() * weights.to(device).float()[:, None]
    index = pair_index(selected_pairs(token_w != 0, config, token_w.shape[1]), config)
    pair_w = token_w[index.rows, index.pos]
    n_layers = len(latents)
    totals = all_reduce_sum((pair_w.sum() * n_layers).double().reshape(1), process_group)
    global_w = float(totals[0])
    if global_w <= 0:
        return None
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=getattr(generator, "device", device)))
    fracs = torch.tensor([float(f) for f in layer_fracs], dtype=torch.float32, device=device)
    optimizer.zero_grad(set_to_none=False)
    for p in field.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    local = torch.zeros((), dtype=torch.float64, device=device)
    step = index.n if max_tokens is None else max_tokens
    for start in range(0, index.n, step):
        stop = min(start + step, index.n)
        targets, conds = index.slice(start, stop).gather(latents)
        t, noise = _block_draws(seed, start, stop, repeats, n_layers, field.dim, device)
        w = pair_w[start:stop].repeat(n_layers)
        loss = flow_matching_loss(field, targets, conds, fracs.repeat_interleave(stop - start), w, t=t, noise=noise,
                                  repeats=repeats, backend=backend, check_finite=False)
        share = w.sum() / global_w  # this chunk's part of the global weight (a tensor: no host sync)
        (loss * share).backward()
        local += (loss.detach() * share).double()
    total = all_reduce_sum(local.reshape(1), process_group)
    _checks.finite_result("the online flow update's loss", total, **{f"latents[{i}]": lat for i, lat in enumerate(latents)})
    for p in field.parameters():
        all_reduce_sum(p.grad, process_group)
    optimizer.step()
    return float(total[0])


class LatentRecorder:
    """Record the hooked-layer latents of every forward pass of a policy, chunk after chunk.

    Trainers run the policy over a rollout batch in micro-batches; this keeps each
    micro-batch's latents (via `LatentTap`) and `latents` concatenates them along
    the batch dimension, in call order. Used as a context manager; the hooks are
    removed on exit.
    """

    def __init__(self, model: nn.Module, fracs: Sequence[float], *, layers: Optional[nn.ModuleList] = None):
        from ..tap import LatentTap

        self.base = unwrap_module(model)
        self.tap = LatentTap(self.base, fracs, decoder_layers=layers if layers is not None else decoder_layers(model))
        self.layer_fracs = self.tap.layer_fracs
        self._chunks: list[list[torch.Tensor]] = []
        self._handle = None

    def _record(self, module, args, output) -> None:
        self._chunks.append(self.tap.latents)

    def __enter__(self) -> "LatentRecorder":
        self._chunks = []
        self.tap.__enter__()
        self._handle = self.base.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self.tap.remove()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def calls(self) -> int:
        """How many forward passes were recorded."""
        return len(self._chunks)

    @property
    def latents(self) -> list[torch.Tensor]:
        """One [B, T, D] tensor per hooked layer, the recorded micro-batches concatenated."""
        if not self._chunks:
            raise RuntimeError("LatentRecorder recorded no forward pass")
        return [torch.cat(parts) for parts in zip(*self._chunks)]
