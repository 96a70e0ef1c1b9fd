"""``swudi-merge CONFIG OUT``: merge checkpoints on disk from a YAML config.

A thin layer over :func:`swudi_jax.checkpoint.pipeline.merge_checkpoints`. Errors print one
line to stderr (no traceback) and exit with status 1. SIGINT (Ctrl-C), SIGTERM and SIGHUP
(a closed terminal) stop the run the same way: the partial output is removed, OUT is left as
it was, and the exit status is the shell's convention 128 + the signal number (130 for
SIGINT, 143 for SIGTERM, 129 for SIGHUP). A signal the caller already ignores stays ignored (``nohup swudi-merge ...`` survives
a closed terminal). A repeated signal during that clean-up is ignored
so that the clean-up finishes (SIGKILL cannot be caught: the next run to the same OUT removes
what a killed run left, see :mod:`swudi_jax.checkpoint.io.output`). The console script enters
through :mod:`swudi_jax_cli`, which blocks these signals before jax is imported; ``main``
unblocks them once its handlers are in place.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from swudi_jax.checkpoint.config import ConfigError, parse_shard_size, parse_size

MERGEKIT_FLAGS = """mergekit's flags:
  --copy-tokenizer/--no-copy-tokenizer  as mergekit (default: copy the base's, or tokenizer_source's, files)
  --lazy-unpickle   accepted, no effect: tensors are always read one group at a time, and PyTorch pickles
                    (.bin) are never unpickled here (safetensors, orbax, msgpack, npz only)
  --cuda            require the accelerator JAX has (JAX uses a GPU/TPU whenever it sees one; this makes
                    its absence an error instead of a CPU run)
  --allow-crimes    accepted; it lifts no check: models must have the same tensor names and shapes, since
                    a merge here combines tensors path by path (mergekit's crimes mix architectures)
  --out-shard-size  "5B" is 5 billion parameters per shard (mergekit's default); "5GB" is 5 gigabytes
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swudi-merge",
        description="Merge fine-tuned experts of one base model (SWUDI and baselines; arXiv 2606.07289). "
                    "Configs in mergekit's schema run as they are (see README, 'Coming from mergekit').",
        epilog=MERGEKIT_FLAGS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML merge config (base_model, models, merge_method, parameters, ...)")
    parser.add_argument("out", help="output directory (must be absent or empty unless --force)")
    parser.add_argument("--dry-run", action="store_true", help="validate everything and print the plan; write nothing")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT once the new merge is complete")
    parser.add_argument("--out-shard-size", metavar="N",
                        help="per output safetensors shard: parameters as mergekit counts them (5B = 5 billion, 500M) "
                             "or bytes (5GB, 2GiB, 2000000000)")
    parser.add_argument("--max-group-size", metavar="N", default=None,
                        help="cap on the bytes of one tensor group from all models held at once (default 1GiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--report", action="store_true",
                        help="also write OUT/merge_report.json, .txt and .png (per linear layer the task interference "
                             "left by the merge; the picture needs matplotlib) and print the worst layers")
    parser.add_argument("--score", metavar="CALIB",
                        help="per-task input Grams {tensor: (N, n, n)} of calibration data (as a config's `grams`): "
                             "the report also gives the residual-energy score rho of the merge and of each expert")
    parser.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                        help="copy the tokenizer files to OUT (default: yes)")
    parser.add_argument("--lazy-unpickle", action="store_true", help="mergekit's flag; no effect here (see below)")
    parser.add_argument("--cuda", action="store_true", help="require the accelerator JAX has (see below)")
    parser.add_argument("--allow-crimes", action="store_true", help="mergekit's flag; lifts no check (see below)")
    return parser


def _require_accelerator() -> None:
    import jax

    if jax.default_backend() == "cpu":
        raise ValueError("--cuda: JAX sees no accelerator (its backend is cpu); install jax with CUDA support "
                         "(pip install 'jax[cuda12]') or leave --cuda out to merge on the CPU")


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A handled signal, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _ignore(signum, frame):
    """Handler for the clean-up: a repeated signal is received and dropped. (Not SIG_IGN: a signal
    already pending when the handler changes would make Python print "Signal N ignored due to race
    condition" with a traceback.)"""


def _interrupt(signum, frame):
    for other in HANDLED_SIGNALS:  # the clean-up that follows must not be interrupted in turn
        if signal.getsignal(other) is not signal.SIG_IGN:  # one the caller ignores stays ignored
            signal.signal(other, _ignore)
    raise Interrupted(signum)


def _redeliver_swallowed(unraisable) -> None:
    """An :class:`Interrupted` raised while Python ran a callback that cannot propagate it (a
    garbage-collection hook such as XLA's) is only printed and dropped: deliver the signal
    again, so that it lands in the main thread's own code and stops the run."""
    if isinstance(unraisable.exc_value, Interrupted):
        signum = unraisable.exc_value.signum
        # a timer's SIGALRM, 10 ms on, raises it again once this hook has returned
        signal.signal(signal.SIGALRM, lambda *_: _interrupt(signum, None))
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None, *, restore_signals: bool = True) -> int:
    """Run the command; returns its exit status. ``restore_signals=False`` (the console script,
    which exits next) leaves the clean-up's handlers in place: a signal still pending as ``main``
    returns is then dropped instead of reaching Python's default handler after the clean-up."""
    args = build_parser().parse_args(argv)
    # a kill cleans up like Ctrl-C; a signal the caller ignores (nohup: SIGHUP) stays ignored
    previous = {signum: signal.signal(signum, _interrupt) for signum in HANDLED_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _redeliver_swallowed
    try:
        # the console script (swudi_jax_cli) blocked them before the heavy imports: a signal sent
        # during those is delivered here, to the handlers above
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        from swudi_jax.checkpoint.compile_cache import enable_compile_cache
        from swudi_jax.checkpoint.pipeline import merge_checkpoints

        enable_compile_cache()
        from swudi_jax.checkpoint.config import load_config
        from swudi_jax.model.merger import DEFAULT_MAX_GROUP_BYTES

        overrides = {}
        if args.out_shard_size is not None:
            size = args.out_shard_size
            overrides["out_shard_size"] = int(size) if size.strip().isdigit() else size
            parse_shard_size(overrides["out_shard_size"], "--out-shard-size")
        if args.cuda:
            _require_accelerator()
        group = DEFAULT_MAX_GROUP_BYTES if args.max_group_size is None else parse_size(args.max_group_size, "--max-group-size")
        config = load_config(args.config, overrides=overrides)
        out = merge_checkpoints(config, args.out, force=args.force, dry_run=args.dry_run,
                                progress=not args.no_progress, max_group_bytes=group,
                                copy_tokenizer=args.copy_tokenizer, report=args.report, score=args.score)
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
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items() if restore_signals else ():
            signal.signal(signum, handler)
    if not args.dry_run:
        print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
