"""The `vnpd` command line.

stdout carries only what the user asked for (a status table, a model path); logs go to
stderr, except for ``vnpd run``, whose JSON log lines go to stdout for journald.
Exit codes: 0 success, 1 failure, 2 usage, 65 bad input data (EX_DATAERR),
78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import structlog

from vnpd import __version__
from vnpd.compute.choices import (ATTENTION_BACKENDS, AUTO, COMPILE_MODES, COMPILE_OFF,
                                  COMPUTE_DTYPES, OUTPUT_DTYPES)
from vnpd.compute.tokenizer import FAIR_ESM_TRUNCATION
from vnpd.config import EX_CONFIG
from vnpd.log import configure_logging

EX_DATAERR = 65  # sysexits.h: the input data was incorrect

log = structlog.get_logger()


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="TOML configuration file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vnpd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vnpd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon")
    _add_config(p)
    p.add_argument("--devices", help="override workers.devices, e.g. cpu,cpu or cuda:0,cuda:1")
    p.add_argument("--log-format", choices=["json", "console", "auto"])
    p.add_argument("--log-level")

    p = sub.add_parser("submit", help="put FASTA files into the inbox safely")
    p.add_argument("files", nargs="+", type=Path)
    _add_config(p)

    p = sub.add_parser("status", help="workers and jobs of a running daemon")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("embed", help="embed one FASTA file without a daemon")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--model", default="esm2_t36_3B_UR50D",
                   help="fair-esm model name or path to a .pt checkpoint")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None,
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--output-dtype", choices=OUTPUT_DTYPES, default="float32")
    p.add_argument("--layer", type=int, default=-1, help="representation layer (-1 = last)")
    p.add_argument("--layers", type=_layer_list, default=None,
                   help="several layers in one pass, e.g. --layers=-1,20 (overrides --layer)")
    p.add_argument("--per-residue", action="store_true",
                   help="also write every residue's representation (residues, residue_offsets)")
    p.add_argument("--long-sequences", choices=["truncate", "window"], default="truncate",
                   help="sequences over --truncation: truncate (extract.py) or window")
    p.add_argument("--window-stride", type=int, default=0,
                   help="window mode: residues between window starts (0 = truncation / 2)")
    p.add_argument("--max-tokens", type=int, default=0, help="token budget (0 = auto)")
    p.add_argument("--truncation", type=int, default=FAIR_ESM_TRUNCATION)
    p.add_argument("--attention", choices=(AUTO, *ATTENTION_BACKENDS), default=None,
                   help="attention backend (default: [model] attention from VNPD_MODEL_ATTENTION "
                        "or VNPD_ATTENTION, else auto = the first available)")
    p.add_argument("--compile-mode", choices=(AUTO, COMPILE_OFF, *COMPILE_MODES), default=None,
                   help="how the forward is compiled (default: from VNPD_MODEL_COMPILE_MODE, "
                        "VNPD_COMPILE_MODE or VNPD_COMPILE=0, else auto = fused on CUDA, "
                        "off on CPU)")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--kind", choices=["protein", "nucleotide"], default="protein",
                   help="what the input holds; nucleotide is made into proteins first")
    p.add_argument("--proteins", choices=["six_frame", "genes"], default="six_frame",
                   help="nucleotide: six_frame (VirNucPro's chunks) or genes (pyrodigal-gv)")
    p.add_argument("--chunk-length", type=_chunk_length, default=300,
                   help="nucleotide six_frame: bp per chunk (VirNucPro: 300 or 500)")
    p.add_argument("--gene-workers", type=_worker_count, default=0,
                   help="nucleotide genes: threads calling genes (default 0 = one per core)")
    p.add_argument("--six-frame-workers", type=_worker_count, default=0,
                   help="nucleotide six_frame: processes translating (default 0 = one per core)")

    p = sub.add_parser("validate-config", help="check a configuration file")
    p.add_argument("config", type=Path)

    p = sub.add_parser("fetch-model", help="download a fair-esm checkpoint (network)")
    p.add_argument("name")

    p = sub.add_parser("make-test-model", help="write a random-weight ESM-2 checkpoint")
    p.add_argument("output", type=Path)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return parser


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers such as -1,20, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError("expected at least one layer")
    return layers


def _chunk_length(text: str) -> int:
    value = int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"must be at least 3 (one codon), got {value}")
    return value


def _worker_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (one per core) or more, got {value}")
    return value


def cmd_embed(args: argparse.Namespace) -> int:
    from vnpd.embed import EmbedOptions, embed_file
    from vnpd.inputs.source import SourceSettings
    from vnpd.compute.engine import Engine
    from vnpd.compute.windows import plan_windows
    from vnpd.inputs.fasta import FastaError
    from vnpd.compute.families.esm2_checkpoint import CheckpointError, ModelNotFoundError
    from vnpd.config import ConfigError, load_engine_choices

    configure_logging("auto", args.log_level, stream=sys.stderr)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    try:
        attention, compile_mode = load_engine_choices(attention=args.attention,
                                                      compile_mode=args.compile_mode)
    except ConfigError as exc:
        sys.stderr.write(f"vnpd embed: {exc}\n")
        return EX_CONFIG
    try:
        engine = Engine.load(args.model, device=args.device, dtype=dtype, layer=args.layer,
                             layers=args.layers, truncation=args.truncation,
                             max_tokens=args.max_tokens, attention=attention,
                             compile_mode=compile_mode)
        options = EmbedOptions(per_residue=args.per_residue,
                               long_sequences=args.long_sequences,
                               window_stride=args.window_stride)
        if options.long_sequences == "window":
            plan_windows(0, engine.truncation, options.stride(engine.truncation))
        if options.per_residue and args.output_dtype == "float32":
            sys.stderr.write("vnpd embed: warning: --per-residue in float32 takes 4 bytes per "
                             "value per residue; --output-dtype float16 halves it\n")
    except (ModelNotFoundError, CheckpointError, ValueError, RuntimeError) as exc:
        sys.stderr.write(f"vnpd embed: {exc}\n")
        return EX_CONFIG
    try:
        settings = SourceSettings(kind=args.kind, proteins=args.proteins,
                                  chunk_length=args.chunk_length, gene_workers=args.gene_workers,
                                  six_frame_workers=args.six_frame_workers)
        embed_file(args.input, args.output, engine, output_dtype=args.output_dtype,
                   settings=settings, options=options)
    except FastaError as exc:
        sys.stderr.write(f"vnpd embed: {args.input}: {exc}\n")
        return EX_DATAERR
    except FileNotFoundError as exc:
        sys.stderr.write(f"vnpd embed: {exc}\n")
        return 1
    return 0


def cmd_make_test_model(args: argparse.Namespace) -> int:
    from vnpd.compute.families.esm2_checkpoint import make_test_model

    configure_logging("auto", "warning", stream=sys.stderr)
    ckpt, reg = make_test_model(args.output, layers=args.layers, dim=args.dim,
                                heads=args.heads, seed=args.seed)
    sys.stdout.write(f"wrote {ckpt} and {reg}: a RANDOM-WEIGHT ESM-2 test model "
                     f"({args.layers} layers, dim {args.dim}, {args.heads} heads, seed "
                     f"{args.seed}); its embeddings are meaningless, for tests and demos only\n")
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from vnpd.compute.families.esm2_checkpoint import fetch_model

    configure_logging("auto", "info", stream=sys.stderr)
    try:
        path = fetch_model(args.name)
    except ValueError as exc:
        sys.stderr.write(f"vnpd fetch-model: {exc}\n")
        return 2
    sys.stdout.write(f"{path}\n")
    return 0


def cmd_validate_config(args: argparse.Namespace) -> int:
    from vnpd.config import ConfigError, config_warnings, load_config
    from vnpd.daemon.preflight import validate_config

    try:
        cfg = load_config(args.config)
        validate_config(cfg)
    except ConfigError as exc:
        sys.stderr.write(f"vnpd validate-config: {args.config}: invalid\n{exc}\n")
        return EX_CONFIG
    for warning in config_warnings(cfg):
        sys.stderr.write(f"vnpd validate-config: warning: {warning}\n")
    sys.stdout.write(f"{args.config}: ok\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from vnpd.daemon.app import run_daemon

    overrides: dict[str, object] = {}
    if args.devices:
        overrides["workers.devices"] = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.log_format:
        overrides["logging.format"] = args.log_format
    if args.log_level:
        overrides["logging.level"] = args.log_level
    return run_daemon(args.config, overrides)


def cmd_submit(args: argparse.Namespace) -> int:
    from vnpd.config import ConfigError, load_config
    from vnpd.daemon.submit import submit_files

    configure_logging("auto", "warning", stream=sys.stderr)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"vnpd submit: {exc}\n")
        return EX_CONFIG
    try:
        for dest in submit_files(args.files, cfg.paths.inbox):
            sys.stdout.write(f"{dest}\n")
    except OSError as exc:
        sys.stderr.write(f"vnpd submit: {exc}\n")
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from vnpd.config import ConfigError, load_config
    from vnpd.daemon.status import format_status, read_status

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        sys.stderr.write(f"vnpd status: {exc}\n")
        return EX_CONFIG
    status = read_status(cfg.paths.state)
    if status is None:
        sys.stderr.write(f"vnpd status: no daemon status in {cfg.paths.state}\n")
        return 1
    sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.json else format_status(status))
    return 0


COMMANDS = {"run": cmd_run, "submit": cmd_submit, "status": cmd_status, "embed": cmd_embed,
            "validate-config": cmd_validate_config, "fetch-model": cmd_fetch_model,
            "make-test-model": cmd_make_test_model}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)
