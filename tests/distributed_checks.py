"""One process of a distributed merge run by tests/test_distributed.py (and usable by hand):

    python tests/distributed_checks.py ROOT OUTS PORT P I [MAX_GROUP_BYTES]

joins JAX's distributed runtime as process I of P (coordinator on localhost:PORT, gloo
collectives), then runs ``merge_checkpoints(ROOT/<name>.yaml, OUTS/<name>, distributed=True)``
for every name in ROOT/runs.txt, one after the other in the same runtime (a run that fails on
every process leaves the runtime usable for the next). ``mismatch`` runs ROOT/mismatch_I.yaml
instead (each process its own config). Prints one JSON line: per run, whether it succeeded,
how many groups this process merged, or its error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from swudi_jax.checkpoint.distributed import initialize  # noqa: E402 - before any other JAX call


def main() -> None:
    root, outs = Path(sys.argv[1]), Path(sys.argv[2])
    port, count, index = (int(a) for a in sys.argv[3:6])
    max_group_bytes = int(sys.argv[6]) if len(sys.argv) > 6 else 1 << 30
    initialize(f"localhost:{port}", count, index, heartbeat_timeout_s=30)
    import jax

    from swudi_jax.checkpoint.pipeline import merge_checkpoints

    report = {"process": jax.process_index(), "count": jax.process_count(), "local_devices": jax.local_device_count(),
              "devices": jax.device_count(), "runs": {}}
    for name in (root / "runs.txt").read_text().split():
        config = root / (f"{name}_{index}.yaml" if name == "mismatch" else f"{name}.yaml")
        timings: dict = {}
        try:
            merge_checkpoints(config, outs / name, progress=False, distributed=True, timings=timings,
                              max_group_bytes=max_group_bytes)
            report["runs"][name] = {"ok": True, "groups": timings["items"], "share": timings.get("share")}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which checks it
            report["runs"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
