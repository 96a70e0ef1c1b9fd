"""Fine-tune one all-MiniLM-L6-v2 expert per task and cache it as Hugging Face safetensors.

    python -m benchmarks.minilm.finetune [--cache DIR] [--tasks bbc tweets movies source]

Per task: a linear probe (softmax regression on the frozen, mean-pooled pretrained
embedding), then full fine-tuning of encoder and head together (AdamW, linear warm-up and
decay, no dropout). Each expert lands in ``DIR/<task>/``: ``model.safetensors`` with exactly
the tensor names and layout of the pretrained ``model.safetensors`` (so ``swudi-merge`` reads
it like any HF checkpoint), ``head.safetensors`` (``classifier.weight`` (C, 384),
``classifier.bias``), and ``metrics.json``. ``DIR/manifest.json`` records a SHA-256 over the
pretrained weights, every task's split contents and the fine-tuning settings; a cache made
from another model, task set or settings is refused, never silently reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.minilm import bert
from benchmarks.minilm.data import TASK_NAMES, Task, TaskSpec, load_task, task_fingerprint

DEFAULT_CACHE = Path(os.environ.get("SWUDI_MINILM_CACHE", Path(__file__).resolve().parent / "cache"))


class CacheMismatchError(ValueError):
    """The cache folder was made from another model, task set or fine-tuning settings."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings (all recorded in the cache hash)."""

    max_len: int = 40
    batch: int = 32
    steps: int = 150
    lr: float = 2e-4
    warmup: float = 0.1
    probe_steps: int = 200
    probe_lr: float = 1e-2
    probe_examples: int = 1000
    seed: int = 0
    split_seed: int = 0


def cache_key(model_sha: str, fingerprints: dict[str, str], config: FinetuneConfig,
              specs: dict[str, TaskSpec | None]) -> str:
    """SHA-256 over the pretrained weights' hash, the tasks' split hashes and the settings."""
    record = {"model": model_sha, "tasks": fingerprints, "config": dataclasses.asdict(config),
              "specs": {k: (dataclasses.asdict(v) if v else None) for k, v in specs.items()}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def check_manifest(cache: Path, key: str, tasks: list[str], config: FinetuneConfig,
                   specs: dict[str, TaskSpec | None]) -> None:
    """Refuse a cache whose recorded key differs; write the manifest on first use."""
    manifest = cache / "manifest.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if recorded.get("key") != key:
            raise CacheMismatchError(
                f"{manifest} was made from a different model, task set or fine-tuning settings "
                f"(recorded key {recorded.get('key', '?')[:12]}…, tasks {recorded.get('tasks')}; "
                f"now {key[:12]}…, tasks {tasks}); refusing to reuse it: pass another --cache "
                "folder or delete this one")
        return
    cache.mkdir(parents=True, exist_ok=True)
    record = {"key": key, "tasks": tasks, "config": dataclasses.asdict(config),
              "specs": {k: (dataclasses.asdict(v) if v else None) for k, v in specs.items()}}
    _write_atomic(manifest, json.dumps(record, indent=2).encode())


def _write_atomic(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` to ``path`` atomically (temp name, then rename)."""
    from safetensors.numpy import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def linear_probe(features: np.ndarray, labels: np.ndarray, classes: int, config: FinetuneConfig) -> dict:
    """Softmax regression on frozen embeddings (full-batch Adam): the head fine-tuning starts from."""
    key = jax.random.PRNGKey(config.seed)
    head = {"classifier.weight": 0.02 * jax.random.normal(key, (classes, features.shape[1])),
            "classifier.bias": jnp.zeros((classes,))}
    opt = optax.adam(config.probe_lr)
    x, y = jnp.asarray(features), jnp.asarray(labels)

    def loss(h):
        return cross_entropy(x @ h["classifier.weight"].T + h["classifier.bias"], y)

    @jax.jit
    def step(h, state):
        grads = jax.grad(loss)(h)
        updates, state = opt.update(grads, state, h)
        return optax.apply_updates(h, updates), state

    state = opt.init(head)
    for _ in range(config.probe_steps):
        head, state = step(head, state)
    return {k: np.asarray(v) for k, v in head.items()}


def make_train_step(cfg: bert.BertConfig, opt: optax.GradientTransformation):
    """One jitted AdamW step on (encoder params, head) for a batch of token ids."""

    def loss(params, head, ids, mask, labels):
        return cross_entropy(bert.classify(params, head, ids, mask, cfg), labels)

    @jax.jit
    def step(params, head, state, ids, mask, labels):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(params, head, ids, mask, labels)
        updates, state = opt.update(grads, state, (params, head))
        params, head = optax.apply_updates((params, head), updates)
        return params, head, state, value

    return step


def accuracy(params, head, ids, mask, labels, cfg) -> float:
    return float((bert.predict(params, head, ids, mask, cfg) == labels).mean())


def finetune_task(task: Task, base: dict, cfg: bert.BertConfig, tokenizer, config: FinetuneConfig,
                  log=print) -> tuple[dict, dict, dict]:
    """Probe, then fine-tune; returns (encoder tensors, head tensors, metrics)."""
    tr_ids, tr_mask = bert.tokenize(tokenizer, task.train.texts)
    va_ids, va_mask = bert.tokenize(tokenizer, task.val.texts)
    te_ids, te_mask = bert.tokenize(tokenizer, task.test.texts)
    n_probe = min(config.probe_examples, len(tr_ids))
    t0 = time.perf_counter()
    feats = bert.embed(base, tr_ids[:n_probe], tr_mask[:n_probe], cfg)
    head = linear_probe(feats, task.train.labels[:n_probe], len(task.classes), config)
    probe_val = accuracy(base, head, va_ids, va_mask, task.val.labels, cfg)
    log(f"[{task.name}] linear probe: val acc {probe_val:.3f} ({time.perf_counter() - t0:.0f}s)")

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, max(1, int(config.warmup * config.steps)), config.steps, end_value=0.0)
    opt = optax.adamw(schedule, weight_decay=0.0)
    step = make_train_step(cfg, opt)
    params = {k: jnp.asarray(v) for k, v in base.items()}
    head_j = {k: jnp.asarray(v) for k, v in head.items()}
    state = opt.init((params, head_j))
    rng = np.random.default_rng(config.seed)
    order, cursor = rng.permutation(len(tr_ids)), 0
    for i in range(config.steps):
        if cursor + config.batch > len(order):
            order, cursor = rng.permutation(len(tr_ids)), 0
        idx = order[cursor:cursor + config.batch]
        cursor += config.batch
        params, head_j, state, value = step(params, head_j, state, tr_ids[idx], tr_mask[idx],
                                            task.train.labels[idx])
        if (i + 1) % 25 == 0 or i + 1 == config.steps:
            log(f"[{task.name}] step {i + 1}/{config.steps} loss {float(value):.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    encoder = {k: np.asarray(v) for k, v in params.items()}
    head_np = {k: np.asarray(v) for k, v in head_j.items()}
    metrics = {
        "probe_val_acc": probe_val,
        "expert_val_acc": accuracy(encoder, head_np, va_ids, va_mask, task.val.labels, cfg),
        "expert_test_acc": accuracy(encoder, head_np, te_ids, te_mask, task.test.labels, cfg),
        "pretrained_with_expert_head_test_acc": accuracy(base, head_np, te_ids, te_mask, task.test.labels, cfg),
        "relative_delta_norm": float(np.sqrt(sum(np.sum((encoder[k] - base[k]) ** 2) for k in base))
                                     / np.sqrt(sum(np.sum(base[k] ** 2) for k in base))),
        "seconds": time.perf_counter() - t0,
    }
    log(f"[{task.name}] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return encoder, head_np, metrics


def prepare_cache(cache: Path, tasks: list[str], config: FinetuneConfig,
                  specs: dict[str, TaskSpec | None] | None = None, log=print) -> dict[str, Path]:
    """Fine-tune (once) every task's expert into ``cache``; returns ``{task: expert folder}``."""
    specs = specs or {t: None for t in tasks}
    folder = bert.model_dir()
    base_file = folder / "model.safetensors"
    loaded = {t: load_task(t, config.split_seed, specs.get(t)) for t in tasks}
    key = cache_key(bert.file_sha256(base_file), {t: task_fingerprint(loaded[t]) for t in tasks}, config, specs)
    check_manifest(cache, key, tasks, config, specs)
    cfg = bert.BertConfig.from_json(folder / "config.json")
    all_tensors = bert.load_tensors(base_file, floats_only=False)
    base = {k: v for k, v in all_tensors.items() if np.issubdtype(v.dtype, np.floating)}
    tokenizer = bert.load_tokenizer(folder, config.max_len)
    out = {}
    for name in tasks:
        expert_dir = cache / name
        out[name] = expert_dir
        if (expert_dir / "metrics.json").is_file():
            log(f"[{name}] cached in {expert_dir}")
            continue
        expert_dir.mkdir(parents=True, exist_ok=True)
        encoder, head, metrics = finetune_task(loaded[name], base, cfg, tokenizer, config, log)
        save_safetensors(expert_dir / "model.safetensors", {**all_tensors, **encoder})
        save_safetensors(expert_dir / "head.safetensors", head)
        metrics.update(task=name, classes=list(loaded[name].classes), key=key)
        _write_atomic(expert_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"expert cache folder ({DEFAULT_CACHE})")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    defaults = FinetuneConfig()
    for field in dataclasses.fields(FinetuneConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    args = parser.parse_args(argv)
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)})
    try:
        prepare_cache(args.cache, args.tasks, config, log=lambda s: print(s, flush=True))
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
