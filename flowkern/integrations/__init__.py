"""Drop-in RLFR flow rewards for distributed RL engines.

- `flowkern.integrations.trl`: `FlowGRPOTrainer`, a TRL `GRPOTrainer` subclass (``pip install flowkern[trl]``);
- `flowkern.integrations.verl`: the ``grpo_flow`` advantage estimator and `FlowRewardHook` (``pip install flowkern[verl]``);
- `flowkern.integrations.openrlhf`: `compute_reward`, a drop-in for the RLFR fork of OpenRLHF (no extra needed).

Each submodule imports its engine only when it is itself imported; importing
`flowkern` or this package never imports trl or verl.
"""

__all__ = ["openrlhf", "trl", "verl"]
