"""``swudi-merge CONFIG OUT``: merge checkpoints on disk from a YAML config.

A thin layer over :func:`swudi_jax.checkpoint_merge.merge_checkpoints`. Errors print one
line to stderr (no traceback) and exit with status 1 (130 when interrupted by Ctrl-C or
SIGTERM, after removing the partial output).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from swudi_jax.config import ConfigError, parse_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swudi-merge",
        description="Merge fine-tuned experts of one base model (SWUDI and baselines; arXiv 2606.07289).",
    )
    parser.add_argument("config", help="YAML merge config (base_model, models, merge_method, parameters, ...)")
    parser.add_argument("out", help="output directory (must be absent or empty unless --force)")
    parser.add_argument("--dry-run", action="store_true", help="validate everything and print the plan; write nothing")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT once the new merge is complete")
    parser.add_argument("--out-shard-size", metavar="N", help="bytes per output safetensors shard (e.g. 2000000000, 5GB)")
    parser.add_argument("--max-group-size", metavar="N", default=None,
                        help="cap on the bytes of one tensor group from all models held at once (default 1GiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill cleans up like Ctrl-C
    try:
        from swudi_jax.checkpoint_merge import merge_checkpoints
        from swudi_jax.compile_cache import enable_compile_cache; enable_compile_cache()  # noqa: E702
        from swudi_jax.config import load_config
        from swudi_jax.tree import DEFAULT_MAX_GROUP_BYTES

        overrides = {}
        if args.out_shard_size is not None:
            overrides["out_shard_size"] = parse_size(args.out_shard_size, "--out-shard-size")
        group = DEFAULT_MAX_GROUP_BYTES if args.max_group_size is None else parse_size(args.max_group_size, "--max-group-size")
        config = load_config(args.config, overrides=overrides)
        out = merge_checkpoints(config, args.out, force=args.force, dry_run=args.dry_run,
                                progress=not args.no_progress, max_group_bytes=group)
    except KeyboardInterrupt:
        print("swudi-merge: interrupted; no output written", file=sys.stderr)
        return 130
    except (ValueError, ConfigError, OSError) as exc:
        print(f"swudi-merge: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - anything unexpected still gets one line, not a traceback
        print(f"swudi-merge: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not args.dry_run:
        print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
