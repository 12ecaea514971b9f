"""Load test of the web demo: N concurrent sessions x R rounds, repeated, on loopback only.

Starts ``segllm demo``'s app on the bundled model (or a checkpoint) in a subprocess on
127.0.0.1, or connects to a running one (``--url``, loopback addresses only), and drives it
with one ``gradio_client`` client per session, all sessions of a repeat at once. Each session
gets its own image (a different example, size and tint) and its own questions, tagged with the
session's number, and every answer is checked against that session: the overlay has the
session's image size (enlarged by a whole factor, as the demo shows small images) and equals
its image outside the returned masks, the legend lists exactly
its own questions, the zip's masks and session.json have its size and rounds. A session whose
answer shows anything else counts as cross-talk.

Reported: latency per round (p50/p95 over every session and repeat), errors, cross-talk, the
server's resident memory (RSS) and the size of its temp folders after each repeat, and RSS
after the last repeat against after repeat 5 (the issue's bound: within 5%).

The whole run is bounded by ``--time-limit``: no new repeat starts past it and every call
waits at most what is left. Examples::

    python scripts/load_demo.py                                  # 8 sessions x 3 rounds x 20 repeats
    python scripts/load_demo.py --sessions 4 --rounds 2 --repeats 3
    python scripts/load_demo.py --url http://127.0.0.1:7860/ --server-pid 1234 --temp-dir /tmp/gradio
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

try:
    from gradio_client import Client, handle_file
except ImportError:  # the demo extra installs it; without it there is nothing to drive the queue with
    sys.exit("error: this load test needs gradio_client (pip install 'segllm[demo]')")

EXAMPLES = Path(__file__).resolve().parents[1] / "segllm" / "assets" / "examples"


# -- the server ----------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> None:
    """The subprocess: the demo on loopback, with only the options given passed on (so the
    same script also measures a demo that does not have them)."""
    from segllm.default import load_model
    from segllm.demo import build_demo

    kwargs = {"max_new_tokens": args.max_new_tokens}
    if args.idle_timeout is not None:
        kwargs["idle_timeout"] = args.idle_timeout
    if args.max_sessions is not None:
        kwargs["max_sessions"] = args.max_sessions
    demo = build_demo(load_model(args.checkpoint), **kwargs)
    demo.launch(server_name="127.0.0.1", server_port=args.port, quiet=True, show_error=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, str, list[Path]]:
    """The demo in a subprocess whose temp folders are under ``work`` (so their size is the
    server's alone), and its URL once it answers."""
    port = free_port()
    temps = [work / "server-gradio", work / "server-tmp"]
    for t in temps:
        t.mkdir(parents=True)
    env = dict(os.environ, GRADIO_TEMP_DIR=str(temps[0]), TMPDIR=str(temps[1]), GRADIO_ANALYTICS_ENABLED="False")
    cmd = [sys.executable, __file__, "--serve", "--port", str(port), "--max-new-tokens", str(args.max_new_tokens)]
    for opt in ("checkpoint", "idle_timeout", "max_sessions"):
        if getattr(args, opt) is not None:
            cmd += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    log = open(work / "server.log", "w")  # noqa: SIM115 (open for the subprocess's lifetime)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the demo exited with {proc.returncode}; see {work / 'server.log'}")
        try:
            with urllib.request.urlopen(url + "config", timeout=5):
                return proc, url, temps
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"error: the demo did not answer within {args.start_timeout:g} s")


def check_loopback(url: str) -> None:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError as e:
        sys.exit(f"error: cannot resolve {host!r}: {e}")
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        sys.exit(f"error: {url} is not a loopback address; this load test only runs against this machine")


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def folder_size(paths: list[Path]) -> tuple[float, int]:
    """(MB, number of files) under ``paths``."""
    total, count = 0, 0
    for root in paths:
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                    count += 1
                except OSError:
                    pass  # deleted while walking: the server cleans up concurrently
    return total / 2**20, count


# -- the clients ---------------------------------------------------------------------------
def session_inputs(i: int, rounds: int, folder: Path) -> tuple[Path, np.ndarray, list[str]]:
    """Session ``i``'s image (an example at a size and tint no other session has) and questions."""
    names = sorted(p.stem for p in EXAMPLES.glob("*.png"))
    name = names[i % len(names)]
    base = Image.open(EXAMPLES / f"{name}.png").convert("RGB")
    side = 96 + 4 * i  # the size tells the sessions apart; the tint tells equal sizes' pixels apart
    arr = np.asarray(base.resize((side, side + 2), Image.NEAREST)).astype(np.int16)
    arr = np.clip(arr + np.array([(7 * i) % 40, (13 * i) % 40, (29 * i) % 40]) - 20, 0, 255).astype(np.uint8)
    path = folder / f"session{i}.png"
    Image.fromarray(arr).save(path)
    questions = json.loads((EXAMPLES / f"{name}.json").read_text())["questions"]
    qs = [f"{questions[r % len(questions)]} (client {i})" for r in range(rounds)]
    return path, arr, qs


class Stats:
    def __init__(self, rounds: int) -> None:
        self.lock = threading.Lock()
        self.latency: list[list[float]] = [[] for _ in range(rounds)]
        self.upload: list[float] = []
        self.errors: list[str] = []
        self.crosstalk: list[str] = []
        self.cut = 0  # sessions stopped by --time-limit: the run's bound, not the server's error

    def error(self, msg: str) -> None:
        with self.lock:
            self.errors.append(msg)

    def mixed(self, msg: str) -> None:
        with self.lock:
            self.crosstalk.append(msg)


def check_answer(out, i: int, r: int, image: np.ndarray, questions: list[str]) -> list[str]:
    """What in round ``r``'s answer does not belong to session ``i`` (empty: all of it does)."""
    problems = []
    overlay_path, legend, _, status, zip_path = out[:5]
    h, w = image.shape[:2]
    if not str(status).startswith(f"Round {r + 1}"):
        problems.append(f"status {status!r}, expected round {r + 1}")
    tags = [f"(client {k})" for k in range(1000) if f"(client {k})" in legend]
    listed = legend.count('class="segllm-round"')
    if tags != [f"(client {i})"] or listed != r + 1:
        problems.append(f"legend has {listed} rounds and tags {tags}")
    union = np.zeros((h, w), bool)
    with zipfile.ZipFile(zip_path) as z:
        names = set(z.namelist())
        want = {f"round{k}_mask1.png" for k in range(1, r + 2)}
        if not want <= names or any(n.startswith(f"round{r + 2}_") for n in names):
            problems.append(f"zip holds {sorted(names)}")
        for n in names & want:
            m = np.asarray(Image.open(z.open(n)))
            if m.shape[:2] != (h, w):
                problems.append(f"{n} is {m.shape[1]}x{m.shape[0]}, the image {w}x{h}")
                break
            union |= m > 0
        coco = json.loads(z.read("session.json"))
    img = coco["images"][0]
    if (img["height"], img["width"]) != (h, w):
        problems.append(f"session.json image {img['width']}x{img['height']}")
    asked = [a["question"] for a in coco["annotations"]]
    if asked != [q for q in questions[: r + 1]]:
        problems.append(f"session.json questions {asked}")
    ov = np.asarray(Image.open(overlay_path).convert("RGB"))
    k = ov.shape[0] // h
    if k > 1 and ov.shape[:2] == (k * h, k * w):
        ov = ov[::k, ::k]  # a small image is shown enlarged by a whole factor (the demo's display_scale)
    if ov.shape[:2] != (h, w):
        problems.append(f"overlay {ov.shape[1]}x{ov.shape[0]}, the image {w}x{h}")
    elif union.shape == ov.shape[:2]:
        # outside every mask the overlay is the image itself, except the round labels' boxes
        outside = ~union
        same = np.all(ov == image, axis=2)[outside].mean() if outside.any() else 1.0
        if same < 0.9:
            problems.append(f"overlay equals the image on only {same:.0%} of the unmasked pixels")
    return problems


def run_session(url: str, i: int, rounds: int, inputs, stats: Stats, deadline: float, downloads: Path, close: bool,
                http_timeout: float = 60.0) -> None:
    path, image, questions = inputs
    folder = downloads / f"s{i}-{time.monotonic_ns()}"
    client = None
    try:
        client = Client(url, verbose=False, download_files=str(folder), httpx_kwargs={"timeout": http_timeout})

        def call(*a, api_name):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("time limit reached")
            return client.submit(*a, api_name=api_name).result(timeout=left)

        t = time.perf_counter()
        out = call(handle_file(str(path)), api_name="/set_image")
        with stats.lock:
            stats.upload.append(time.perf_counter() - t)
        h, w = image.shape[:2]
        if out[3] != f"Image {w}x{h} ready. Ask a question.":
            stats.mixed(f"session {i} set_image: {out[3]!r}")
        for r in range(rounds):
            t = time.perf_counter()
            out = call(questions[r], [], api_name="/ask")
            with stats.lock:
                stats.latency[r].append(time.perf_counter() - t)
            problems = check_answer(out, i, r, image, questions)
            if problems:
                stats.mixed(f"session {i} round {r + 1}: " + "; ".join(problems))
    except TimeoutError as e:
        if time.monotonic() < deadline:
            stats.error(f"session {i}: TimeoutError: {e}".strip())
        else:
            with stats.lock:
                stats.cut += 1
    except Exception as e:  # every failure is counted and reported; the other sessions go on
        stats.error(f"session {i}: {type(e).__name__}: {e}".strip()[:300])
        if os.environ.get("LOAD_DEMO_TRACEBACKS"):
            traceback.print_exc()
    finally:
        if client is not None and close:
            client.close()  # as a closed browser tab: its heartbeat ends
        shutil.rmtree(folder, ignore_errors=True)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(np.ceil(q * len(xs))) - 1))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions per repeat (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per session (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="repeats, each with new sessions (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=3600, help="seconds for the whole run (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, default=600,
                   help="seconds the started demo may take to answer (imports and model load; default: %(default)s)")
    p.add_argument("--http-timeout", type=float, default=60,
                   help="seconds a client waits for one HTTP answer (httpx's own default, 5 s, counts a slow answer "
                        "on a loaded machine as an error; a browser waits) (default: %(default)s)")
    p.add_argument("--url", help="a running demo (loopback only) instead of starting one")
    p.add_argument("--server-pid", type=int, help="with --url: the server's process id, for its RSS")
    p.add_argument("--temp-dir", action="append", default=[], help="with --url: a server temp folder to measure (repeatable)")
    p.add_argument("--checkpoint", help="model folder for the started demo (default: the bundled model)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--idle-timeout", type=float, help="the started demo's session idle timeout, seconds")
    p.add_argument("--max-sessions", type=int, help="the started demo's cap on live sessions")
    p.add_argument("--abandon", action="store_true",
                   help="leave each session's client open (no heartbeat close), so only the idle timeout and the cap free it")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=7860, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    if min(args.sessions, args.rounds, args.repeats) < 1:
        p.error("--sessions, --rounds and --repeats must be at least 1")

    start = time.monotonic()
    deadline = start + args.time_limit
    work = Path(tempfile.mkdtemp(prefix="segllm-load-"))
    proc = None
    try:
        if args.url:
            check_loopback(args.url)
            url, pid, temps = args.url, args.server_pid, [Path(t) for t in args.temp_dir]
        else:
            proc, url, temps = start_server(args, work)
            pid = proc.pid
        inputs_dir, downloads = work / "inputs", work / "downloads"
        inputs_dir.mkdir()
        inputs = [session_inputs(i, args.rounds, inputs_dir) for i in range(args.sessions)]
        stats = Stats(args.rounds)
        rows = []
        print(f"demo at {url}; {args.sessions} sessions x {args.rounds} rounds x {args.repeats} repeats; "
              f"time limit {args.time_limit:.0f} s", flush=True)
        before_rss = rss_mb(pid)
        print(f"before: RSS {before_rss or float('nan'):.0f} MB, temp {folder_size(temps)[0]:.2f} MB", flush=True)
        for rep in range(1, args.repeats + 1):
            if time.monotonic() >= deadline:
                print(f"time limit reached before repeat {rep}", flush=True)
                break
            t = time.monotonic()
            threads = [
                threading.Thread(target=run_session, args=(url, i, args.rounds, inputs[i], stats, deadline, downloads, not args.abandon,
                                                            args.http_timeout))
                for i in range(args.sessions)
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            mb, files = folder_size(temps)
            row = {"repeat": rep, "seconds": round(time.monotonic() - t, 2), "rss_mb": rss_mb(pid), "temp_mb": round(mb, 3),
                   "temp_files": files, "errors": len(stats.errors), "crosstalk": len(stats.crosstalk)}
            rows.append(row)
            rss = f"{row['rss_mb']:.0f} MB" if row["rss_mb"] is not None else "n/a"
            print(f"repeat {rep:3d}: {row['seconds']:6.1f} s, server RSS {rss}, temp {mb:.2f} MB in {files} files, "
                  f"errors {row['errors']}, cross-talk {row['crosstalk']}", flush=True)

        print("\nlatency per round (s), over every session and repeat:")
        per_round = []
        for r, xs in enumerate(stats.latency, start=1):
            per_round.append({"round": r, "n": len(xs), "p50": percentile(xs, 0.5), "p95": percentile(xs, 0.95)})
            print(f"  round {r}: n={len(xs)} p50={percentile(xs, 0.5):.3f} p95={percentile(xs, 0.95):.3f}")
        print(f"  upload+set_image: n={len(stats.upload)} p50={percentile(stats.upload, 0.5):.3f} "
              f"p95={percentile(stats.upload, 0.95):.3f}")
        if stats.cut:
            print(f"sessions cut short by the time limit (not errors; their repeat is partial): {stats.cut}")
        print(f"errors: {len(stats.errors)}")
        for e in stats.errors[:10]:
            print("  " + e)
        print(f"cross-talk: {len(stats.crosstalk)}")
        for e in stats.crosstalk[:10]:
            print("  " + e)
        growth = None
        if len(rows) >= 5 and rows[4]["rss_mb"] and rows[-1]["rss_mb"]:
            growth = rows[-1]["rss_mb"] / rows[4]["rss_mb"] - 1
            print(f"RSS after repeat {rows[-1]['repeat']} vs after repeat 5: {growth:+.1%} "
                  f"({rows[4]['rss_mb']:.0f} -> {rows[-1]['rss_mb']:.0f} MB)")
        if rows:
            print(f"temp folder: at most {max(r['temp_mb'] for r in rows):.2f} MB / "
                  f"{max(r['temp_files'] for r in rows)} files after a repeat")
        print(f"wall time {time.monotonic() - start:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"sessions": args.sessions, "rounds": args.rounds, "repeats": args.repeats, "http_timeout": args.http_timeout,
                 "before_rss_mb": before_rss, "wall_s": round(time.monotonic() - start, 1), "per_repeat": rows,
                 "latency": per_round, "errors": stats.errors, "crosstalk": stats.crosstalk, "rss_growth_5_to_last": growth},
                indent=1, default=float))
        return 1 if stats.errors or stats.crosstalk else 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
