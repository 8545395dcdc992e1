"""``xtuner-vl`` entry point: one sub-command per recipe; heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _make_tiny(args: argparse.Namespace) -> int:
    from xtuner_vl.tiny.checkpoints import make_tiny

    overrides = {}
    if args.ps_version:
        overrides["ps_version"] = args.ps_version
    out = make_tiny(args.family, args.out_dir, seed=args.seed, **overrides)
    print(f"wrote tiny {args.family} checkpoint to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from xtuner_vl.demo import run_demo

    return run_demo(work_dir=args.work_dir, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    from xtuner_vl.tiny.checkpoints import TINY_FAMILIES

    parser = argparse.ArgumentParser(prog="xtuner-vl", description="Fine-tune InternVL 1.5 / 2 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official InternVL format")
    p.add_argument("family", choices=sorted(TINY_FAMILIES), help="release family to mimic")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ps-version", choices=["v1", "v2"], default=None, help="override the family's ps_version")
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser("demo", help="end-to-end run on a built-in tiny model, on CPU")
    p.add_argument("--work-dir", default="work_dirs/demo")
    p.add_argument("--steps", type=int, default=30)
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
