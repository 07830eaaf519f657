"""``python -m loadtest run``: run profiles against meshsync (and the baseline), write
the report, print the summary.

Exit status: 0 when meshsync converged with no lost write and every expected
conflict logged in every profile — and for ``faults`` also no delete undone,
no invented content, no conflict between writes that saw each other, the same
conflict log on every node and an empty node's join that changed nothing —;
1 when it did not (the report says how);
2 when the harness itself failed (bad flag, a cluster that did not start).
The baseline's results never change the status: it is expected to lose writes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from loadtest import procs, report
from loadtest.jsonl import ChildError
from loadtest.plan import Plan
from loadtest.profiles import PROFILES, build
from loadtest.runner import Progress as Hooks
from loadtest.runner import Runner, Settings
from loadtest.targets import LsyncdLocal, MeshLocal, Target, TargetError

DEFAULT_NET = "127.0.3"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m loadtest",
                                  description="meshsync's load-test harness (issue 7).")
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run profiles and write a report",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--target", choices=["local", "swarm"], default="local",
                     help="local: a cluster of its own on loopback; swarm: a deployed stack")
    run.add_argument("--stack", help="swarm: the stack name (docker stack deploy ... NAME)")
    run.add_argument("--service", default="agent", help="swarm: the agent service's short name")
    run.add_argument("--docker-host", action="append", default=[],
                     help="swarm: a Docker host (-H) running tasks; repeat for each")
    run.add_argument("--nodes", type=int, default=3, help="local: how many nodes")
    run.add_argument("--profile", default="quick",
                     help=f"comma-separated, or 'all': {', '.join(PROFILES)}")
    run.add_argument("--duration", type=float, help="seconds of load (default: the profile's)")
    run.add_argument("--rate", type=float, help="operations per second (default: the profile's)")
    run.add_argument("--seed", type=int, default=1, help="the workload is a function of it")
    run.add_argument("--report", type=Path,
                     help="report directory (default: loadtest/results/<profiles>-<UTC time>)")
    run.add_argument("--baseline", choices=["lsyncd", "none"], default="none",
                     help="also run the workload against plain lsyncd + rsync multi-master")
    run.add_argument("--net", default=DEFAULT_NET,
                     help="local: the 127.x.y network of the nodes and proxies")
    run.add_argument("--work", type=Path, help="local: where the nodes live (default: a temp dir)")
    run.add_argument("--keep", action="store_true", help="keep the work directory")
    run.add_argument("--wait", type=float, default=Settings.wait_s,
                     help="seconds an op waits for its node to hold the path")
    run.add_argument("--converge-timeout", type=float, default=Settings.converge_s,
                     help="seconds to wait for identical trees after the load")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    again = sub.add_parser("render", help="write a report's Markdown and charts again "
                                          "from its report.json and samples.json")
    again.add_argument("report", type=Path, help="the report directory")
    return top


def main() -> None:
    args = parser().parse_args()
    if args.command == "render":
        report.render(args.report)
        return
    try:
        code = uvloop.run(run(args))
    except (TargetError, ChildError, ValueError) as err:
        Console(stderr=True).print(f"error: {err}")
        code = 2
    except KeyboardInterrupt:
        code = 130
    finally:
        procs.sweep()
    sys.exit(code)


def profiles_of(arg: str) -> list[str]:
    names = list(PROFILES) if arg == "all" else [p.strip() for p in arg.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROFILES]
    if unknown or not names:
        raise ValueError(f"--profile {arg}: unknown {unknown}; choose from {', '.join(PROFILES)}")
    return [p for p in names if p != "all"]


def make_target(system: str, args: argparse.Namespace, work: Path, run_id: str,
                plan: Plan) -> Target:
    if args.target == "swarm":
        from loadtest.swarm import SwarmStack

        if system != "meshsync":
            raise ValueError("--baseline lsyncd needs --target local (the stack runs meshsync)")
        if not args.stack:
            raise ValueError("--target swarm needs --stack NAME")
        if plan.profile == "faults":
            raise ValueError("--profile faults needs --target local (it kills agents and "
                             "adds a node)")
        return SwarmStack(args.stack, args.service, args.docker_host, run_id)
    if system == "meshsync":
        return MeshLocal(work, args.nodes, args.net, spares=1 if plan.join else 0)
    return LsyncdLocal(work, args.nodes, args.net)


def passed(block: dict[str, Any], strict: bool) -> bool:
    """meshsync's verdict on one run (see the module's docstring)."""
    ok = block["converged"] and not block["lost_writes"] and not block["conflicts_missing"]
    if strict:
        ok = ok and not block["resurrected_deletes"] and not block.get("invented_content") \
            and not block["conflicts_unexpected"] and bool(block.get("conflict_logs_identical")) \
            and bool((block.get("join") or {}).get("ok"))
    return bool(ok)


async def run(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    names = profiles_of(args.profile)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.report or Path("loadtest/results") / f"{'-'.join(names)}-{stamp}"
    systems = ["meshsync", *(["baseline"] if args.baseline == "lsyncd" else [])]
    settings = Settings(wait_s=args.wait, converge_s=args.converge_timeout)
    machine = report.machine()
    work = args.work or Path(tempfile.mkdtemp(prefix="loadtest-"))
    console = Console()
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    ok = False
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console,
                      disable=args.no_progress) as bar:
            for name in names:
                plan = build(name, args.nodes, args.duration, args.rate, args.seed)
                for system in systems:
                    target = make_target(system, args, work / name / system, stamp, plan)
                    label = f"{name} · {target.system}"
                    tid = bar.add_task(label, total=len(plan.ops()))
                    runner = Runner(target, plan, f"{args.seed}-{name}", settings,
                                    hooks(bar, tid, label))
                    runs.setdefault(name, {})[system] = await runner.run(work / name / system)
        doc = compose(args, names, systems, machine, runs)
        report.write(doc, runs, out)
        report.summary(doc, console)
        for name in names:
            report.findings(runs[name]["meshsync"], console)
        console.print(f"report: {out}/report.md")
        mesh = doc["blocks"]["meshsync"]
        ok = passed(mesh, False) and all(passed(runs[n]["meshsync"], PROFILES[n].join)
                                         for n in names)
        return 0 if ok else 1
    finally:
        if args.work is None and (ok and not args.keep):
            shutil.rmtree(work, ignore_errors=True)
        elif args.target == "local":
            console.print(f"nodes' folders and logs kept in {work}")


def hooks(bar: Progress, tid: TaskID, label: str) -> Hooks:
    def advance(n: int) -> None:
        bar.advance(tid, n)

    def phase(text: str) -> None:
        bar.update(tid, description=f"{label}: {text}")

    return Hooks(advance, phase)


def compose(args: argparse.Namespace, names: list[str], systems: list[str],
            machine: dict[str, Any], runs: dict[str, dict[str, dict[str, Any]]]
            ) -> dict[str, Any]:
    plan = build(names[0], args.nodes, args.duration, args.rate, args.seed)
    return {
        "profiles": names,
        "profile": names[0] if len(names) == 1 else "several",
        "target": args.target,
        "nodes": args.nodes if args.target == "local" else len(runs[names[0]]["meshsync"]
                                                               ["cpu_s"]),
        "seed": args.seed,
        "duration": args.duration if args.duration is not None else plan.duration,
        "rate": args.rate if args.rate is not None else plan.rate,
        "command": "python -m loadtest " + " ".join(sys.argv[1:]),
        "machine": machine,
        "blocks": {s: report.aggregate([runs[n][s] for n in names]) for s in systems},
    }
