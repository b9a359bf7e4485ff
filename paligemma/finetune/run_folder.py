"""A fine-tuning run's folder: claiming it, and the run's log files, written so that no run is lost or mixed.

    out/train_config.json    the TrainConfig used                     (replaced in one step)
    out/metrics.jsonl        one record per logged step / evaluation  (appended, one write per record)
    out/skipped_rows.jsonl   the data rows that could not be used     (replaced in one step)
    out/checkpoint-STEP/ out/final/                                    (see checkpoint.py: swapped in whole)

A folder that already holds a run is refused unless the run is resumed or overwriting is asked
for; overwriting deletes the trainer's own files and folders first (nothing else: an `init/` or
notes beside them stay), so two runs never mix. The rank deciding is every rank, agreeing by an
all-reduce, so a refusal never leaves the other processes waiting.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from ..atomic_files import OLD_SUFFIX, TMP_SUFFIX, recover_folder, write_text_atomically
from ..errors import UsageError
from .data import DataError, SkippedRow
from .distributed import DistEnv, all_reduce_sum

CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
SKIPPED_FILE = "skipped_rows.jsonl"
FINAL_DIR = "final"
CHECKPOINT_PREFIX = "checkpoint-"


def run_entries(out: Path) -> list[Path]:
    """The files and folders of `out` that a fine-tuning run writes (including the leftovers of a killed one)."""
    if not out.is_dir():
        return []
    found = []
    for path in sorted(out.iterdir()):
        name = path.name.removeprefix(".")  # written_atomically's temporary files start with a dot
        for suffix in (TMP_SUFFIX, OLD_SUFFIX):
            name = name.removesuffix(suffix)
        step = name.removeprefix(CHECKPOINT_PREFIX)
        if name in (CONFIG_FILE, METRICS_FILE, SKIPPED_FILE, FINAL_DIR) or (step != name and step.isdigit()):
            found.append(path)
    return found


def claim(out: Path, resume, overwrite: bool, env: DistEnv) -> None:
    """Make `out` this run's: refuse a folder holding another run unless resuming or overwriting it.

    Overwriting deletes the old run's files first (rank 0). A folder swap interrupted by a crash is
    completed (`atomic_files.recover_folder`). Collective: every rank calls it.
    """
    found = run_entries(out)
    anyone_found = float(all_reduce_sum(torch.tensor(float(len(found))), env)) > 0
    if anyone_found and not resume and not overwrite:
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise UsageError(f"{out} already holds a fine-tuning run ({names or 'seen by rank 0'}): pass --resume to "
                         "continue it, or --overwrite to delete its files and start again (TrainConfig resume=True "
                         "/ overwrite=True), or choose another --out")
    if env.is_main:
        if overwrite:
            for path in found:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        else:
            for path in [out / FINAL_DIR, *out.glob(CHECKPOINT_PREFIX + "*")]:
                recover_folder(path)


def write_config(out: Path, config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / CONFIG_FILE, json.dumps(config, indent=1) + "\n")


class MetricsLog:
    """Appends metrics records to out/metrics.jsonl (rank 0) and hands them to the callback.

    Each record is one `write` of one line to a file opened for appending, so a killed run leaves at
    worst a torn last line; a resumed run drops that, and the records past its checkpoint (it writes
    them again), by rewriting the file in one step.
    """

    def __init__(self, out: Path, env: DistEnv, on_log, start_step: int):
        self.path = out / METRICS_FILE
        self.env, self.on_log = env, on_log
        if env.is_main and self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn last line of a killed run
                if isinstance(record, dict) and record.get("step", 0) <= start_step:
                    kept.append(line)
            write_text_atomically(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.env.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        finally:
            os.close(fd)
        if self.on_log is not None:
            self.on_log(record)


class SkipReport:
    """The data rows a run could not use, per data set ("train", "eval"): reported on stderr (rank 0,
    as warnings) and in out/skipped_rows.jsonl, and counted: more than `max_bad_fraction` of a set's
    rows unusable stops the run with a `DataError`.

    Each line of the file: {"data", "where" (file:line or row N), "reason", "found" ("load" or
    "batch"), "step" (the step whose batch found it), "index"}.
    """

    def __init__(self, out: Path, env: DistEnv, max_bad_fraction: float):
        self.path = out / SKIPPED_FILE
        self.env, self.max_bad_fraction = env, max_bad_fraction
        self.records: list[dict] = []
        self.totals: dict[str, int] = {}

    def add(self, data: str, total: int, rows: list[SkippedRow], step: int | None = None,
            warn: bool = True) -> None:
        """Record `rows` of data set `data` (of `total` rows) not recorded yet; raise past the limit."""
        self.totals[data] = total
        seen = {(r["data"], r["where"]) for r in self.records}
        new = []
        for row in rows:  # a row found by several processes, or twice in one batch, is recorded once
            if (data, row.where) not in seen:
                seen.add((data, row.where))
                new.append(row)
        if not new:
            return
        self.records += [{"data": data, "where": row.where, "reason": row.reason,
                          "found": "load" if step is None else "batch", "step": step, "index": row.index}
                         for row in new]
        self.save()
        if self.env.is_main and warn:
            for row in new:
                warnings.warn(f"skipped {row.where}: {row.reason}", stacklevel=2)
        self.check(data)

    def batch_records(self) -> list[dict]:
        """The records found while building batches: what a checkpoint keeps, for `restore`."""
        return [r for r in self.records if r["found"] == "batch"]

    def restore(self, records: list[dict]) -> None:
        """Take back a checkpoint's batch-time records (the rows an interrupted run found after its checkpoint
        are found again, at the same steps)."""
        for record in records:
            row = SkippedRow(record["where"], record["reason"], record["index"])
            self.add(record["data"], self.totals.get(record["data"], 0), [row], step=record["step"], warn=False)

    def known_bad(self, data: str) -> dict[int, str]:
        """index -> reason of the rows of `data` found unusable while building batches."""
        return {r["index"]: r["reason"] for r in self.records if r["data"] == data and r["index"] is not None}

    def check(self, data: str) -> None:
        total = self.totals.get(data, 0)
        bad = [r for r in self.records if r["data"] == data]
        if total and len(bad) > self.max_bad_fraction * total:
            what = "training" if data == "train" else "evaluation"
            raise DataError(f"{len(bad)} of the {total} rows of the {what} data ({len(bad) / total:.0%}) cannot be "
                            f"used, more than --max-bad-fraction {self.max_bad_fraction:g} allows; the first: "
                            f"{bad[0]['where']}: {bad[0]['reason']} (all are listed in {self.path}). Fix the data "
                            "or raise the limit")

    def save(self) -> None:
        """Write the file (rank 0), in one step; empty when no row was skipped."""
        if self.env.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
