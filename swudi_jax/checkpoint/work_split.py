"""Which process merges which tensor group, decided identically by every process of a distributed merge.

Each group (one compiled call of :func:`swudi_jax.model.merger.merge_group`, the pipeline's unit)
gets an estimated cost in flops:

- a linear layer (m, n) merged by a linear or data method: ``9 n³`` (an eigendecomposition with
  eigenvectors, as SWUDI, pinv and RegMean's solve take) ``+ 4 (N + 1) m n²`` (the Grams C and D and
  the reconstruction);
- any other merged tensor of E elements: ``4 N E``;
- and for every tensor the bytes read (N + 1 models) and written, at :data:`FLOPS_PER_BYTE`.

Groups go to processes by longest-processing-time-first: the costliest group first, each to the
least-loaded process (ties: the lower group index, the lower process), which keeps the slowest
process within the largest single group's cost of the mean. The groups are the single-process
merge's (``max_group_size`` cuts them), so the compiled calls and their results are the same.

Linear groups the row-sharded path takes (:func:`swudi_jax.model.merger.takes_sharded_path` with
every process's devices: layers whose task vectors reach 256 MiB under ``multi_device: auto``, all
linear layers under ``multi_device: true``) are global: every process takes part in each of them
(:mod:`swudi_jax.checkpoint.global_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from swudi_jax.checkpoint.merge_plan import MergePlan
from swudi_jax.methods.spec import Resolved
from swudi_jax.model.layout import LeafPlan
from swudi_jax.model.merger import chunk_plans, takes_sharded_path

FLOPS_PER_BYTE = 50.0
"""The cost of a byte read or written, in flops (a disk at ~1 GB/s beside ~50 GFLOP/s of compute)."""
GLOBAL = -1
"""The owner of a group every process merges together."""


def group_cost(plans: Sequence[LeafPlan], n_experts: int, method_kind: str) -> float:
    """The estimated flops of merging one group (see the module docstring)."""
    cost = 0.0
    for p in plans:
        elements = math.prod(p.shape)
        cost += FLOPS_PER_BYTE * p.nbytes * (n_experts + 2)
        if p.kind == "linear" and method_kind in ("linear", "data"):
            m, n = p.maths_shape
            cost += p.layers * (9.0 * n ** 3 + 4.0 * (n_experts + 1) * m * n * n)
        elif p.kind in ("linear", "mean"):
            cost += 4.0 * n_experts * elements
    return cost


def balance(costs: Sequence[float], count: int) -> list[int]:
    """Longest processing time first: each group's process, loads as even as the costs allow."""
    loads = [0.0] * count
    owners = [0] * len(costs)
    for g in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        p = min(range(count), key=lambda p: (loads[p], p))
        owners[g] = p
        loads[p] += costs[g]
    return owners


class Work(NamedTuple):
    """One process's share of a merge.

    Attributes:
      owners: each group's process index, or :data:`GLOBAL`.
      costs: each group's estimated flops.
      index, count: this process and how many there are.
      multi_device: how this process's own groups run (the config's in a single process; in a
        team only on its own device: the global mesh is for the global groups).
    """

    owners: tuple[int, ...]
    costs: tuple[float, ...]
    index: int = 0
    count: int = 1
    multi_device: bool | str = False

    @property
    def local(self) -> list[int]:
        """The groups this process merges alone, in plan order."""
        return [g for g, owner in enumerate(self.owners) if owner == self.index]

    @property
    def global_groups(self) -> list[int]:
        """The groups every process merges together, in plan order."""
        return [g for g, owner in enumerate(self.owners) if owner == GLOBAL]

    @property
    def prepare(self) -> list[int]:
        """The groups whose task vectors this process reads in a whole-model pass: its own, and
        every ``count``-th global one (each group read by exactly one process)."""
        return [g for g, owner in enumerate(self.owners)
                if owner == self.index or (owner == GLOBAL and g % self.count == self.index)]

    def load(self, process: int) -> float:
        return sum(c for c, owner in zip(self.costs, self.owners) if owner == process)

    def summary(self) -> dict:
        """This process's share: its groups, the shared ones, and its part of the estimated cost."""
        total = sum(self.costs) or 1.0
        shared = sum(c for c, owner in zip(self.costs, self.owners) if owner == GLOBAL)
        return {"process": self.index, "processes": self.count, "groups": len(self.local),
                "shared_groups": len(self.global_groups), "of_groups": len(self.owners),
                "cost_fraction": (self.load(self.index) + shared / self.count) / total}

    def positions(self, plan: MergePlan, leaves: str) -> list[int]:
        """The model-order index of each chunk a whole-model pass over ``leaves`` reads here."""
        mine, out, k = set(self.prepare), [], 0
        for g, group in enumerate(plan.groups):
            for _ in chunk_plans(group, leaves):
                if g in mine:
                    out.append(k)
                k += 1
        return out


def describe_share(share: dict, wall_s: float | None = None) -> str:
    """One line for a process's :meth:`Work.summary` (and the seconds its merge loop took)."""
    shared = f" and took part in {share['shared_groups']} shared by all" if share["shared_groups"] else ""
    took = f" in {wall_s:.1f} s" if wall_s is not None else ""
    return (f"process {share['process']} of {share['processes']} merged {share['groups']} of {share['of_groups']} "
            f"tensor groups{shared}{took} ({100 * share['cost_fraction']:.0f}% of the estimated cost)")


def split_work(plan: MergePlan, resolved: Resolved, multi_device: bool | str, index: int = 0,
               count: int = 1) -> Work:
    """Every group's owner for process ``index`` of ``count`` (the same on every process)."""
    n = len(plan.config.models)
    costs = tuple(group_cost(g, n, resolved.spec.kind) for g in plan.groups)
    if count == 1:
        return Work((0,) * len(costs), costs, multi_device=multi_device)
    shared = [g[0].kind == "linear" and takes_sharded_path(multi_device, resolved, (n, *g[0].maths_shape))
              for g in plan.groups]
    alone = [g for g in range(len(costs)) if not shared[g]]
    owners = np.full(len(costs), GLOBAL, np.int64)
    owners[alone] = balance([costs[g] for g in alone], count)
    return Work(tuple(int(o) for o in owners), costs, index, count)


__all__ = ["FLOPS_PER_BYTE", "GLOBAL", "Work", "balance", "describe_share", "group_cost", "split_work"]
