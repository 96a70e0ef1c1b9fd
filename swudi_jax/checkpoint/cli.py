"""``swudi-merge CONFIG OUT``: merge checkpoints on disk from a YAML config.

A thin layer over :func:`swudi_jax.checkpoint.pipeline.merge_checkpoints`. Errors print one
line to stderr (no traceback) and exit with status 1. SIGINT (Ctrl-C), SIGTERM and SIGHUP
(a closed terminal) stop the run the same way: the partial output is removed, OUT is left as
it was, and the exit status is the shell's convention 128 + the signal number (130 for
SIGINT, 143 for SIGTERM, 129 for SIGHUP). A signal the caller already ignores stays ignored (``nohup swudi-merge ...`` survives
a closed terminal). A repeated signal during that clean-up is ignored
so that the clean-up finishes (SIGKILL cannot be caught: the next run to the same OUT removes
what a killed run left, see :mod:`swudi_jax.checkpoint.io.output`).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from swudi_jax.checkpoint.config import ConfigError, parse_size


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


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A handled signal, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    for other in HANDLED_SIGNALS:  # the clean-up that follows must not be interrupted in turn
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a kill cleans up like Ctrl-C; a signal the caller ignores (nohup: SIGHUP) stays ignored
    previous = {signum: signal.signal(signum, _interrupt) for signum in HANDLED_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        from swudi_jax.checkpoint.pipeline import merge_checkpoints
        from swudi_jax.checkpoint.config import load_config
        from swudi_jax.model.merger import DEFAULT_MAX_GROUP_BYTES

        overrides = {}
        if args.out_shard_size is not None:
            overrides["out_shard_size"] = parse_size(args.out_shard_size, "--out-shard-size")
        group = DEFAULT_MAX_GROUP_BYTES if args.max_group_size is None else parse_size(args.max_group_size, "--max-group-size")
        config = load_config(args.config, overrides=overrides)
        out = merge_checkpoints(config, args.out, force=args.force, dry_run=args.dry_run,
                                progress=not args.no_progress, max_group_bytes=group)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"swudi-merge: interrupted by {signal.Signals(signum).name}; no output written", file=sys.stderr)
        return 128 + int(signum)
    except (ValueError, ConfigError, OSError) as exc:
        print(f"swudi-merge: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - anything unexpected still gets one line, not a traceback
        print(f"swudi-merge: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not args.dry_run:
        print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
