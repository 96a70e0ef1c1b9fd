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

``--distributed`` (or ``--coordinator``, ``--num-processes``, ``--process-id``) runs the merge as one
of several processes on JAX's distributed runtime (:mod:`swudi_jax.checkpoint.distributed`); each
process prints its share to stderr, and the processes leave the runtime together once OUT is published.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence

from swudi_jax.checkpoint.config import ConfigError, parse_size

MERGEKIT_FLAGS = """What mergekit-yaml's flags do here:
  --copy-tokenizer/--no-copy-tokenizer  as mergekit (default: copy the base's, or tokenizer_source's, files)
  --write-model-card/--no-write-model-card  as mergekit: README.md and mergekit_config.yml, or neither
                    (merge_config.yaml, the resolved config, is always written)
  --out-shard-size  bytes per shard, as mergekit's: "5B" = 5·10⁹ bytes (its default), "500M"; also "2GiB"
  --random-seed N   the seed of the methods that draw at random (dare_*, della*, dare, arcee_fusion)
  -j/--num-threads N  compute on at most N CPU cores (the process's CPU affinity, which sizes XLA's pool)
  --quiet           no progress bar (as --no-progress)
  --cuda            require the accelerator JAX has (JAX uses a GPU/TPU whenever it sees one; this makes
                    its absence an error instead of a CPU run); --gpu-rich implies it, as in mergekit
  --trust-remote-code  accepted; no code from a model folder is ever run here (tensors are read as data,
                    side files copied from an allow-list), so there is nothing to trust
  --allow-crimes    accepted; it lifts no check: models must have the same tensor names and shapes, since
                    a merge here combines tensors path by path (mergekit's crimes mix architectures)
  accepted with no effect (one line says so): --lazy-unpickle (PyTorch pickles are never unpickled),
                    --low-cpu-memory, --read-to-gpu, --multi-gpu, --device, --clone-tensors, --async-write,
                    --write-threads, --no-safe-serialization (safetensors or orbax only), --lora-merge-cache,
                    --lora-merge-dtype, --transformers-cache (the Hub cache is HF_HUB_CACHE/HF_HOME), -v
"""

NO_EFFECT = {
    # dest: (mergekit's default, how the flag is spelled when it differs from that default)
    "lazy_unpickle": (False, "--lazy-unpickle"), "low_cpu_memory": (False, "--low-cpu-memory"),
    "read_to_gpu": (False, "--read-to-gpu"), "multi_gpu": (False, "--multi-gpu"),
    "clone_tensors": (False, "--clone-tensors"), "async_write": (False, "--async-write"),
    "safe_serialization": (True, "--no-safe-serialization"), "device": (None, "--device"),
    "write_threads": (None, "--write-threads"), "lora_merge_cache": (None, "--lora-merge-cache"),
    "lora_merge_dtype": (None, "--lora-merge-dtype"), "transformers_cache": (None, "--transformers-cache"),
    "verbosity": (0, "-v"),
}
"""mergekit's flags that change nothing here (its memory, device, writer and cache settings)."""


def _mergekit_arguments(parser: argparse.ArgumentParser) -> None:
    """mergekit-yaml's flags (``mergekit/options.py``), with its spellings and --no- forms."""
    flag = argparse.BooleanOptionalAction
    group = parser.add_argument_group("mergekit's flags", "accepted as mergekit-yaml takes them (see below)")
    group.add_argument("--copy-tokenizer", action=flag, default=True, help="copy the tokenizer files to OUT")
    group.add_argument("--write-model-card", action=flag, default=True,
                       help="write README.md and mergekit_config.yml (default: yes)")
    group.add_argument("--random-seed", type=int, metavar="N", help="seed of the methods that draw at random")
    group.add_argument("-j", "--num-threads", type=int, metavar="N", help="compute on at most N CPU cores")
    group.add_argument("--quiet", action=flag, default=False, help="no progress bar")
    group.add_argument("--cuda", action=flag, default=False, help="require the accelerator JAX has")
    group.add_argument("--gpu-rich", action="store_true", help="as mergekit: implies --cuda")
    group.add_argument("--trust-remote-code", action=flag, default=False, help="accepted; no code is ever run")
    group.add_argument("--allow-crimes", action=flag, default=False, help="accepted; lifts no check")
    for dest, (default, spelled) in NO_EFFECT.items():
        name = "--" + dest.replace("_", "-")
        if dest == "verbosity":
            group.add_argument("-v", dest=dest, action="count", default=0, help="no effect")
        elif isinstance(default, bool):
            group.add_argument(name, action=flag, default=default, help="no effect")
        else:
            group.add_argument(name, type=int if dest == "write_threads" else str, metavar="X", help="no effect")


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
                        help="bytes per output safetensors shard, as mergekit: 5B = 5·10⁹ bytes (the default), "
                             "500M, or 5GB, 2GiB, 2000000000")
    parser.add_argument("--max-group-size", metavar="N", default=None,
                        help="cap on the bytes of one tensor group from all models held at once (default 1GiB)")
    parser.add_argument("--out-adapter", action="store_true",
                        help="write the merge of LoRA adapters as one PEFT adapter (out_format: peft)")
    parser.add_argument("--adapter-rank", metavar="R", type=int,
                        help="with --out-adapter: truncate each module to rank R (best approximation; error reported)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--report", action="store_true",
                        help="also write OUT/merge_report.json, .txt and .png (per linear layer the task interference "
                             "left by the merge; the picture needs matplotlib) and print the worst layers")
    parser.add_argument("--score", metavar="CALIB",
                        help="per-task input Grams {tensor: (N, n, n)} of calibration data (as a config's `grams`): "
                             "the report also gives the residual-energy score rho of the merge and of each expert")
    _mergekit_arguments(parser)
    many = parser.add_argument_group("many processes (README, 'Many hosts')")
    many.add_argument("--distributed", action="store_true",
                      help="run as one of several processes on JAX's distributed runtime, the values below taken "
                           "from the cluster environment (SLURM, Open MPI, Cloud TPU pod) where not given")
    many.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address for the runtime (implies --distributed)")
    many.add_argument("--num-processes", metavar="P", type=int, help="how many processes (implies --distributed)")
    many.add_argument("--process-id", metavar="I", type=int, help="this process, 0 to P-1 (implies --distributed)")
    many.add_argument("--heartbeat-timeout", metavar="S", type=int,
                      help="seconds after which a silent process counts as dead and every process stops (default 100)")
    return parser


def _flag_notes(args: argparse.Namespace) -> str | None:
    """One line naming the mergekit flags given that change nothing here, or None."""
    ignored = [spelled for dest, (default, spelled) in NO_EFFECT.items() if getattr(args, dest) not in (default, None)]
    parts = [f"{', '.join(ignored)}: no effect here (mergekit's memory, device, writer and cache settings)"] \
        if ignored else []
    if args.trust_remote_code:
        parts.append("--trust-remote-code: no code from a model folder is ever run here (nothing to trust)")
    if args.allow_crimes:
        parts.append("--allow-crimes: lifts no check (models must have the same tensor names and shapes)")
    return "; ".join(parts) or None


def _limit_threads(count: int) -> None:
    """At most ``count`` CPU cores for this process (its CPU affinity: XLA sizes its CPU thread pool
    from it when the backend starts, and threads started later inherit it)."""
    if count < 1:
        raise ValueError(f"--num-threads must be at least 1, got {count}")
    if not hasattr(os, "sched_setaffinity"):
        warnings.warn("--num-threads has no effect on this platform (no CPU affinity)", stacklevel=2)
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:count])


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr (no category, file or source line)."""
    print(f"swudi-merge: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


def _start_distributed(args) -> bool:
    """Join JAX's distributed runtime when asked to (before any other JAX call); whether it was."""
    if not (args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None):
        if args.heartbeat_timeout is not None:
            raise ValueError("--heartbeat-timeout applies to a distributed run (--distributed, --coordinator, ...)")
        return False
    from swudi_jax.checkpoint.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout_s=args.heartbeat_timeout)
    return True


def _require_accelerator(flag: str) -> None:
    import jax

    if jax.default_backend() == "cpu":
        raise ValueError(f"{flag}: JAX sees no accelerator (its backend is cpu); install jax with CUDA support "
                         "(pip install 'jax[cuda12]') or leave it out to merge on the CPU")


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


def _run(args: argparse.Namespace, distributed: bool):
    """The merge the parsed arguments ask for (the signal handlers are in place; ``distributed``:
    this process joined JAX's distributed runtime); returns OUT and what it holds ("adapter" or
    "checkpoint")."""
    from swudi_jax.checkpoint.compile_cache import enable_compile_cache
    from swudi_jax.checkpoint.pipeline import merge_checkpoints

    enable_compile_cache()
    from swudi_jax.checkpoint.config import load_config
    from swudi_jax.model.merger import DEFAULT_MAX_GROUP_BYTES

    notes = _flag_notes(args)
    if notes:
        print(f"swudi-merge: note: {notes}", file=sys.stderr)
    overrides = {}
    if args.out_shard_size is not None:
        size = args.out_shard_size
        overrides["out_shard_size"] = int(size) if size.strip().isdigit() else size
        parse_size(overrides["out_shard_size"], "--out-shard-size")
    if args.out_adapter:
        overrides["out_format"] = "peft"
    if args.adapter_rank is not None:
        overrides["adapter_rank"] = args.adapter_rank
    if args.num_threads is not None:
        _limit_threads(args.num_threads)
    if args.cuda or args.gpu_rich:
        _require_accelerator("--cuda" if args.cuda else "--gpu-rich (implies --cuda, as in mergekit)")
    group = DEFAULT_MAX_GROUP_BYTES if args.max_group_size is None else parse_size(args.max_group_size, "--max-group-size")
    config = load_config(args.config, overrides=overrides, random_seed=args.random_seed)
    timings: dict = {}
    out = merge_checkpoints(config, args.out, force=args.force, dry_run=args.dry_run,
                            progress=not (args.no_progress or args.quiet), max_group_bytes=group,
                            copy_tokenizer=args.copy_tokenizer, write_model_card=args.write_model_card,
                            distributed=distributed, timings=timings, report=args.report, score=args.score)
    if distributed:  # every process has finished: say what it did, leave the runtime together
        import jax

        from swudi_jax.checkpoint.work_split import describe_share

        if "share" in timings:
            print(f"swudi-merge: {describe_share(timings['share'], timings['wall_s'])}", file=sys.stderr)
        jax.distributed.shutdown()
    return out, "adapter" if config.out_format == "peft" else "checkpoint"


def main(argv: Sequence[str] | None = None, *, restore_signals: bool = True) -> int:
    """Run the command; returns its exit status. ``restore_signals=False`` (the console script,
    which exits next) leaves the clean-up's handlers in place: a signal still pending as ``main``
    returns is then dropped instead of reaching Python's default handler after the clean-up.
    Warnings print as one line each (``swudi-merge: warning: ...``)."""
    args = build_parser().parse_args(argv)
    # a kill cleans up like Ctrl-C; a signal the caller ignores (nohup: SIGHUP) stays ignored
    previous = {signum: signal.signal(signum, _interrupt) for signum in HANDLED_SIGNALS
                if signal.getsignal(signum) is not signal.SIG_IGN}
    previous_hook, sys.unraisablehook = sys.unraisablehook, _redeliver_swallowed
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            # the console script (swudi_jax_cli) blocked them before the heavy imports: a signal sent
            # during those is delivered here, to the handlers above
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            out, what = _run(args, _start_distributed(args))
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
        if affinity is not None and os.sched_getaffinity(0) != affinity:
            os.sched_setaffinity(0, affinity)  # an in-process caller gets its cores back
        for signum, handler in previous.items() if restore_signals else ():
            signal.signal(signum, handler)
    if not args.dry_run:
        print(f"merged {what} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "HANDLED_SIGNALS",
    "MERGEKIT_FLAGS",
    "Interrupted",
    "build_parser",
    "main",
]
