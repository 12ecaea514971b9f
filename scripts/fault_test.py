"""Fault test of training: kill -9 a tiny ``segllm train`` run at random moments, then ``--resume``.

One run of the tiny recipe (``configs/test_tiny.toml``, more steps, a checkpoint every
``--save-every`` steps) in a subprocess is killed with SIGKILL ``--kills`` times; after each kill
``segllm train --resume`` is started on the same output folder and becomes the next victim. The
kill moments are drawn from a seeded generator (the wall-clock timing of the run itself is not
reproducible, so neither is the exact step each kill lands on):

- ``random``: a uniform delay after the process has logged its first training step;
- ``save``: inside the next checkpoint write: as soon as ``_save``'s temp folder (``.ckpt.<step>``)
  appears, after a further uniform delay of at most ``--save-jitter`` seconds, so the kill lands
  while the weights, the optimizer state or ``trainer_state.json`` are written, or around the
  renames that swap in the new ``checkpoint-last`` (``.checkpoint-old``).

Each resume is checked: it starts (no error, no traceback), logs ``resuming from ... at step S``,
trains on to step S + 1, and lost no work beyond one save interval: S >= the newest checkpoint
step seen on disk before the kill, and (last step logged before the kill) - S <= save_every.

Prints a JSON summary (kills, successful resumes, steps lost, where the kills landed); exit
status 0 when every resume succeeded within one save interval. Example::

    nice -n 10 python scripts/fault_test.py --kills 20 --json docs/results/fault_test.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from segllm.bench import report

ROOT = Path(__file__).resolve().parents[1]
RESUMED = "resuming from "  # the trainer's log line on resume: "resuming from <dir> at step <S>"


@dataclass
class Kill:
    """One kill and the resume after it."""

    index: int
    mode: str  # "random" or "save"
    pid: int
    last_logged: int  # last training step the killed process logged
    saved_before: int  # newest complete checkpoint step seen on disk just before the kill
    landed: str  # the output folder's state right after the kill (see `landed`)
    resumed_at: int | None = None
    resumed_ok: bool = False
    steps_lost: int | None = None
    error: str = ""
    resume_s: float | None = None  # seconds from starting the resume to its first new step


@dataclass
class Summary:
    kills: int
    kills_inside_save: int
    successful_resumes: int
    max_steps_lost: int | None
    save_every: int
    all_within_one_interval: bool
    landed: dict[str, int]
    seed: int
    wall_s: float
    per_kill: list[dict] = field(default_factory=list)


def complete_step(folder: Path) -> int | None:
    """The step of a complete checkpoint (``trainer_state.json`` is written last), else None."""
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def newest_saved(out: Path) -> int:
    """The newest complete checkpoint step under ``out`` (checkpoint-last or the old one kept
    during a save's renames); 0 when there is none."""
    steps = [complete_step(out / name) for name in ("checkpoint-last", ".checkpoint-old")]
    return max([s for s in steps if s is not None], default=0)


def landed(out: Path) -> str:
    """Where in a save the kill landed, read from what it left on disk."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    tmp = any(n.startswith(".ckpt.") for n in names)
    if "checkpoint-last" not in names:
        return "between the renames (no checkpoint-last)" if ".checkpoint-old" in names else "before the first save"
    if ".checkpoint-old" in names:
        return "after the renames (old checkpoint not yet deleted)"
    if tmp:
        return "writing the new checkpoint (temp folder)"
    return "outside a save"


def logged_steps(log: Path, offset: int) -> list[int]:
    """Steps in the training log written after byte ``offset`` (a line cut by the kill is skipped)."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps


class Run:
    """One ``segllm train`` process on the output folder, its stderr in a file."""

    def __init__(self, args: argparse.Namespace, out: Path, n: int, resume: bool) -> None:
        self.out = out
        self.log = out / "log.jsonl"
        self.offset = self.log.stat().st_size if self.log.exists() else 0
        self.err_path = out.parent / f"train-{n}.err"
        cmd = [sys.executable, "-m", "segllm.cli", "train", str(args.recipe), "--set", f"output_dir='{out}'",
               "--set", f"steps={args.steps}", "--set", f"save_every={args.save_every}", "--set", "log_every=1"]
        if resume:
            cmd.append("--resume")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.err = self.err_path.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.err, env=env, cwd=ROOT)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def resumed_at(self) -> int | None:
        for line in self.stderr().splitlines():
            if RESUMED in line and " at step " in line:
                return int(line.rsplit(" at step ", 1)[1].split()[0])
        return None

    def steps(self) -> list[int]:
        return logged_steps(self.log, self.offset)

    def wait_for(self, what: str, ready, timeout: float) -> None:
        """Poll until ``ready()``; raise RuntimeError naming ``what`` if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                tail = "\n".join(self.stderr().splitlines()[-8:])
                raise RuntimeError(f"the process ended (exit {self.proc.returncode}) before {what}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {timeout:.0f} s")
            time.sleep(0.05)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.err.close()


def kill_inside_save(run: Run, rng: random.Random, jitter: float, timeout: float) -> None:
    """SIGKILL ``run`` while it writes its next checkpoint (its temp folder exists), after a
    random extra delay of at most ``jitter`` seconds."""
    deadline = time.monotonic() + timeout
    delay = rng.uniform(0.0, jitter)
    while time.monotonic() < deadline and run.proc.poll() is None:
        if any(p.name.startswith(".ckpt.") for p in run.out.iterdir()):
            time.sleep(delay)
            return
        time.sleep(0.002)  # a save of the tiny model lasts a few hundred ms: poll well inside it
    if run.proc.poll() is not None:
        raise RuntimeError(f"the process ended (exit {run.proc.returncode}) before its next save")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs, each followed by a --resume (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default: %(default)s)")
    p.add_argument("--recipe", type=Path, default=ROOT / "configs" / "test_tiny.toml")
    p.add_argument("--steps", type=int, default=100_000, help="the run's step budget: more than the kills reach")
    p.add_argument("--save-every", type=int, default=2, help="checkpoint interval, steps (default: %(default)s)")
    p.add_argument("--max-delay", type=float, default=6.0, help="random kills: at most this many seconds after the first step")
    p.add_argument("--save-jitter", type=float, default=0.4, help="save kills: at most this many seconds into the save")
    p.add_argument("--save-share", type=float, default=0.5, help="share of kills aimed inside a checkpoint write")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds a process may take to start or reach a step")
    p.add_argument("--workdir", type=Path, help="folder for the run (default: a temp folder, deleted afterwards)")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    if args.kills < 1 or args.save_every < 1:
        p.error("--kills and --save-every must be >= 1")

    rng = random.Random(args.seed)
    t0 = time.monotonic()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segllm-fault-"))
    out = work / "run"
    out.parent.mkdir(parents=True, exist_ok=True)
    kills: list[Kill] = []
    run = Run(args, out, 0, resume=False)
    try:
        for i in range(1, args.kills + 1):
            # a first step, and a first checkpoint: before it there is nothing to resume from
            # (--resume then refuses, by design), so the first kill waits for it
            run.wait_for("a first training step and checkpoint", lambda r=run: bool(r.steps()) and newest_saved(out) > 0,
                         args.timeout)
            mode = "save" if rng.random() < args.save_share else "random"
            if mode == "save":
                kill_inside_save(run, rng, args.save_jitter, args.timeout)
            else:
                end = time.monotonic() + rng.uniform(0.0, args.max_delay)
                while time.monotonic() < end and run.proc.poll() is None:
                    time.sleep(0.01)
            if run.proc.poll() is not None:
                raise RuntimeError(f"the training process ended by itself (exit {run.proc.returncode}) before kill {i}")
            saved = newest_saved(out)  # read before the kill: any checkpoint seen here must survive it
            run.kill()
            k = Kill(i, mode, run.proc.pid, max(run.steps(), default=0), saved, landed(out))
            kills.append(k)
            run = Run(args, out, i, resume=True)
            try:
                run.wait_for("the resume line", lambda r=run: r.resumed_at() is not None, args.timeout)
                k.resumed_at = run.resumed_at()
                run.wait_for(f"a step after {k.resumed_at}", lambda r=run, s=k.resumed_at: any(x > s for x in r.steps()),
                             args.timeout)
                k.resume_s = round(time.monotonic() - run.started, 1)
                k.steps_lost = k.last_logged - k.resumed_at
                k.resumed_ok = k.resumed_at >= k.saved_before and k.steps_lost <= args.save_every
                if "Traceback" in run.stderr():
                    k.resumed_ok, k.error = False, "a traceback on stderr"
                elif not k.resumed_ok:
                    k.error = (f"resumed at step {k.resumed_at}: checkpoint step {k.saved_before} was on disk before the "
                               f"kill, {k.last_logged} steps logged")
            except RuntimeError as e:
                k.error = str(e)
                break
            print(f"kill {i} ({mode}, {k.landed}): logged {k.last_logged}, saved {k.saved_before}, resumed at "
                  f"{k.resumed_at}, lost {k.steps_lost}", file=sys.stderr, flush=True)
    finally:
        if run.proc.poll() is None:
            run.kill()  # the last resume, verified above: not one of the counted kills
    lost = [k.steps_lost for k in kills if k.steps_lost is not None]
    places: dict[str, int] = {}
    for k in kills:
        places[k.landed] = places.get(k.landed, 0) + 1
    summary = Summary(
        kills=len(kills), kills_inside_save=sum(k.mode == "save" for k in kills),
        successful_resumes=sum(k.resumed_ok for k in kills), max_steps_lost=max(lost, default=None),
        save_every=args.save_every, all_within_one_interval=bool(kills) and all(k.resumed_ok for k in kills),
        landed=places, seed=args.seed, wall_s=round(time.monotonic() - t0, 1), per_kill=[asdict(k) for k in kills],
    )
    report(asdict(summary), args.json)
    if args.workdir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    ok = summary.kills == args.kills and summary.successful_resumes == args.kills
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
