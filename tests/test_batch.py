"""`paligemma batch`: a record per input row, bad rows, torn part files, torchrun on 2 processes, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paligemma import generate_detailed, load_model, load_processor
from paligemma.batch import (
    append_records,
    check_output,
    completed_ids,
    folder_rows,
    parts_dir,
    read_jsonl_rows,
    read_part,
    run_batch,
)
from paligemma.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["caption en", "detect circle ; square", "answer en how many circles are there?", "describe en"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_dir):
    return load_model(tiny_checkpoint_dir), load_processor(tiny_checkpoint_dir)


def _dataset(folder: Path, count: int, bad: bool = True) -> Path:
    """`count` image rows with varied prompts and sizes (and, with `bad`, three bad lines) in rows.jsonl."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20 + i % 7, 30 + i % 5, 3), dtype=np.uint8)).save(folder / f"img/{i}.png")
        lines.append(json.dumps({"id": f"row{i}", "image": f"img/{i}.png", "prompt": PROMPTS[i % len(PROMPTS)]}))
    if bad:
        lines[1:1] = ['{"image": "img/nowhere.png", "prompt": "caption en"}', "{not json", '{"image": "img/0.png"}']
    path = folder / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n\n")  # a blank line is not a row
    return path


def _command(*args: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29500 + os.getpid() % 1000 + nproc)] if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "paligemma", "batch", *args]


def _run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_every_input_line_gets_its_record_in_order(tiny, tmp_path):
    model, processor = tiny
    rows = read_jsonl_rows(_dataset(tmp_path, 6))
    out = tmp_path / "answers.jsonl"
    summary = run_batch(model, processor, rows, out, batch_size=4, max_new_tokens=5)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["row0", 2, 3, 4, "row1", "row2", "row3", "row4", "row5"]
    assert (summary.answered, summary.errors, summary.skipped) == (6, 3, 0)
    assert "does not exist" in records[1]["error"] and "not JSON" in records[2]["error"]
    assert "'prompt'" in records[3]["error"]
    assert not parts_dir(out).exists()  # merged, then removed
    for record in records[:1] + records[4:]:
        image = np.asarray(Image.open(tmp_path / record["image"]).convert("RGB"))
        alone = generate_detailed(model, processor, [image], [record["prompt"]], max_new_tokens=5)[0]
        assert (record["answer"], record["finish_reason"]) == (alone.text, alone.finish_reason)
        assert ("detections" in record) == record["prompt"].startswith("detect")
    with pytest.raises(UsageError, match="never overwritten"):
        check_output(out)


def test_rows_from_a_folder_and_refused_inputs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/b/2.png", "a/1.jpg", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    rows = folder_rows(tmp_path / "a", "caption en")
    assert [(r.index, r.id, r.prompt) for r in rows] == [(0, "1.jpg", "caption en"), (1, "b/2.png", "caption en")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no image files"):
        folder_rows(tmp_path / "empty", "x")
    twice = tmp_path / "twice.jsonl"
    # Line 2's id defaults to its line number, 2, which clashes with nothing; line 3 repeats line 1's.
    twice.write_text('{"id": 1, "image": "x.png", "prompt": "ocr"}\n{"image": "y.png", "prompt": "ocr"}\n'
                     '{"id": 1, "image": "z.png", "prompt": "ocr"}\n')
    with pytest.raises(UsageError, match="jsonl:3: id 1 is also the id of line 1"):
        read_jsonl_rows(twice)


def test_a_torn_batch_is_cut_off_and_a_restart_does_only_what_is_left(tiny, tmp_path):
    model, processor = tiny
    rows = read_jsonl_rows(_dataset(tmp_path, 5, bad=False))
    reference = tmp_path / "reference.jsonl"
    run_batch(model, processor, rows, reference, batch_size=2, max_new_tokens=4)
    lines = reference.read_text().splitlines()
    out = tmp_path / "answers.jsonl"
    part = parts_dir(out) / "rank-00000-of-00001.jsonl"
    part.parent.mkdir()
    append_records(part, [json.loads(line) for line in lines[:2]])  # one whole batch ...
    with part.open("a") as file:
        file.write(lines[2] + "\n" + lines[3][:25])  # ... and one torn by a kill: its whole lines are kept
    assert completed_ids(out) == {"row0", "row1", "row2"}
    summary = run_batch(model, processor, rows, out, batch_size=2, max_new_tokens=4)
    assert (summary.skipped, summary.answered) == (3, 2)
    assert out.read_text() == reference.read_text()
    damaged = tmp_path / "damaged.jsonl"
    parts_dir(damaged).mkdir()
    (parts_dir(damaged) / "rank-00000-of-00001.jsonl").write_text(lines[0] + "\n" + "not a record\n")
    with pytest.raises(UsageError, match=r"rank-00000-of-00001.jsonl:2 is not a record"):
        completed_ids(damaged)


def test_two_processes_under_torchrun_equal_one(tiny, tmp_path, tiny_checkpoint_dir):
    model, processor = tiny
    data = _dataset(tmp_path, 7)
    single = tmp_path / "single.jsonl"
    run_batch(model, processor, read_jsonl_rows(data), single, batch_size=3, max_new_tokens=6)
    double = tmp_path / "double.jsonl"
    done = _run(_command("--model", str(tiny_checkpoint_dir), "--input", str(data), "--out", str(double),
                         "--batch-size", "3", "--max-new-tokens", "6", nproc=2))
    assert double.read_text() == single.read_text()
    assert "on 2 process(es)" in done.stderr


def test_a_killed_run_resumes_and_finishes_on_two_processes(tiny, tmp_path, tiny_checkpoint_dir):
    model, processor = tiny
    data = _dataset(tmp_path, 60, bad=False)
    reference = tmp_path / "reference.jsonl"
    run_batch(model, processor, read_jsonl_rows(data), reference, batch_size=1, max_new_tokens=30)
    out = tmp_path / "answers.jsonl"
    args = ["--model", str(tiny_checkpoint_dir), "--input", str(data), "--out", str(out), "--max-new-tokens", "30"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(_command(*args, "--batch-size", "1"), cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    part = parts_dir(out) / "rank-00000-of-00001.jsonl"
    deadline = time.monotonic() + 180
    while not (part.exists() and part.read_bytes().count(b"\n") >= 3):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run wrote nothing"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    process.stderr.close()
    kept = read_part(part)
    assert 3 <= len(kept) < 60 and not out.exists()
    done = _run(_command(*args, "--batch-size", "4", nproc=2))  # another batch size and process count
    assert f"{len(kept)} done before, {60 - len(kept)} answered" in done.stderr
    assert out.read_text() == reference.read_text()
