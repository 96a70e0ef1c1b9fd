"""What a checkpoint merge decided before compute: :class:`MergePlan` (the config, every
tensor's :class:`~swudi_jax.model.layout.LeafPlan`, the compile groups, the output dtypes, the
output vocabulary),
read by the pipeline and by the files written beside the weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from swudi_jax.checkpoint.config import MergeConfig
from swudi_jax.checkpoint.slices import SlicePlan
from swudi_jax.model.layout import LeafPlan, describe_groups, group_nbytes


@dataclass(frozen=True)
class MergePlan:
    """Everything decided before compute: the config, each tensor's plan and the groups."""

    config: MergeConfig
    layout: str
    in_format: str
    out_format: str
    plans: tuple[LeafPlan, ...]
    groups: tuple[tuple[LeafPlan, ...], ...]
    out_dtypes: Mapping[str, np.dtype]
    guesses: tuple[str, ...] = ()
    sliced: SlicePlan | None = None  # with `slices:`, every output tensor's recipe
    vocabulary: Any = None  # the output vocabulary (:class:`~swudi_jax.checkpoint.vocabulary.Vocabulary`), if built

    def has_base(self, group: int) -> bool:
        """Whether group ``group`` is merged with a base (with slices: its slice's)."""
        if self.sliced is None:
            return self.config.has_base
        return self.sliced.has_base(self.groups[group][0].path)

    def describe(self) -> str:
        """A table: each tensor, its shape and dtype, its kind, what merges it, and its group."""
        method = self.config.merge_method
        lines = describe_groups(self.groups, method, self.config.method.spec.kind == "elementwise")
        counts = {k: sum(p.kind == k for p in self.plans) for k in ("linear", "mean", "keep", "passthrough")}
        summary = (f"{len(self.plans)} tensors in {len(self.groups)} groups "
                   f"({', '.join(f'{v} {k}' for k, v in counts.items())}); method {method}, layout {self.layout}, "
                   f"{self.in_format} -> {self.out_format}, largest group {self.largest_group_bytes():,} bytes "
                   f"x {len(self.config.models) + 1} models"
                   + (f"; {len(self.sliced.layers)} output layers" if self.sliced is not None else ""))
        notes = [f"note: {n}" for n in self.config.notes] + [f"guess: {g}" for g in self.guesses]
        if self.vocabulary is not None:
            v = self.vocabulary
            notes.append(f"note: output vocabulary of {len(v.vocab)} tokens ({v.rows} rows); embedding and head rows "
                         + ("kept as they are" if v.identity else "re-indexed to it, as mergekit"))
        return "\n".join(lines + ["", summary] + notes)

    def largest_group_bytes(self) -> int:
        return max((group_nbytes(g) for g in self.groups), default=0)


__all__ = ["MergePlan"]
