"""Training survives kill -9 at random moments: ``scripts/fault_test.py`` in small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import fault_test  # noqa: E402


def test_log_reading_skips_a_line_cut_by_the_kill(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert fault_test.logged_steps(log, 0) == [1, 2]
    assert fault_test.logged_steps(log, len('{"step": 1}\n')) == [2]


def test_where_a_kill_landed_is_read_from_the_folder(tmp_path):
    def ckpt(name: str, step: int | None) -> None:
        (tmp_path / name).mkdir()
        if step is not None:
            (tmp_path / name / "trainer_state.json").write_text(json.dumps({"step": step}))

    assert fault_test.landed(tmp_path) == "before the first save"
    ckpt(".checkpoint-old", 4)
    assert fault_test.landed(tmp_path) == "between the renames (no checkpoint-last)"
    assert fault_test.newest_saved(tmp_path) == 4
    ckpt("checkpoint-last", 6)
    assert fault_test.landed(tmp_path) == "after the renames (old checkpoint not yet deleted)"
    assert fault_test.newest_saved(tmp_path) == 6
    os.rename(tmp_path / ".checkpoint-old", tmp_path / ".ckpt.8")
    assert fault_test.landed(tmp_path) == "writing the new checkpoint (temp folder)"


@pytest.mark.slow
@pytest.mark.hang_s(1800)  # three training starts: ~10 s each on an idle machine, minutes on a loaded one
def test_three_kills_three_resumes(tmp_path):
    """Three SIGKILLs of a tiny run (about two of them inside a checkpoint write), each followed
    by --resume: every resume succeeds and loses at most one save interval."""
    out = tmp_path / "summary.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_test.py"), "--kills", "3", "--seed", "3",
                          "--save-share", "0.67", "--json", str(out)], capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    summary = json.loads(out.read_text())
    assert res.returncode == 0, res.stderr[-3000:]
    assert summary["kills"] == summary["successful_resumes"] == 3
    assert summary["max_steps_lost"] <= summary["save_every"]


# -- a multi-process evaluation under kill -9 (scripts/fault_test_eval.py) -----------------------


def test_a_killed_two_process_eval_resumes_to_the_same_results(tmp_path):
    """Two ranks' logs as kill -9 leaves them (rank 1 mid-line, a resume's temp file left behind,
    rank 0 with fewer records): resuming each rank and merging gives exactly the uninterrupted
    run's report, every conversation once, and the cut line is gone from the log."""
    import json

    from segllm.eval.evaluate import evaluate, read_logs
    from tests.eval.test_evaluate import ListData, Oracle, _conv

    conv, gts = _conv()
    data = ListData([conv] * 7)

    def run(folder, ranks=(0, 1), resume=False):
        logs = [folder / f"e.oracle.rank{r}.jsonl" for r in (0, 1)]
        for r in ranks:
            evaluate(Oracle(gts), data, protocol="oracle", batch_size=2, log_path=logs[r], rank=r, world_size=2,
                     resume=resume)
        return logs

    full = read_logs(run(tmp_path / "full"), protocol="oracle").to_dict()
    logs = run(tmp_path / "killed")
    lines = [p.read_text().splitlines() for p in logs]
    logs[0].write_text(lines[0][0] + "\n")  # rank 0 killed after its first record
    logs[1].write_text(lines[1][0] + "\n" + lines[1][1][:25])  # rank 1 killed inside its second write
    logs[1].with_suffix(".tmp").write_text("{\"index\": 1")  # an earlier resume's rewrite, cut short
    run(tmp_path / "killed", resume=True)
    assert read_logs(logs, protocol="oracle").to_dict() == full
    indices = [json.loads(x)["index"] for p in logs for x in p.read_text().splitlines()]  # every line parses
    assert sorted(indices) == list(range(7))
    assert [p.read_text().splitlines() for p in logs] == lines  # the same records, in the same order


@pytest.mark.slow
@pytest.mark.hang_s(1800)  # three launches of two processes: ~1 min each idle, minutes on a loaded machine
def test_two_process_eval_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    """scripts/fault_test_eval.py in small: one uninterrupted two-process `segllm eval`, then one
    run killed with SIGKILL (one worker) and resumed: same report, every record once."""
    out = tmp_path / "summary.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "fault_test_eval.py"), "--chains", "1",
                          "--kills-per-chain", "1", "--worker-share", "1", "--size", "8", "--protocol", "own",
                          "--max-delay", "1", "--json", str(out)], capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["kills"] == summary["successful_resumes"] == 1 and summary["kills_worker"] == 1
    chain = summary["per_chain"][0]
    assert chain["results_equal"] and chain["records_once"] and chain["records_equal"]
