"""Fault test of a multi-process evaluation: kill -9 ``segllm eval`` (two processes) at random
moments, then ``--resume``, and check the results equal an uninterrupted run's.

``segllm eval`` runs under ``torch.distributed.run`` with ``--procs`` CPU processes (gloo), the
bundled model on a small world split: each process takes every n-th conversation and appends one
line per finished conversation to its own log (``<name>.<protocol>.rank<r>.jsonl``); the main
process merges the logs into the report. First one uninterrupted run gives the reference. Then,
per chain, a fresh run in its own folder is killed ``--kills-per-chain`` times, each time after a
seeded random delay counted from the run's first newly logged conversation; after each kill ``segllm eval
--resume`` on the same folder becomes the next victim, and the last resume runs to the end. Two
ways to kill, drawn per kill:

- ``group``: SIGKILL to every process of the launch (launcher and workers, found through /proc:
  each worker has a process group of its own), as a machine that loses the job would;
- ``worker``: SIGKILL to one worker only (drawn at random); the launcher sees it die and stops
  the others, as when the kernel's OOM killer picks one process.

Every chain is checked: each resume exits 0 without a traceback; the report's results equal the
reference's (every metric, every count); across the rank logs every conversation of every
protocol is logged exactly once (none lost, none doubled) and its line equals the reference's.

Prints a JSON summary; exit status 0 when every kill was followed by a successful resume and every
chain's results equal the reference. Example::

    nice -n 10 python scripts/fault_test_eval.py --chains 4 --json docs/results/fault_test_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from segllm.bench import report

ROOT = Path(__file__).resolve().parents[1]
NAME = "e"


@dataclass
class Kill:
    chain: int
    index: int
    mode: str  # "group" or "worker"
    delay_s: float  # after the run's first newly logged conversation
    logged_before: dict[str, int]  # lines in each protocol's logs just before the kill
    resumed_ok: bool = False
    error: str = ""


@dataclass
class Chain:
    chain: int
    kills: int = 0
    completed: bool = False
    results_equal: bool = False
    records_once: bool = False  # every conversation of every protocol logged exactly once
    records_equal: bool = False  # and each line equals the reference's
    error: str = ""


@dataclass
class Summary:
    procs: int
    size: int
    protocols: list[str]
    kills: int
    kills_group: int
    kills_worker: int
    successful_resumes: int
    chains: int
    chains_equal: int
    all_equal: bool
    seed: int
    wall_s: float
    per_chain: list[dict] = field(default_factory=list)
    per_kill: list[dict] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_lines(out: Path, protocol: str) -> list[str]:
    """Every line of ``protocol``'s rank logs in ``out`` (rank order, file order)."""
    lines: list[str] = []
    for path in sorted(out.glob(f"{NAME}.{protocol}.rank*.jsonl")):
        lines += path.read_text(errors="replace").splitlines()
    return lines


def records(out: Path, protocol: str) -> dict[int, list[dict]]:
    """Conversation index -> the records logged for it (a line that does not parse is kept
    under index -1, as a doubled or broken record)."""
    found: dict[int, list[dict]] = {}
    for line in log_lines(out, protocol):
        try:
            d = json.loads(line)
            i = int(d["index"])
        except (ValueError, KeyError, TypeError):
            d, i = {"broken": line}, -1
        found.setdefault(i, []).append(d)
    return found


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), by each process's parent in
    /proc: torch.distributed.run starts each worker in a process group of its own, so a kill of
    the launcher's group does not reach them."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        fields = text.rsplit(") ", 1)[1].split()  # after the name (which may hold spaces): state, parent
        parent[int(text.split(" ", 1)[0])] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return sorted(found)


def workers(launcher: int) -> list[int]:
    """The launch's worker processes: the launcher's children running segllm."""
    out = []
    for pid in descendants(launcher):
        try:
            if b"segllm.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            continue
    return out


class Run:
    """One ``torch.distributed.run ... segllm.cli eval`` launch in its own process group."""

    def __init__(self, args: argparse.Namespace, out: Path, tag: str, resume: bool) -> None:
        self.out = out
        self.err_path = out.parent / f"{out.name}-{tag}.err"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.procs),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "segllm.cli", "eval", "--size", str(args.size), "--split", args.split, "--seed", str(args.data_seed),
               "--batch-size", str(args.batch_size), "--protocol", *args.protocol, "--out", str(out), "--name", NAME]
        if resume:
            cmd.append("--resume")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.err = self.err_path.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err, env=env, cwd=ROOT,
                                     start_new_session=True)  # its own group: a group kill reaches every worker

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.err.close()

    def kill(self, mode: str, rng: random.Random) -> str:
        """SIGKILL as ``mode`` says; returns once every process of the launch is gone."""
        launch = descendants(self.proc.pid)
        if mode == "worker":
            pids = workers(self.proc.pid)
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                try:
                    self.proc.wait(120)  # the launcher stops the other workers and exits
                except subprocess.TimeoutExpired:
                    mode += " (launcher did not exit: all killed)"
            else:
                mode += " (no worker yet: all killed)"
        # whatever is left of the launch, launcher and workers (each worker has its own group);
        # the workers are listed before the launcher dies (then they would belong to init)
        left = sorted(set(launch) | set(descendants(self.proc.pid) if self.proc.poll() is None else []))
        for pid in [*left, self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.err.close()
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in left) and time.monotonic() < deadline:
            time.sleep(0.05)  # gone once init reaps them
        return mode


def reference(args: argparse.Namespace, work: Path) -> tuple[Path, float]:
    out = work / "reference"
    t = time.monotonic()
    run = Run(args, out, "run", resume=False)
    rc = run.wait(args.timeout)
    if rc != 0:
        raise SystemExit(f"error: the uninterrupted run failed (exit {rc}):\n" + "\n".join(run.stderr().splitlines()[-15:]))
    return out, time.monotonic() - t


def results(out: Path) -> list[dict]:
    return json.loads((out / f"{NAME}.json").read_text())["results"]


def check(chain: Chain, out: Path, ref: Path, args: argparse.Namespace) -> None:
    try:
        chain.results_equal = results(out) == results(ref)
    except (OSError, ValueError, KeyError) as e:
        chain.error = f"no report: {e}"
        return
    once, equal = True, True
    for p in args.protocol:
        got, want = records(out, p), records(ref, p)
        once &= sorted(got) == list(range(args.size)) and all(len(v) == 1 for v in got.values())
        equal &= got == want
    chain.records_once, chain.records_equal = once, equal
    if not chain.results_equal:
        chain.error = "the report's results differ from the uninterrupted run's"
    elif not once:
        chain.error = "a conversation lost or logged twice"
    elif not equal:
        chain.error = "a logged record differs from the uninterrupted run's"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chains", type=int, default=4, help="interrupted runs, each compared with the reference (default: %(default)s)")
    p.add_argument("--kills-per-chain", type=int, default=2, help="SIGKILLs per chain, each followed by --resume (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments and modes (default: %(default)s)")
    p.add_argument("--procs", type=int, default=2, help="evaluation processes (default: %(default)s)")
    p.add_argument("--size", type=int, default=8, help="world conversations (default: %(default)s)")
    p.add_argument("--split", default="val")
    p.add_argument("--data-seed", type=int, default=0, help="the world's seed (default: %(default)s)")
    p.add_argument("--protocol", nargs="+", default=["oracle", "own"], choices=["oracle", "own"])
    p.add_argument("--batch-size", type=int, default=2, help="oracle batch (small: several log writes per rank)")
    p.add_argument("--max-delay", type=float, default=10.0, help="kills: at most this many seconds after the first logged "
                                                                 "conversation (default: %(default)s)")
    p.add_argument("--worker-share", type=float, default=0.5, help="share of kills aimed at one worker (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a run may take")
    p.add_argument("--workdir", type=Path, help="folder for the runs (default: a temp folder, deleted afterwards)")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    if args.chains < 1 or args.kills_per_chain < 1 or args.procs < 1:
        p.error("--chains, --kills-per-chain and --procs must be >= 1")

    rng = random.Random(args.seed)
    t0 = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segllm-evalfault-"))
    work.mkdir(parents=True, exist_ok=True)
    ref, ref_s = reference(args, work)
    print(f"reference: {ref_s:.0f} s", file=sys.stderr, flush=True)
    chains: list[Chain] = []
    kills: list[Kill] = []
    for c in range(1, args.chains + 1):
        chain = Chain(c)
        chains.append(chain)
        out = work / f"chain{c}"
        run = Run(args, out, "run0", resume=False)
        try:
            for k in range(1, args.kills_per_chain + 1):
                # each kill comes after the run logged a new conversation (so every resume has kept
                # work to read back), then a random delay
                start = sum(len(log_lines(out, pr)) for pr in args.protocol)
                deadline = time.monotonic() + args.timeout
                while sum(len(log_lines(out, pr)) for pr in args.protocol) <= start and run.proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError("no new conversation logged in time")
                    time.sleep(0.05)
                delay = rng.uniform(0.0, args.max_delay)
                mode = "worker" if rng.random() < args.worker_share else "group"
                end = time.monotonic() + delay
                while time.monotonic() < end and run.proc.poll() is None:
                    time.sleep(0.01)
                if run.proc.poll() is not None:
                    print(f"chain {c}: the run ended (exit {run.proc.returncode}) before kill {k}", file=sys.stderr, flush=True)
                    run.err.close()
                    break
                before = {pr: len(log_lines(out, pr)) for pr in args.protocol}
                kill = Kill(c, k, run.kill(mode, rng), round(delay, 2), before)
                kills.append(kill)
                chain.kills += 1
                run = Run(args, out, f"resume{k}", resume=True)
                # the resume is judged when it ends: killed next (it started cleanly) or finished (exit 0)
                print(f"chain {c} kill {k} ({kill.mode}, {delay:.1f} s): logged {before}", file=sys.stderr, flush=True)
            rc = run.wait(args.timeout) if run.proc.poll() is None else run.proc.returncode
            chain.completed = rc == 0 and "Traceback" not in run.stderr()
            if not chain.completed:
                chain.error = f"the last run exited {rc}: " + " | ".join(run.stderr().splitlines()[-5:])
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            chain.error = str(e)
            if run.proc.poll() is None:
                run.kill("group", rng)
        # every resume of this chain succeeded when the chain completed (each later one read its logs)
        for kill in kills:
            if kill.chain == c:
                kill.resumed_ok = chain.completed
                kill.error = "" if chain.completed else chain.error
        if chain.completed:
            check(chain, out, ref, args)
        print(f"chain {c}: {chain.kills} kills, completed {chain.completed}, results equal {chain.results_equal}, "
              f"records once {chain.records_once}, equal {chain.records_equal} {chain.error}", file=sys.stderr, flush=True)

    ok_chains = [ch for ch in chains if ch.completed and ch.results_equal and ch.records_once and ch.records_equal]
    summary = Summary(
        procs=args.procs, size=args.size, protocols=args.protocol, kills=len(kills),
        kills_group=sum(k.mode.startswith("group") for k in kills), kills_worker=sum(k.mode.startswith("worker") for k in kills),
        successful_resumes=sum(k.resumed_ok for k in kills), chains=len(chains), chains_equal=len(ok_chains),
        all_equal=len(ok_chains) == len(chains), seed=args.seed, wall_s=round(time.monotonic() - t0, 1),
        per_chain=[asdict(ch) for ch in chains], per_kill=[asdict(k) for k in kills],
    )
    report(asdict(summary), args.json)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary.all_equal and summary.kills and summary.successful_resumes == summary.kills else 1


if __name__ == "__main__":
    sys.exit(main())
