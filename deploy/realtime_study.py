"""The latency-hiding study's real-link runs and its report (docs/results/realtime.md).

`measure`: every bundle of a models/realtime_sweep.py study runs `splitedge measure --loop
realtime` on real shaped links (tbf by default): the plain policy on every link (real-time
hold), each delay-aware or chunk policy on the link it was trained for. Resumable: a run
whose results.json exists is skipped.

`report`: per task, link and strategy, the interquartile mean across seeds with its 95%
stratified-bootstrap interval (deploy/iqm.py) of the return under the link's delay
(models/delay_eval.py, simulated ticks, 20 episodes per seed) and normalised between the
random policy (0) and the sync loop (1); beside it the real-link return, stale-tick share
and action-age percentiles from `measure`; a check of the goal (a strategy keeps >= 90%
of sync where hold keeps < 50%, on links of 3 or more control periods); and a plot of the
normalised return against the round trip per strategy. Beside the strategies, each link's
ceiling: the plain policy turn by turn but acting only from the tick its first reply
could arrive (before it the default action), the most any latency hiding can keep there.

    python -m deploy.realtime_study measure --runs runs/realtime --links wifi,dsl,3g,satellite
    python -m deploy.realtime_study report --runs runs/realtime \\
        --markdown docs/results/realtime.md --plot docs/results/realtime_return_vs_rtt.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from deploy.iqm import Interval, iqm_interval
from deploy.link.profiles import get_profile

STRATEGIES = ("hold", "delay-aware", "chunk", "distilled")
CEILING = "ceiling"  # not a strategy: the plain policy acting only from its first reply's tick
GOAL_TICKS, GOAL_KEEP, HOLD_BELOW = 3, 0.9, 0.5


def _studies(runs: Path) -> list[Path]:
    return sorted(p.parent for p in runs.glob("*/summary.json"))


def _record(run: Path) -> dict[str, Any]:
    """A run's training: its seed and its latency-hiding record ({} for a plain policy)."""
    result = json.loads((run / "result.json").read_text())
    return {"seed": int(result["config"]["seed"]), **(result.get("realtime") or {})}


def _strategy(record: dict[str, Any]) -> str:
    if record.get("distilled_from"):  # delay-aware, learnt by imitation (delay_distill.py)
        return "distilled"
    return str(record.get("strategy") or "hold")  # a plain policy holds the newest action


def _bundles(study: Path, links: list[str]) -> list[tuple[Path, list[str]]]:
    """(run dir, links to measure it on): plain runs on every link, the others on the link
    their training record names."""
    out = []
    for run in sorted(p.parent.parent for p in study.glob("*/bundle/manifest.json")):
        record = _record(run)
        on = [record["link"]] if record.get("link") else links
        out.append((run, [link for link in on if link in links]))
    return [(run, on) for run, on in out if on]


def measure(args: argparse.Namespace) -> int:
    """Run the missing real-link measurements, one `splitedge measure` per bundle."""
    links = args.links.split(",")
    for study in _studies(args.runs):
        hz = json.loads((study / "summary.json").read_text())["control_hz"]
        for run, on in _bundles(study, links):
            out = run / f"measure-{'-'.join(on)}"
            if (out / "results.json").exists():
                continue
            cmd = [
                sys.executable, "-m", "splitedge", "measure", "--bundle", str(run / "bundle"),
                "--links", ",".join(on), "--modes", "split", "--loop", "realtime",
                "--link-backend", args.link_backend, "--steps", str(args.steps),
                "--control-hz", str(hz), "--out", str(out), "--no-progress",
                *(["--links-file", args.links_file] if args.links_file else []),
            ]  # fmt: skip
            print(f"measure {run.name} on {','.join(on)}", flush=True)
            with (run / "measure.log").open("ab") as log:
                code = subprocess.run(cmd, stdout=log, stderr=log, check=False).returncode
            if code != 0:
                print(f"  failed (rc={code}): see {run / 'measure.log'}", flush=True)
    return 0


def _measured(study: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(strategy, link, seed) -> the real-time row of `measure`."""
    out = {}
    for path in study.glob("*/measure-*/results.json"):
        record = _record(path.parent.parent)
        for row in json.loads(path.read_text()).get("realtime", []):
            out[(_strategy(record), row["link"], record["seed"])] = row
    return out


def _iqm(values: list[float]) -> Interval | None:
    return iqm_interval(values) if values else None


def _text(iv: Interval | None, digits: int = 1) -> str:
    return f"{iv.text(digits)} (n={iv.n})" if iv else "-"


def _median(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f}" if values else "-"


def study_rows(study: Path, links_file: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary and one row per (link, strategy), with sync first."""
    summary = json.loads((study / "summary.json").read_text())
    sync = [v for v in summary["sync"].values() if v is not None]
    random = [v for v in summary["random"].values() if v is not None]
    if not sync or not random:
        raise SystemExit(f"{study}: no sync or random returns yet; run the sweep first")
    ref, floor = iqm_interval(sync).iqm, statistics.mean(random)

    def norm(values: list[float]) -> list[float]:
        return [(v - floor) / (ref - floor) for v in values]

    measured = _measured(study)
    rows = [{"link": "none (sync)", "rtt_ms": 0.0, "ticks": 0, "strategy": "sync",
             "returns": sync, "norm": norm(sync), "real": []}]  # fmt: skip
    for link, cell in summary["links"].items():
        for strategy in (*STRATEGIES, CEILING):
            per_seed = {int(s): v for s, v in cell.get(strategy, {}).items() if v is not None}
            if not per_seed:
                continue
            real = [
                measured[(strategy, link, s)] for s in per_seed if (strategy, link, s) in measured
            ]
            d = cell["delay_ticks_max"]
            kept = {"known": "device-kept", "server": "server-kept"}
            who = ", ".join(kept.get(h, h) for h in cell.get("delay-aware-history", []))
            label = {"hold": "hold",
                     "delay-aware": f"delay-aware, RL (history {d}{', ' + who if who else ''})",
                     "chunk": f"chunk {cell['chunk_length']}",
                     "distilled": f"delay-aware, distilled (history {d}, server-kept)",
                     CEILING: "ceiling: sync from the first reply's tick"}[strategy]  # fmt: skip
            rows.append({
                "link": link, "rtt_ms": get_profile(link, links_file).rtt_ms,
                "ticks": cell["delay_ticks_max"], "strategy": strategy, "label": label,
                "returns": list(per_seed.values()), "norm": norm(list(per_seed.values())),
                "real": real,
            })  # fmt: skip
    for r in rows:  # the bootstrap once per row: the table, goal and plot all read it
        r["norm_iv"] = iqm_interval(r["norm"])
    summary["sync_iqm"], summary["random_mean"] = ref, floor
    return summary, rows


def markdown(studies: list[tuple[dict[str, Any], list[dict[str, Any]]]], command: str) -> str:
    """docs/results/realtime.md."""
    lines = ["# Real-time control over slow links: what latency costs, and what hides it", "",
             f"Produced by `{command}` (see the recipe at the end).", ""]  # fmt: skip
    for summary, rows in studies:
        hz = summary["control_hz"]
        lines += [
            f"## {summary['task']} ({summary['algo'].upper()}), {hz:g} Hz control "
            f"({1000 / hz:g} ms a tick)", "",
            f"{summary['timesteps']} training steps per RL policy"
            + (f", {summary['distill_timesteps']} env steps per distillation"
               if summary.get("distill_timesteps") else "")
            + "; each seed's return is the mean "
            f"of {summary['episodes']} deterministic episodes. Normalised: 0 = random policy "
            f"(mean {summary['random_mean']:.1f}), 1 = the sync loop (IQM {summary['sync_iqm']:.1f}). "
            "IQM [95% stratified-bootstrap CI] over seeds.", "",
            "| link | RTT ms | delay ticks (max) | strategy | normalised (simulated) | return (simulated) "
            "| return on the link (tbf) | stale share | action age p50 / p95 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in rows:
            real = r["real"]
            lines.append(
                f"| {r['link']} | {r['rtt_ms']:g} | {r['ticks']} | {r.get('label', r['strategy'])} "
                f"| {_text(r['norm_iv'], 2)} | {_text(_iqm(r['returns']))} "
                f"| {_text(_iqm([x['episode_return'] for x in real]))} "
                f"| {_median([x['stale_share'] for x in real])} "
                f"| {_median([x['age_p50'] for x in real], 0)} / {_median([x['age_p95'] for x in real], 0)} |"
            )  # fmt: skip
        lines += ["", *goal_lines(rows), ""]
    return "\n".join(lines) + "\n"


def goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The goal, link by link where the round trip is 3 or more ticks."""
    out = [f"Goal (links of {GOAL_TICKS}+ ticks): a strategy keeps >= {GOAL_KEEP:.0%} of sync "
           f"(normalised IQM) where hold keeps < {HOLD_BELOW:.0%}:", ""]  # fmt: skip
    for link in dict.fromkeys(r["link"] for r in rows if r["ticks"] >= GOAL_TICKS):
        cell = {r["strategy"]: r["norm_iv"].iqm for r in rows if r["link"] == link}
        ceiling = cell.pop(CEILING, None)
        hold = cell.get("hold")
        best = max(((v, s) for s, v in cell.items() if s != "hold"), default=None)
        if hold is None or best is None:
            held = f"hold keeps {hold:.2f}; " if hold is not None else ""
            out.append(f"- {link}: {held}no latency-hiding policy trained for this link")
            continue
        cap = f" (ceiling {ceiling:.2f})" if ceiling is not None else ""
        if hold >= HOLD_BELOW:  # the goal is about links where holding fails
            verdict = "outside the goal's terms: hold already keeps half"
        elif best[0] >= GOAL_KEEP:
            verdict = "**met**"
        elif ceiling is not None and ceiling < GOAL_KEEP:
            verdict = f"**not met**, and unreachable: the ceiling is below {GOAL_KEEP:.0%}"
        else:
            verdict = "**not met**"
        out.append(
            f"- {link}: hold keeps {hold:.2f}, best {best[1]} keeps {best[0]:.2f}{cap}: {verdict}"
        )
    return out


def plot(studies: list[tuple[dict[str, Any], list[dict[str, Any]]]], path: Path) -> None:
    """Normalised return (IQM, 95% CI) against the link's round trip, a line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4), squeeze=False)
    for ax, (summary, rows) in zip(axes[0], studies, strict=True):
        for strategy in (*STRATEGIES, CEILING):
            pts = sorted((r["rtt_ms"], r["norm_iv"]) for r in rows if r["strategy"] == strategy)
            if pts:
                x = [p[0] for p in pts]
                y = [p[1].iqm for p in pts]
                err = [[p[1].iqm - p[1].lo for p in pts], [p[1].hi - p[1].iqm for p in pts]]
                style = {"ls": ":", "color": "black"} if strategy == CEILING else {}
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=strategy, **style)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="sync")
        ax.axhline(0.0, color="grey", lw=0.8, ls=":", label="random")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_xlabel("link round trip (ms)")
        ax.set_ylabel("normalised return (IQM, 95% CI)")
        ax.set_title(f"{summary['task']} {summary['algo'].upper()} at {summary['control_hz']:g} Hz")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(args: argparse.Namespace) -> int:
    studies = [study_rows(s, args.links_file) for s in _studies(args.runs)]
    if not studies:
        print(f"realtime_study: no summary.json under {args.runs}; run models.realtime_sweep")
        return 2
    command = "python -m deploy.realtime_study report " + " ".join(sys.argv[2:])
    text = markdown(studies, command)
    if args.plot:
        plot(studies, args.plot)
        text += f"\n![normalised return against round trip]({args.plot.name})\n"
    if args.markdown:
        args.markdown.write_text(text + (args.recipe.read_text() if args.recipe else ""))
    print(text)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="real-link real-time runs of every study bundle")
    m.add_argument("--runs", type=Path, default=Path("runs/realtime"))
    m.add_argument("--links", default="wifi,dsl,3g,satellite")
    m.add_argument("--links-file", default=None)
    m.add_argument("--link-backend", default="tbf")
    m.add_argument("--steps", type=int, default=600, help="ticks per link and bundle")
    r = sub.add_parser("report", help="statistics, goal check, plot and markdown")
    r.add_argument("--runs", type=Path, default=Path("runs/realtime"))
    r.add_argument("--links-file", default=None)
    r.add_argument("--markdown", type=Path, default=None)
    r.add_argument("--plot", type=Path, default=None)
    r.add_argument("--recipe", type=Path, default=None, help="markdown appended at the end")
    args = ap.parse_args()
    return measure(args) if args.cmd == "measure" else report(args)


if __name__ == "__main__":
    raise SystemExit(main())
