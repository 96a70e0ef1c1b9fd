"""PEFT adapters merged from their LoRA factors in the streamed merge (``swudi-merge``).

An expert given as a bare adapter over the base (``./lora``, or ``base+./lora`` with the same
base as ``base_model``) has, on a tensor its adapter updates, the task vector ΔW = s·B·A of
rank r (:mod:`swudi_jax.checkpoint.io.peft`). With a filtered spectral method (swudi, swudi_a,
pinv, iwudi) such a tensor is merged from the factors, through the R × R problem of
R = Σ rᵢ (:func:`swudi_jax.scale.lora.spectral_factors`), never forming an expert's m × n
ΔW nor the n × n operator C, when

- every expert is such an adapter, and each updates the tensor through ``lora_A``/``lora_B``
  (a tensor only some adapters touch, an embedding's ``lora_embedding_A/B`` and
  ``modules_to_save`` are densified and merged as before);
- the tensor is one 2-D linear weight of the plan (no scan stack, no folded input axes);
- N·r_max ≤ n (otherwise the dense problem is no larger).

The merged tensor θ0 + s·B′A′ equals the densified merge to float rounding: the densified
path rounds each expert θ0 + ΔW to the base's dtype before subtracting θ0 again, which for a
float32 base is float32 rounding (for a bfloat16 base the factor path keeps the ΔW that
rounding loses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from swudi_jax.checkpoint.config import MergeConfig
from swudi_jax.checkpoint.io import peft
from swudi_jax.checkpoint.io.reader import CheckpointReader
from swudi_jax.checkpoint.merge_plan import MergePlan
from swudi_jax.maths.linalg import compute_dtype
from swudi_jax.maths.validation import non_finite
from swudi_jax.methods.spec import Resolved
from swudi_jax.model import adapters
from swudi_jax.model.adapters import factorable
from swudi_jax.model.layout import LeafPlan
from swudi_jax.model.merger import TensorOptions, expert_weights
from swudi_jax.scale.lora import fits_factors, runs_on_factors


def adapter_readers(config: MergeConfig, experts: Sequence[CheckpointReader]) -> list[peft.LoraReader | None] | None:
    """Per expert: its :class:`~swudi_jax.checkpoint.io.peft.LoraReader` when it is a bare adapter
    over the base, None when it is the base itself (a zero task vector: a base that joins the
    method's inputs); None overall when some expert is anything else (a dense model, an adapter
    over another model, another orbax step), there is no base, or ``slices`` give each slice its inputs.
    """
    if not config.sources or not config.has_base or config.modules is not None:  # slices: per-slice inputs
        return None
    base = config.sources[0]
    out: list[peft.LoraReader | None] = []
    for source, reader in zip(config.sources[1:], experts):
        reader = getattr(reader, "inner", reader)  # under a vocabulary view (vocab_rows): its tensors stay the adapter's
        same_base = (source.path, source.step, source.item) == (base.path, base.step, base.item)
        if not same_base:
            return None
        if source.adapter is None:
            out.append(None)
        elif isinstance(reader, peft.LoraReader):
            out.append(reader)
        else:
            return None
    return out


def check_factors_finite(readers: Sequence[peft.LoraReader | None], paths: Sequence[str]) -> None:
    """NaN/Inf in a factor the merge will read: a ValueError naming the adapter file and tensor."""
    for reader in readers:
        for path in paths:
            update = None if reader is None else reader.updates.get(path)
            for which, value in (() if update is None else (("lora_A", update.a), ("lora_B", update.b))):
                found = non_finite(value)
                if found is not None:
                    raise ValueError(f"{reader.file}: the {which} factor of {path!r} contains {found[0]} NaN/Inf "
                                     f"value(s); first at index {found[1]}")


def stored_pair(update: peft.LoraUpdate, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(Bs, As) with the stored tensor's ΔW = Bs As, LoRA's scale folded into Bs."""
    b, a = update.b.astype(dtype), update.a.astype(dtype)
    if update.transpose:  # ΔW = s (B A)ᵀ = (s Aᵀ) Bᵀ
        return update.scaling * a.T, b.T
    return update.scaling * b, a


def maths_pair(update: peft.LoraUpdate, plan: LeafPlan, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(Bm, Am) with the tensor's maths-layout ΔW (m outputs, n inputs) = Bm Am."""
    return adapters.maths_pair(plan, *stored_pair(update, dtype))


@dataclass
class FactorMerge:
    """The tensors a streamed merge takes from the LoRA factors, and how (see the module docstring).

    Attributes:
      readers: the experts' adapter readers; resolved: the method; resolver: per-tensor options.
      work: the compute dtype; paths: the tensors merged from the factors (empty: none).
    """

    readers: Sequence[peft.LoraReader] = ()
    resolved: Resolved | None = None
    resolver: TensorOptions | None = None
    work: str = "float32"
    paths: frozenset[str] = field(default_factory=frozenset)

    def merge(self, plans: Sequence[LeafPlan], base_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """θ0 + s·B′A′ for each of ``plans`` (all in :attr:`paths`), on the host in the base's dtype."""
        out = {}
        for plan in plans:
            base = base_arrays[plan.path]
            dtype = compute_dtype(base.dtype, requested=self.work, defined_in=self.resolved.spec.compute_dtypes)
            weights = expert_weights(self.resolved, plan, len(self.readers), self.resolver)
            pairs = [stored_pair(r.updates[plan.path], dtype) for r in self.readers]
            out[plan.path] = np.asarray(adapters.merge_from_factors(plan, base, pairs, self.resolved, weights, dtype))
        return out

    def unchanged(self, i: int, keys: Sequence[str]) -> bool:
        """Whether expert i's ΔW is zero on every key of ``keys`` it is merged from factors on."""
        updates = self.readers[i].updates if self.readers else {}
        return all(not (np.any(updates[k].a) and np.any(updates[k].b)) for k in keys if k in self.paths)


def _never(_key: str) -> bool:
    return False


def plan_factor_merge(config: MergeConfig, plan: MergePlan, experts: Sequence[CheckpointReader], resolved: Resolved,
                      resolver: TensorOptions | None, work: str) -> FactorMerge:
    """Which tensors of ``plan`` merge from the adapters' factors (an empty :class:`FactorMerge`
    when none: no spectral method, or some expert not an adapter over the base)."""
    readers = adapter_readers(config, experts)
    if readers is None or any(r is None for r in readers) or not runs_on_factors(resolved):
        return FactorMerge()
    paths = []
    for p in plan.plans:
        updates = [r.updates.get(p.path) for r in readers]
        if not factorable(p) or any(u is None or u.embedding for u in updates):
            continue
        if any(p.path in r.replaced for r in readers) or any(getattr(e, "changes", _never)(p.path) for e in experts):
            continue  # replaced whole, or rows re-indexed to a new vocabulary (not base + ΔW): densified
        if fits_factors(len(readers), max(u.a.shape[0] for u in updates), p.maths_shape[1]):
            paths.append(p.path)
    check_factors_finite(readers, paths)
    return FactorMerge(readers, resolved, resolver, work, frozenset(paths))


__all__ = ["FactorMerge", "adapter_readers", "check_factors_finite", "expert_weights", "factorable", "maths_pair",
           "plan_factor_merge", "stored_pair"]
