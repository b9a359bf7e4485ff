"""Fine-tuning under bad data, kills and careless re-runs (issue 18, items 3, 4 and 5): bad rows are skipped
wherever they are found and reported, batches stay deterministic across a resume, `final/` and every file
are replaced in one step, and a folder holding a run is never silently reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import paligemma
from paligemma import atomic_files
from paligemma.errors import UsageError
from paligemma.finetune import DataError, FinetuneDataset, TrainConfig, train
from paligemma.finetune.data import TrainingCollator

ROOT = Path(__file__).resolve().parents[1]
COLORS = [(230, 20, 20), (20, 200, 40), (30, 40, 220), (240, 230, 30), (140, 30, 160), (250, 140, 20)]


@pytest.fixture(scope="module")
def processor(base_dir):
    return paligemma.load_processor(base_dir, max_pixels=1000)  # 28x28 fits, 40x40 is "too large"


def model_from(base_dir):
    return paligemma.load_model(base_dir, dtype=torch.float32)


def good_row(folder: Path, i: int) -> dict:
    """A row whose 28 px image (written into `folder`) is a flat colour, captioned with it."""
    Image.new("RGB", (28, 28), COLORS[i % len(COLORS)]).save(folder / f"good{i}.png")
    return {"image": f"good{i}.png", "prefix": "caption en", "suffix": f"a circle {i % 3}"}


def truncated_png(folder: Path, name: str = "truncated.png") -> str:
    Image.new("RGB", (28, 28), (1, 2, 3)).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])  # the header survives; the pixel data does not
    return name


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def settings(out: Path, **overrides) -> TrainConfig:
    values = dict(out_dir=str(out), steps=3, lr=1e-3, batch_size=2, progress=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def skipped(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- item 3: bad rows, wherever found

def test_the_issue_repro_completes_and_reports_the_truncated_png(tmp_path):
    rows = [good_row(tmp_path, i) for i in range(4)] + [{"image": truncated_png(tmp_path), "prefix": "caption en",
                                                         "suffix": "x"}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    demo = str(ROOT / "paligemma" / "demo_model")
    done = subprocess.run([sys.executable, "-m", "paligemma", "finetune", "--model", demo, "--data", str(data),
                           "--out", str(tmp_path / "r"), "--steps", "3", "--batch-size", "2", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["steps"] == 3
    assert f"{data}:5" in done.stderr and "truncated" in done.stderr
    assert (tmp_path / "r" / "final" / "model.safetensors").is_file()
    [report] = skipped(tmp_path / "r")
    assert report["where"] == f"{data}:5" and report["found"] == "batch" and "truncated" in report["reason"]


def test_every_kind_of_bad_row_is_skipped_where_it_is_found(tmp_path, base_dir, processor):
    Image.new("RGB", (40, 40), (9, 9, 9)).save(tmp_path / "huge.png")  # 1600 pixels > max_pixels 1000
    rows = [good_row(tmp_path, i) for i in range(6)] + [
        {"image": truncated_png(tmp_path), "prefix": "caption en", "suffix": "x"},         # 7: decodes only in part
        {"image": "huge.png", "prefix": "caption en", "suffix": "x"},                      # 8: over the pixel limit
        {"image": 12, "prefix": "caption en", "suffix": "x"},                              # 9: not a path
        {"image": "good0.png", "prefix": "<image> caption en", "suffix": "x"},             # 10: <image> in the text
        {"image": "good1.png", "prefix": "caption en", "suffix": "a circle " * 30},        # 11: over --max-length
    ]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    expected = {7: ("batch", "truncated"), 8: ("load", "over the limit"), 9: ("load", "must be a file path"),
                10: ("load", "contains '<image>'"), 11: ("batch", "max_length is 24")}
    # Default: the header checks find what they can when the file is read; the rest turn up in batches.
    # check_images=False: nothing about the images is known until their batches are built.
    for name, data, moved in (("checked", str(path), set()),
                              ("unchecked", FinetuneDataset.from_jsonl(path, check_images=False, max_pixels=1000),
                               {8})):
        out = tmp_path / name
        with pytest.warns(UserWarning):  # batches of one, 9 steps: every row is drawn in the first epoch
            summary = train(model_from(base_dir), processor, data, settings(out, steps=9, batch_size=1,
                                                                             max_length=24))
        assert summary.steps == 9 and (out / "final" / "model.safetensors").is_file()
        found = {int(r["where"].rsplit(":", 1)[1]): (r["found"], r["reason"]) for r in skipped(out)}
        assert set(found) == set(expected), found
        for line, (when, fragment) in expected.items():
            assert found[line][0] == ("batch" if line in moved else when) and fragment in found[line][1], found[line]


def test_python_rows_are_checked_as_jsonl_rows_are(processor):
    rows = [{"image": Image.new("RGB", (28, 28)), "prefix": "caption en", "suffix": "ok"},
            {"image": 12, "prefix": "caption en", "suffix": "x"},
            {"image": Image.new("RGB", (40, 40)), "prefix": "caption en", "suffix": "x"},
            {"image": Image.new("RGB", (28, 28)), "prefix": "caption en", "suffix": "<image>"}]
    with pytest.warns(UserWarning, match="skipped 3 bad row"):
        dataset = FinetuneDataset(rows, max_pixels=1000)
    assert [row.where for row in dataset.skipped] == ["row 1", "row 2", "row 3"]
    assert "got int" in dataset.skipped[0].reason and "over the limit" in dataset.skipped[1].reason
    with pytest.raises(DataError, match="row 1: field 'image'"):
        FinetuneDataset(rows, strict=True)


def test_too_many_bad_rows_stop_the_run_with_the_fraction_and_the_option(tmp_path, base_dir, processor):
    rows = [good_row(tmp_path, i) for i in range(5)] + [{"image": "missing.png", "prefix": "p", "suffix": "s"}] * 3
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    too_many = r"3 of the 8 rows .* \(38%\).*--max-bad-fraction 0.25"
    with pytest.warns(UserWarning), pytest.raises(DataError, match=too_many):
        train(model_from(base_dir), processor, str(path), settings(tmp_path / "a", max_bad_fraction=0.25))
    assert len(skipped(tmp_path / "a")) == 3 and not (tmp_path / "a" / "final").exists()
    with pytest.warns(UserWarning):
        assert train(model_from(base_dir), processor, str(path), settings(tmp_path / "b")).steps == 3  # default 0.5

    # Found while building batches: the run stops at the step that crosses the limit.
    rows = [good_row(tmp_path, i) for i in range(6)] + [{"image": truncated_png(tmp_path, f"t{i}.png"), "prefix": "p",
                                                         "suffix": "s"} for i in range(2)]
    path = write_jsonl(tmp_path / "late.jsonl", rows)
    records = []
    with pytest.warns(UserWarning), pytest.raises(DataError, match="2 of the 8 rows"):
        train(model_from(base_dir), processor, str(path), settings(tmp_path / "c", steps=8, max_bad_fraction=0.2),
              on_log=records.append)
    # Every row is drawn in the first epoch (4 steps), so the second bad one stops the run within it.
    assert len(records) < 4 and len(skipped(tmp_path / "c")) == 2 and not (tmp_path / "c" / "final").exists()


def test_a_bad_evaluation_row_is_dropped_before_training(tmp_path, base_dir, processor):
    rows = [good_row(tmp_path, i) for i in range(4)]
    train_path = write_jsonl(tmp_path / "train.jsonl", rows)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", rows[:2] + [{"image": truncated_png(tmp_path), "prefix": "p",
                                                                  "suffix": "s"}])
    with pytest.warns(UserWarning, match="eval.jsonl:3"):
        summary = train(model_from(base_dir), processor, str(train_path), settings(tmp_path / "out"),
                        eval_data=str(eval_path))
    assert summary.evals[-1]["num_examples"] == 2
    [record] = skipped(tmp_path / "out")
    assert record["data"] == "eval" and record["where"] == f"{eval_path}:3"


def test_replacement_rows_do_not_depend_on_the_process_count(tmp_path, processor):
    rows = [good_row(tmp_path, i) for i in range(6)]
    rows[1] = {"image": truncated_png(tmp_path), "prefix": "caption en", "suffix": "x"}
    dataset = FinetuneDataset.from_jsonl(write_jsonl(tmp_path / "d.jsonl", rows))
    indices = [0, 1, 2, 3]  # row 1 is bad; rows 2 and 3 are in the batch, so row 4 takes its place
    whole, found = TrainingCollator(dataset, processor)(indices)
    assert [row.index for row in found] == [1]
    expected, _ = TrainingCollator(dataset, processor)([0, 4, 2, 3])
    for key, tensor in whole.items():
        assert torch.equal(tensor, expected[key]), key
    # Two processes, each building half of the global micro-batch, build the same rows.
    halves = [TrainingCollator(dataset, processor, lo=lo, hi=lo + 2)(indices)[0] for lo in (0, 2)]
    assert torch.equal(torch.cat([h["pixel_values"] for h in halves]), whole["pixel_values"])
    tokens = [ids[mask.bool()].tolist() for h in halves for ids, mask in zip(h["input_ids"], h["attention_mask"])]
    assert tokens == [ids[mask.bool()].tolist() for ids, mask in zip(whole["input_ids"], whole["attention_mask"])]
    # Known bad rows are not decoded again; the outcome is the same.
    again, found = TrainingCollator(dataset, processor, known_bad={1: "truncated"})(indices)
    assert found == [] and torch.equal(again["input_ids"], whole["input_ids"])


class _Crash(Exception):
    pass


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_run_skips_the_same_rows_and_equals_an_uninterrupted_one(tmp_path, base_dir, processor,
                                                                           num_workers):
    rows = [good_row(tmp_path, i) for i in range(8)]
    rows[5] = {"image": truncated_png(tmp_path), "prefix": "caption en", "suffix": "x"}
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    options = dict(steps=6, grad_accum=2, save_every=3, lr=3e-3, num_workers=num_workers)
    whole_model = model_from(base_dir)
    with pytest.warns(UserWarning):
        whole = train(whole_model, processor, path, settings(tmp_path / "whole", **options))

    def crash_after_step_5(record):
        if record.get("step") == 5:
            raise _Crash

    with pytest.raises(_Crash), pytest.warns(UserWarning):
        train(model_from(base_dir), processor, path, settings(tmp_path / "cut", **options), on_log=crash_after_step_5)
    state = json.loads((tmp_path / "cut" / "checkpoint-3" / "trainer_state.json").read_text())
    assert [r["where"] for r in state["skipped_rows"]] == [f"{path}:6"]
    resumed_model = model_from(base_dir)
    resumed = train(resumed_model, processor, path, settings(tmp_path / "cut", resume=True, **options))
    assert resumed.losses == whole.losses[3:]
    for (name, a), (_, b) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(skipped(tmp_path / "whole")) == 1 and skipped(tmp_path / "cut") == skipped(tmp_path / "whole")


def test_two_processes_skip_and_replace_the_same_rows_as_one(tmp_path, base_dir):
    # Each process builds half of every global micro-batch: a bad row found by either is reported once,
    # by rank 0, and replaced by the same row as in one process, so the losses agree.
    rows = [good_row(tmp_path, i) for i in range(8)]
    rows[2] = {"image": truncated_png(tmp_path), "prefix": "caption en", "suffix": "x"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    losses = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        launcher = ["-m", "paligemma.finetune.cli"] if processes == 1 else \
            ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "paligemma.finetune.cli"]
        done = subprocess.run([sys.executable, *launcher, "--model", str(base_dir), "--data", str(path), "--out",
                               str(out), "--steps", "4", "--batch-size", "4", "--lr", "3e-3", "--freeze", "vision",
                               "--no-progress"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                    PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[processes] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["where"] for r in skipped(out)] == [f"{path}:3"]
    assert losses[2] == pytest.approx(losses[1], rel=1e-6)


# ---------------------------------------------------------------------- item 4: files and folders in one step

def _first_run(tmp_path, base_dir, processor, **overrides) -> Path:
    out = tmp_path / "out"
    rows = [good_row(tmp_path, i) for i in range(4)]
    train(model_from(base_dir), processor, str(write_jsonl(tmp_path / "d.jsonl", rows)),
          settings(out, **{"save_every": 3, "model_dir": str(base_dir), **overrides}))
    return out


@pytest.mark.parametrize("where", ["weights", "tokenizer"])
def test_final_survives_an_interrupt_while_the_new_one_is_written(tmp_path, base_dir, processor, monkeypatch, where):
    # SIGINT (KeyboardInterrupt) just before the weights are complete, or once they are and the
    # tokenizer is being copied: final/ must stay the previous run's, whole.
    out = _first_run(tmp_path, base_dir, processor)
    before = _snapshot(out / "final")
    import shutil

    import paligemma.safetensors_io as safetensors_io

    real_save, real_copy = safetensors_io.save_file, shutil.copy2

    def interrupted_save(tensors, filename, metadata=None):
        if "final" in str(filename) and where == "weights":
            Path(filename).write_bytes(b"half a file")
            raise KeyboardInterrupt
        real_save(tensors, filename, metadata=metadata)

    def interrupted_copy(source, destination):
        if "final" in str(destination) and where == "tokenizer":
            Path(destination).write_bytes(b"half a file")
            raise KeyboardInterrupt
        return real_copy(source, destination)

    monkeypatch.setattr(safetensors_io, "save_file", interrupted_save)
    monkeypatch.setattr(shutil, "copy2", interrupted_copy)
    rows = str(tmp_path / "d.jsonl")
    with pytest.raises(KeyboardInterrupt):
        train(model_from(base_dir), processor, rows, settings(out, steps=5, resume=True, model_dir=str(base_dir)))
    assert _snapshot(out / "final") == before
    assert sorted(p.name for p in out.iterdir() if "final" in p.name) == ["final"]  # no half folder left
    monkeypatch.undo()
    train(model_from(base_dir), processor, rows, settings(out, steps=5, resume=True, model_dir=str(base_dir)))
    assert _snapshot(out / "final")["model.safetensors"] != before["model.safetensors"]


_KILL_WHILE_WRITING_FINAL = """
import os, shutil, sys
real = shutil.copy2
def killed(source, destination):
    if "final" in str(destination):  # the new weights are written; the tokenizer is being copied
        open(destination, "wb").write(b"half a file")
        os._exit(9)  # no cleanup of any kind, as under SIGKILL
    return real(source, destination)
shutil.copy2 = killed
from paligemma.finetune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_leaves_the_previous_final(tmp_path, base_dir, processor):
    out = _first_run(tmp_path, base_dir, processor)
    before = _snapshot(out / "final")
    args = ["--model", str(base_dir), "--data", str(tmp_path / "d.jsonl"), "--out", str(out), "--steps", "5",
            "--batch-size", "2", "--lr", "1e-3", "--resume", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _KILL_WHILE_WRITING_FINAL, *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    assert _snapshot(out / "final") == before
    from paligemma.finetune.cli import main
    assert main(args) == 0 and not (out / "final.tmp").exists()  # the kill's leftover is cleared
    assert _snapshot(out / "final")["model.safetensors"] != before["model.safetensors"]


def test_folder_swap_fallback_is_recovered_after_a_crash_between_its_renames(tmp_path, monkeypatch):
    target = tmp_path / "final"
    atomic_files.write_folder(target, lambda tmp: (tmp / "weights").write_text("old"))
    monkeypatch.setattr(atomic_files, "_exchange", lambda a, b: False)  # no renameat2: two renames
    real_rename, calls = os.rename, []

    def dies_on_the_second(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill between the two renames
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        atomic_files.write_folder(target, lambda tmp: (tmp / "weights").write_text("new"))
    monkeypatch.setattr(os, "rename", real_rename)
    assert not target.exists() and (tmp_path / "final.old" / "weights").read_text() == "old"
    atomic_files.recover_folder(target)
    assert (target / "weights").read_text() == "old"
    atomic_files.write_folder(target, lambda tmp: (tmp / "weights").write_text("new"))  # the fallback, unbroken
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_folder_swap_uses_one_rename_where_the_system_has_renameat2(tmp_path, monkeypatch):
    target = tmp_path / "final"
    atomic_files.write_folder(target, lambda tmp: (tmp / "weights").write_text("old"))
    if not atomic_files._exchange(tmp_path / "final", tmp_path / "final"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here: the two-rename fallback is tested above")

    def no_rename(a, b):
        raise AssertionError("a second rename means a moment without final/")

    monkeypatch.setattr(os, "rename", no_rename)
    atomic_files.write_folder(target, lambda tmp: (tmp / "weights").write_text("new"))
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_a_file_write_that_fails_leaves_the_old_file(tmp_path):
    path = tmp_path / "train_config.json"
    path.write_text('{"old": true}\n')
    with pytest.raises(KeyboardInterrupt), atomic_files.written_atomically(path) as tmp:
        tmp.write_text('{"new": tr')
        raise KeyboardInterrupt
    assert path.read_text() == '{"old": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_torn_metrics_line_from_a_killed_run_does_not_stop_the_resume(tmp_path, base_dir, processor):
    out = _first_run(tmp_path, base_dir, processor)
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 1.2')  # the kill came in the middle of a write
    train(model_from(base_dir), processor, str(tmp_path / "d.jsonl"), settings(out, steps=5, resume=True))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------- item 5: one run per folder

def test_a_second_run_into_a_run_folder_is_refused_and_changes_nothing(tmp_path, base_dir, processor):
    out = _first_run(tmp_path, base_dir, processor, steps=4, save_every=2)
    before = _snapshot(out)
    with pytest.raises(UsageError, match="already holds a fine-tuning run.*--resume.*--overwrite"):
        train(model_from(base_dir), processor, str(tmp_path / "d.jsonl"), settings(out, steps=2))
    assert _snapshot(out) == before

    from paligemma.finetune.cli import main
    args = ["--model", str(base_dir), "--data", str(tmp_path / "d.jsonl"), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--no-progress"]
    assert main(args) == 2 and _snapshot(out) == before
    assert main([*args, "--resume", "--overwrite"]) == 2  # argparse: one or the other
    with pytest.raises(ValueError, match="contradict"):
        settings(out, resume=True, overwrite=True)


def test_overwrite_deletes_the_old_run_and_nothing_else(tmp_path, base_dir, processor):
    out = _first_run(tmp_path, base_dir, processor, steps=4, save_every=2)
    (out / "notes.txt").write_text("mine")
    (out / "init").mkdir()
    (out / "init" / "config.json").write_text("{}")
    (out / ".metrics.jsonl.tmp").write_text("left by a kill")
    (out / "checkpoint-9.tmp").mkdir()
    train(model_from(base_dir), processor, str(tmp_path / "d.jsonl"), settings(out, steps=2, save_every=2,
                                                                              overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "final", "init", "metrics.jsonl", "notes.txt",
                                                     "skipped_rows.jsonl", "train_config.json"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "train_config.json").read_text())["steps"] == 2
    # A later --resume continues this run, not the old one (whose checkpoint-4 is gone).
    summary = train(model_from(base_dir), processor, str(tmp_path / "d.jsonl"), settings(out, steps=3, resume=True))
    assert summary.steps == 3 and len(summary.losses) == 1


def test_a_folder_without_a_run_is_used_as_it_is(tmp_path, base_dir, processor):
    out = tmp_path / "out"
    (out / "init").mkdir(parents=True)  # e.g. demo.train keeps its starting checkpoint there
    rows = [good_row(tmp_path, i) for i in range(4)]
    train(model_from(base_dir), processor, str(write_jsonl(tmp_path / "d.jsonl", rows)), settings(out, steps=1))
    assert (out / "init").is_dir() and (out / "final").is_dir()
    with pytest.raises(UsageError, match="no checkpoint-STEP"):
        train(model_from(base_dir), processor, str(tmp_path / "d.jsonl"), settings(out, steps=2, resume=True))
