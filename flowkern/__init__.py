"""flowkern: fast, correct flow rewards (RLFR) for LLM reinforcement learning.

Public API:

- `FlowConfig` — the flow environment's hyper-parameters;
- `VelocityField`, `load_flow_field`, `save_flow_field` — the velocity network and its checkpoints;
- `LatentTap` — capture decoder-layer latents of an HF causal LM;
- `flow_pairs`, `flow_matching_loss`, `flow_scores` — flow matching on latents;
- `latent_flow_loss` — the flow loss over every hooked layer of a tapped batch;
- `flow_reward`, `shape_rewards`, `shape_advantages` — token rewards and GRPO advantages;
- `available_backends` — which backends can run an op on a device.
"""

from .backend import available_backends
from .checkpoint import load_flow_field, save_flow_field
from .config import FlowConfig
from .field import VelocityField
from .flow import flow_matching_loss, flow_pairs, flow_scores
from .latents import latent_flow_loss
from .reward import flow_reward, shape_advantages, shape_rewards
from .tap import LatentTap

__version__ = "0.1.0"

__all__ = [
    "FlowConfig",
    "LatentTap",
    "VelocityField",
    "available_backends",
    "flow_matching_loss",
    "flow_pairs",
    "flow_reward",
    "flow_scores",
    "latent_flow_loss",
    "load_flow_field",
    "save_flow_field",
    "shape_advantages",
    "shape_rewards",
]
