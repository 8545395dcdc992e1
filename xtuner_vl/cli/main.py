"""``xtuner-vl`` entry point: one sub-command per recipe; heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence

__all__ = ["main", "build_parser", "run_captured", "train_preflight_failed"]


def _make_tiny(args: argparse.Namespace) -> int:
    from xtuner_vl.tiny.checkpoints import make_tiny

    overrides = {"ps_version": args.ps_version} if args.ps_version else {}
    out = make_tiny(args.family, args.out_dir, seed=args.seed, **overrides)
    print(f"wrote tiny {args.family} checkpoint to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from xtuner_vl.demo import run_demo

    return run_demo(work_dir=args.work_dir, steps=args.steps)


def train_preflight_failed(config: str, work_dir: str | None, cfg_options: dict | None) -> bool:
    """``train``'s checks before anything starts (before torchrun: one line per problem here instead of a traceback
    from every rank); prints each problem and returns True when there is one."""
    from xtuner_vl.recipes.preflight import preflight

    problems = preflight(config, work_dir, cfg_options)
    for problem in problems:
        print(f"xtuner-vl train: error: {problem}", file=sys.stderr)
    return bool(problems)


def _train(args: argparse.Namespace) -> int:
    from xtuner_vl.cli.launch import needs_torchrun, relaunch_with_torchrun

    if train_preflight_failed(args.config, args.work_dir, args.cfg_options):
        return 2
    if needs_torchrun():
        return relaunch_with_torchrun(sys.argv[1:] if args.argv is None else args.argv)
    from xtuner_vl.engine.preemption import TrainingStopped
    from xtuner_vl.recipes.train import exit_after_distributed_run, train

    try:
        train(
            args.config,
            deepspeed=args.deepspeed,
            work_dir=args.work_dir,
            resume=args.resume,
            cfg_options=args.cfg_options,
            seed=args.seed,
            allow_data_change=args.allow_data_change,
        )
    except TrainingStopped as stopped:  # saved on SIGTERM / SIGINT / SIGUSR1: a status of its own
        exit_after_distributed_run(stopped.exit_code)
        return stopped.exit_code
    exit_after_distributed_run()
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from xtuner_vl.recipes.check_data import run_check_data

    return run_check_data(args.config, args.cfg_options, args.workers, args.report)


def _preview_data(args: argparse.Namespace) -> int:
    from xtuner_vl.recipes.preview_data import preview_data

    return preview_data(args.config, args.index, args.out, args.cfg_options)


def _list_cfg(args: argparse.Namespace) -> int:
    from xtuner_vl.recipes.config import list_configs

    for name in list_configs(args.pattern):
        print(name)
    return 0


def _copy_cfg(args: argparse.Namespace) -> int:
    from xtuner_vl.recipes.config import copy_config

    dst = copy_config(args.name, args.dir)
    print(f"copied {args.name} to {dst} (one file, every base merged in); edit it, then `xtuner-vl train {dst}`")
    return 0


def _estimate(args: argparse.Namespace) -> int:
    import json

    from xtuner_vl.recipes.estimate import estimate
    from xtuner_vl.recipes.estimate_report import estimate_to_dict, format_estimate

    try:
        e = estimate(
            args.config, args.gpus, args.deepspeed, args.micro_batch_size, args.cfg_options, args.trained_tokens
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"xtuner-vl estimate: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(estimate_to_dict(e), indent=2) if args.json else format_estimate(e))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from xtuner_vl.checkpoint import CheckpointError
    from xtuner_vl.recipes.convert import convert, convert_from_hf

    positional = [a for a in (args.config, args.ckpt, args.out) if a is not None]
    if args.from_hf is not None and len(positional) != 1:
        print("xtuner-vl convert: error: usage: convert --from-hf HF_DIR OUT [--base DIR]", file=sys.stderr)
        return 2
    if args.from_hf is None and len(positional) != 3:
        print("xtuner-vl convert: error: the arguments config, ckpt and out are required", file=sys.stderr)
        return 2
    try:
        if args.from_hf is not None:
            out = convert_from_hf(args.from_hf, positional[0], args.base, args.max_shard_size)
            print(f"wrote official output to {out}")
            return 0
        out = convert(
            args.config,
            args.ckpt,
            args.out,
            fmt=args.format,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            cfg_options=args.cfg_options,
            trust_base=args.trust_base,
            allow_nonfinite=args.allow_nonfinite,
        )
    except CheckpointError as e:
        print(f"xtuner-vl convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.format} output to {out}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from xtuner_vl.recipes.chat import chat

    try:
        chat(
            args.model_dir,
            args.image,
            args.video,
            args.prompt,
            args.max_new_tokens,
            args.num_frames,
            prompt_log=args.prompt_log,
            system_message=args.system,
        )
    except ValueError as e:  # unreadable image / video, <image> placeholders that do not match the inputs
        print(f"xtuner-vl chat: error: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from xtuner_vl.recipes.config import DictAction
    from xtuner_vl.tiny.families import TINY_FAMILIES

    parser = argparse.ArgumentParser(prog="xtuner-vl", description="Fine-tune InternVL 1.5 / 2 / 2.5 / 3 / 3.5 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a config (file, or name of a shipped config: list-cfg)")
    p.add_argument("config")
    p.add_argument(
        "--deepspeed", default=None, help="zero1|zero2|zero3|zero2_offload|zero3_offload|deepspeed_zero2|file.json"
    )
    p.add_argument("--work-dir", default=None, help="default: work_dirs/<config name>")
    p.add_argument("--resume", default=None, help="auto (newest complete checkpoint) or a checkpoint path")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, help="key=value overrides")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: accept annotation files whose content changed since the checkpoint",
    )
    p.set_defaults(func=_train, argv=None)

    p = sub.add_parser("check-data", help="validate every record of the config's data sources")
    p.add_argument("config")
    p.add_argument(
        "--workers", type=int, default=None, help="processes (default: all cores; 1: checks in this process)"
    )
    p.add_argument("--report", default=None, help="also write the report to this file")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None)
    p.set_defaults(func=_check_data)

    p = sub.add_parser("preview-data", help="render one sample: tiles grid + prompt with trained spans marked")
    p.add_argument("config")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--out", default="sample.png")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None)
    p.set_defaults(func=_preview_data)

    p = sub.add_parser("list-cfg", help="list shipped configs")
    p.add_argument("-p", "--pattern", default=None)
    p.set_defaults(func=_list_cfg)

    p = sub.add_parser("copy-cfg", help="copy a shipped config to a directory to edit it")
    p.add_argument("name")
    p.add_argument("dir")
    p.set_defaults(func=_copy_cfg)

    p = sub.add_parser("estimate", help="parameter counts and per-GPU memory of a config (no weights read)")
    p.add_argument("config")
    p.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (default 8)")
    p.add_argument(
        "--deepspeed", default=None, help="mark this backend: zero1|zero2|zero3|zero2_offload|zero3_offload|file.json"
    )
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: the config's schedule.micro_batch_size")
    p.add_argument(
        "--trained-tokens",
        type=int,
        default=None,
        help="trained positions per row (default: max_length minus one full-tile image)",
    )
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, help="key=value overrides")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=_estimate)

    p = sub.add_parser("convert", help="training checkpoint -> merged official / hf model or peft adapters")
    # Optional positionals so that `convert --from-hf HF_DIR OUT` parses; _convert checks the count.
    p.add_argument("config", nargs="?", help="the run's config (the copy in its work dir, or a shipped name)")
    p.add_argument(
        "ckpt", nargs="?", help="work dir, step-XXXXXXXX directory, DeepSpeed tag directory or torch_backend.pt"
    )
    p.add_argument("out", nargs="?", help="output directory")
    p.add_argument("--format", choices=["official", "adapter", "hf"], default="official")
    p.add_argument("--from-hf", default=None, help="hf InternVL directory -> official format: convert --from-hf HF OUT")
    p.add_argument("--base", default=None, help="with --from-hf: official release to copy config/tokenizer/code from")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: the base's torch_dtype")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--trust-base", action="store_true", help="accept a base path other than meta.json's")
    p.add_argument("--allow-nonfinite", action="store_true", help="export trained weights that hold inf/NaN")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, help="key=value overrides")
    p.set_defaults(func=_convert)

    p = sub.add_parser("chat", help="chat with an official-format model directory (images, video)")
    p.add_argument("model_dir")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    p.add_argument("--video", default=None, help="a video file or a folder of frames")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled from --video")
    p.add_argument(
        "--prompt",
        default=None,
        help="one question, answer, exit (default: interactive; exit/quit/EOF end, /reset clears the history)",
    )
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--prompt-log", default=None, help="append each turn's prompt, token ids and answer (JSON lines)")
    p.add_argument(
        "--system",
        default=None,
        help="system message instead of the checkpoint's; internvl3_5_thinking: the InternVL3.5 thinking prompt",
    )
    p.set_defaults(func=_chat)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official InternVL format")
    p.add_argument("family", choices=sorted(TINY_FAMILIES), help="release family to mimic")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ps-version", choices=["v1", "v2"], default=None, help="override the family's ps_version")
    p.set_defaults(func=_make_tiny)

    p = sub.add_parser(
        "demo", help="tiny InternVL2 + synthetic data: check-data, LoRA on ZeRO-2, convert, held-out accuracy"
    )
    p.add_argument("--work-dir", default="work_dirs/demo")
    p.add_argument("--steps", type=int, default=700, help="optimizer steps of 4 fresh samples each")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train" and argv is not None:
        args.argv = list(argv)
    if args.command not in ("train", "convert", "chat", "preview-data") or os.environ.get("XTUNER_VL_DEBUG") == "1":
        return args.func(args)
    from xtuner_vl.engine.preemption import TrainingAborted

    try:
        return args.func(args)
    except (OSError, ValueError, TrainingAborted) as e:
        # A bad model directory, config, checkpoint or a run stopped on purpose: the message says what and where;
        # a traceback would bury it (XTUNER_VL_DEBUG=1 shows it).
        print(f"xtuner-vl {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 1


def run_captured(argv: Sequence[str]) -> subprocess.CompletedProcess:
    """``xtuner-vl <argv>`` in this process, as a fresh interpreter would end it: stdout and stderr captured, the
    exit status of ``SystemExit``, an uncaught exception's traceback in stderr with status 1."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(list(argv))
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(list(argv), status or 0, stdout.getvalue(), stderr.getvalue())


if __name__ == "__main__":
    sys.exit(main())
