"""Compact end-to-end RLFR trainer built on `flowkern`.

``python -m train`` runs the embedded CPU demo: a generated arithmetic task,
a tiny Llama policy warmed up by SFT, flow pretraining on expert latents,
GRPO with flow rewards and online flow updates, then evaluation and reports.
See `train.cli` for the flags and `train.pipeline.run_pipeline` for the API.
"""

from .config import SHAPINGS, ConfigError, TrainConfig, tiny_config

__all__ = ["SHAPINGS", "ConfigError", "TrainConfig", "run_pipeline", "tiny_config"]


def run_pipeline(cfg: TrainConfig) -> dict:
    """Run every stage of `cfg`; see `train.pipeline.run_pipeline`."""
    from .pipeline import run_pipeline as _run

    return _run(cfg)
