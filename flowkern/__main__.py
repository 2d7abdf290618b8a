"""``python -m flowkern <command>`` (also the ``flowkern`` console script). Commands: ``pretrain``."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = ("pretrain",)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch to a command; returns its exit code (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: flowkern {{{','.join(COMMANDS)}}} ... (e.g. flowkern pretrain --help)", file=sys.stderr)
        return 2
    from .pretrain import main as pretrain_main

    return pretrain_main(argv[1:], prog="flowkern pretrain")


if __name__ == "__main__":
    sys.exit(main())
