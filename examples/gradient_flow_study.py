"""Gradient descent on WUDI's loss is a spectral filter: a numerical study.

For each of a few synthetic layers (low-rank-plus-noise task vectors, fixed seed) this runs
the iterative WUDI baseline with ``optax.sgd(η)`` and ``optax.adam(lr)`` and reads every
iterate θ_k in the eigenbasis of C = V diag(λ) Vᵀ. With A = (θ* − θ0) V (θ* = D C⁺) and
B_k = (θ_k − θ0) V, the *empirical filter* of an iterate is, per direction j,

    ĥ_j(k) = ⟨B_k[:, j], A[:, j]⟩ / ‖A[:, j]‖²,

so that θ_k = θ0 + (θ* − θ0) V diag(ĥ) Vᵀ exactly when θ_k is a filtered estimator. MATH.md §5:

- SGD is the Landweber filter ĥ_j(k) = 1 − (1 − 2ηλ_j)^k, to rounding (float64 here);
- as η → 0 with t = 2ηk it approaches the exponential filter 1 − exp(−λ t) with error O(η)
  (the table repeats the run with η/2 and 2k steps: the gap halves);
- Adam is not a linear filter: its iterates leave a part of B_k that no per-direction scalar
  explains (``adam_non_filter_fraction``); the best exponential filter, t_eff, is fitted.

Outputs in ``--out``: ``gradient_flow_study.csv`` and ``.json`` (the table, also printed) and
``gradient_flow_study.png`` (needs matplotlib: ``pip install 'swudi_jax[plot]'``).

    python examples/gradient_flow_study.py --out study --steps 200 --eta 0.05
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import jax
import numpy as np
import optax

import swudi_jax as sj
from swudi_jax.maths import filters

DEFAULT_SHAPES = "4x32x48,4x48x32,6x8x64"
"""(N, m, n) per layer: wide, tall, and N·m < n (C rank-deficient)."""
PLOT_INSTALL_HINT = "matplotlib is not installed: pip install 'swudi_jax[plot]' (or pip install matplotlib) for the PNG"


def synthetic_layer(seed: int, n_tasks: int, m: int, n: int, noise: float = 0.05) -> np.ndarray:
    """Low-rank-plus-noise task vectors (N, m, n) in float64, like fine-tuning deltas."""
    rng = np.random.default_rng(seed)
    rank = max(1, min(m, n) // 4)
    tau = [rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) / math.sqrt(rank * n)
           + noise * rng.normal(size=(m, n)) / math.sqrt(n) for _ in range(n_tasks)]
    return np.stack(tau)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """"4x32x48,6x8x64" -> [(4, 32, 48), (6, 8, 64)]."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[0]) < 2:
            raise ValueError(f"--shapes entries must look like NxMxK with N >= 2, got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def snapshot_steps(steps: int, count: int = 4) -> list[int]:
    """Roughly log-spaced steps 1 … steps to plot and tabulate."""
    picks = {max(1, round(steps ** (i / (count - 1)))) for i in range(count)} if steps > 0 else {0}
    return sorted(picks | {steps})


def rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.linalg.norm(np.asarray(got) - want) / max(np.linalg.norm(want), 1e-300))


class Layer:
    """The eigenbasis view of one layer: λ (clamped, ascending), V, θ0 and A = (θ* − θ0) V."""

    def __init__(self, tau: np.ndarray):
        self.tau = tau
        eq = sj.normal_equation(tau)
        lam, v = (np.asarray(x) for x in sj.spectrum(eq.c))
        self.lam, self.v, self.theta0 = lam, v, np.asarray(eq.theta0)
        self.a = np.asarray(eq.d) @ v / lam - self.theta0 @ v  # (θ* − θ0) V
        col = np.linalg.norm(self.a, axis=0)
        # C's null directions sit at the clamp, where A holds only rounding divided by 1e-8
        self.active = (lam > filters.EIG_FLOOR) & (col > 1e-6 * col.max())

    def coefficients(self, theta: np.ndarray) -> np.ndarray:
        """B = (θ − θ0) V."""
        return (np.asarray(theta) - self.theta0) @ self.v

    def empirical_filter(self, theta: np.ndarray) -> np.ndarray:
        """ĥ_j = ⟨B_j, A_j⟩ / ‖A_j‖² on the active directions (NaN elsewhere)."""
        b = self.coefficients(theta)
        h = np.full(self.lam.shape, np.nan)
        a = self.a[:, self.active]
        h[self.active] = np.sum(b[:, self.active] * a, axis=0) / np.sum(a * a, axis=0)
        return h

    def non_filter_fraction(self, theta: np.ndarray) -> float:
        """Share of ‖θ − θ0‖² that no per-direction filter explains (0 for any θ_h)."""
        b = self.coefficients(theta)
        h = np.nan_to_num(self.empirical_filter(theta))
        return float(np.sum((b - self.a * h) ** 2) / max(np.sum(b * b), 1e-300))

    def fit_exponential_time(self, theta: np.ndarray) -> tuple[float, float]:
        """t_eff minimising ‖θ − θ_exp(t)‖ (a log grid, then a finer one around its best point),
        and that residual relative to ‖θ − θ0‖."""
        b = self.coefficients(theta)
        # ‖B − A diag(h)‖² = ‖B‖² − 2 Σ_j h_j⟨B_j, A_j⟩ + Σ_j h_j²‖A_j‖²,  h = 1 − exp(−λ t)
        cross, norm_a, norm_b = np.sum(b * self.a, axis=0), np.sum(self.a**2, axis=0), np.sum(b * b)

        def best_of(times):
            h = -np.expm1(-np.outer(times, self.lam))
            residual = norm_b - 2 * h @ cross + (h**2) @ norm_a
            i = int(np.argmin(residual))
            return i, float(times[i]), float(residual[i])

        coarse = np.concatenate([[0.0], np.logspace(-4, 7, 1101)])
        i, t, _ = best_of(coarse)
        _, t, residual = best_of(np.linspace(coarse[max(i - 1, 0)], coarse[min(i + 1, coarse.size - 1)], 401))
        return t, math.sqrt(max(residual, 0.0) / max(norm_b, 1e-300))


def study_layer(index: int, tau: np.ndarray, steps: int, eta: float, adam_lr: float) -> dict:
    """Runs SGD, Adam and the filters on one layer; returns its table row and plot data."""
    layer = Layer(tau)
    sgd_final, sgd_path = sj.wudi_gd(tau, optimizer=optax.sgd(eta), steps=steps, gradient="gram",
                                     trajectory_every=1)
    adam_final, adam_path = sj.wudi_gd(tau, optimizer=optax.adam(adam_lr), steps=steps, gradient="gram",
                                       trajectory_every=1)
    picks = snapshot_steps(steps)
    landweber_gap = max(rel_err(sgd_path[k], sj.spectral_merge(tau, filters.landweber(eta, k))) for k in picks)
    landweber_filter_gap = max(
        float(np.nanmax(np.abs(layer.empirical_filter(sgd_path[k]) - np.asarray(filters.landweber(eta, k)(layer.lam)))))
        for k in picks)
    time = 2.0 * eta * steps
    flow = sj.spectral_merge(tau, filters.exponential(time))
    # the same t with η/2 and 2k steps: the gap to the flow should halve (O(η))
    half_eta = sj.wudi_gd(tau, optimizer=optax.sgd(eta / 2), steps=2 * steps, gradient="gram")
    t_eff, adam_fit = layer.fit_exponential_time(adam_final)
    n_tasks, m, n = tau.shape
    row = {
        "layer": index, "N": n_tasks, "m": m, "n": n,
        "rank_C": int(np.sum(layer.lam > filters.EIG_FLOOR)), "lambda_max": float(layer.lam[-1]),
        "steps": steps, "eta": eta, "t=2*eta*k": time,
        "sgd_vs_landweber_rel_err": landweber_gap,
        "sgd_filter_vs_landweber_max_abs": landweber_filter_gap,
        "sgd_non_filter_fraction": layer.non_filter_fraction(sgd_final),
        "sgd_vs_exponential_rel_err": rel_err(sgd_final, flow),
        "sgd_half_eta_vs_exponential_rel_err": rel_err(half_eta, flow),
        "adam_lr": adam_lr, "adam_t_eff": t_eff, "adam_exp_fit_residual": adam_fit,
        "adam_non_filter_fraction": layer.non_filter_fraction(adam_final),
    }
    plot = {
        "lam": layer.lam, "active": layer.active, "picks": picks, "eta": eta,
        "sgd": {k: layer.empirical_filter(sgd_path[k]) for k in picks},
        "adam": {k: layer.empirical_filter(adam_path[k]) for k in picks},
        "adam_t_eff": {k: layer.fit_exponential_time(adam_path[k])[0] for k in picks},
    }
    return {"row": row, "plot": plot}


def write_table(rows: list[dict], out: Path) -> None:
    with open(out / "gradient_flow_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "gradient_flow_study.json").write_text(json.dumps(rows, indent=2))


def print_table(rows: list[dict]) -> None:
    cols = ["layer", "N", "m", "n", "rank_C", "lambda_max", "t=2*eta*k", "sgd_vs_landweber_rel_err",
            "sgd_vs_exponential_rel_err", "sgd_half_eta_vs_exponential_rel_err", "adam_t_eff",
            "adam_exp_fit_residual", "adam_non_filter_fraction"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def plot_study(results: list[dict], path: Path) -> bool:
    """One row per layer: SGD vs the Landweber and exponential filters; Adam vs its fitted t_eff."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(PLOT_INSTALL_HINT)
        return False
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.6 * len(results)), squeeze=False)
    for (ax_sgd, ax_adam), res in zip(axes, results):
        p, row = res["plot"], res["row"]
        lam, act = p["lam"], p["active"]
        grid = np.logspace(math.log10(lam[act].min()), math.log10(lam.max()), 200)
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(p["picks"])))
        for k, colour in zip(p["picks"], colours):
            ax_sgd.plot(grid, filters.landweber(p["eta"], k)(grid), color=colour, lw=1.2, label=f"Landweber k={k}")
            ax_sgd.plot(grid, -np.expm1(-grid * 2 * p["eta"] * k), color=colour, lw=1, ls="--")
            ax_sgd.plot(lam[act], p["sgd"][k][act], "o", color=colour, ms=3)
            t_eff = p["adam_t_eff"][k]
            ax_adam.plot(grid, -np.expm1(-grid * t_eff), color=colour, lw=1, ls=":", label=f"k={k}, t_eff={t_eff:.3g}")
            ax_adam.plot(lam[act], p["adam"][k][act], "x", color=colour, ms=4)
        shape = f"layer {row['layer']}: N={row['N']}, m={row['m']}, n={row['n']}"
        ax_sgd.set_title(f"{shape}\nSGD η={row['eta']:g}: dots ĥ_j, lines Landweber, dashed exp(t=2ηk)", fontsize=9)
        ax_adam.set_title(f"{shape}\nAdam lr={row['adam_lr']:g}: crosses ĥ_j, dotted fitted exp(t_eff)", fontsize=9)
        for ax in (ax_sgd, ax_adam):
            ax.set_xscale("log")
            ax.set_xlabel("eigenvalue λ_j of C")
            ax.set_ylabel("h(λ_j)  /  projection coefficient ĥ_j")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_study(out: Path, shapes: list[tuple[int, int, int]], steps: int, eta: float, adam_lr: float,
              seed: int = 0, plot: bool = True) -> list[dict]:
    """The whole study in float64; writes the table (CSV, JSON) and the PNG; returns the rows."""
    out.mkdir(parents=True, exist_ok=True)
    with jax.enable_x64(True):
        results = [study_layer(i, synthetic_layer(seed + i, *shape), steps, eta, adam_lr)
                   for i, shape in enumerate(shapes)]
    rows = [r["row"] for r in results]
    for row in rows:
        if 2 * row["eta"] * row["lambda_max"] >= 2:
            print(f"note: layer {row['layer']}: 2ηλ_max = {2 * row['eta'] * row['lambda_max']:.3g} >= 2, "
                  "so SGD (and the Landweber filter) diverge; pick a smaller --eta")
    write_table(rows, out)
    print_table(rows)
    if plot and plot_study(results, out / "gradient_flow_study.png"):
        print(f"plot: {out / 'gradient_flow_study.png'}")
    print(f"table: {out / 'gradient_flow_study.csv'}, {out / 'gradient_flow_study.json'}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gradient_flow_study"), help="output folder")
    parser.add_argument("--steps", type=int, default=200, help="gradient steps k (default 200)")
    parser.add_argument("--eta", type=float, default=0.05, help="SGD step η; stable while 2ηλ_max < 2 (λ_max ≤ N)")
    parser.add_argument("--adam-lr", type=float, default=1e-3,
                        help="Adam learning rate (default 1e-3; the WUDI reference uses 1e-5, a far smaller move)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="layers as NxMxK,... (N experts, m outputs, n inputs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not (math.isfinite(args.eta) and args.eta > 0 and math.isfinite(args.adam_lr) and args.adam_lr > 0):
        parser.error(f"--eta and --adam-lr must be finite and > 0, got {args.eta}, {args.adam_lr}")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        parser.error(str(exc))
    return run_study(args.out, shapes, args.steps, args.eta, args.adam_lr, args.seed, plot=not args.no_plot)


if __name__ == "__main__":
    main()
