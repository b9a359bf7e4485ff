"""Offline inference over a dataset, resumable and sharded over torchrun's processes (`paligemma batch`).

    rows = read_jsonl_rows("rows.jsonl")            # {"image", "prompt"[, "id"]} per line
    rows = folder_rows("photos/", "caption en")     # or every image of a folder, one prompt
    summary = run_batch(model, processor, rows, Path("answers.jsonl"), batch_size=8)

The output has one JSON line per input row, in input order: `{"id", "image", "prompt", "answer",
"finish_reason"}`, plus `detections` / `detection_errors` for detect prompts and `segmentations` /
`segmentation_errors` for segment prompts when a mask codec is given (the records of `paligemma
generate --json`, boxes in original-image pixels), or `{"id", "image", "prompt", "error"}` for a row
that could not be answered (a bad line, an unreadable image, a prompt too long for the context).

How the work is kept and shared (docs/batch.md):

- **shards**: under torchrun, input row i belongs to rank i % WORLD_SIZE, so each rank's share is
  fixed by the input alone;
- **part files**: each rank appends every finished batch to its own `OUT.parts/rank-R-of-W.jsonl`
  with one write and an fsync. A kill can tear only the last batch's lines, which the next start
  cuts off: a kill loses at most one batch;
- **resume**: on start every part file in `OUT.parts/` is read and the ids it holds are skipped,
  whatever number of processes wrote it, so a restart (with any number of processes) does only what
  is left;
- **merge**: when every rank is done, rank 0 writes the records into OUT in input order (a
  temporary file linked under OUT's name, never over an existing file), then removes `OUT.parts/`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from .data_import.yolo import IMAGE_SUFFIXES
from .errors import PaliGemmaError, UsageError
from .generation import generate_detailed
from .images import load_image
from .process_group import join_process_group
from .progress import progress_bar
from .segmentation import parse_segmentations
from .tasks import parse_detections, prompt_task


@dataclass(frozen=True)
class BatchRow:
    index: int  # position in the input: the row's place in the output and what picks its shard
    id: str | int  # the input's "id", else the line number (JSONL) or the path under the folder
    image: str | None  # as given (a path relative to the JSONL file's folder, or absolute)
    path: Path | None  # the image file to read
    prompt: str | None
    error: str | None = None  # what is wrong with the input line itself

    def record(self, **fields) -> dict:
        return {"id": self.id, "image": self.image, "prompt": self.prompt, **fields}


@dataclass
class BatchSummary:
    rows: int  # input rows
    skipped: int  # rows already done by an earlier run
    answered: int  # rows answered by this run, all ranks
    errors: int  # rows recorded with an error by this run, all ranks
    seconds: float
    world_size: int = 1

    @property
    def rows_per_second(self) -> float:
        return (self.answered + self.errors) / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------- input rows

def read_jsonl_rows(path: str | os.PathLike) -> list[BatchRow]:
    """One row per non-blank line; a line that is not a valid row becomes a row with its `error`.

    Raises UsageError for ids given twice (a resumed run could not tell those rows apart).
    """
    path = Path(path)
    rows, seen = [], {}
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            row = _jsonl_row(len(rows), number, line, path.parent)
            if row.id in seen:
                raise UsageError(f"{path}:{number}: id {row.id!r} is also the id of line {seen[row.id]}: "
                                 "ids must be unique (resuming skips rows by id)")
            seen[row.id] = number
            rows.append(row)
    return rows


def _jsonl_row(index: int, number: int, line: str, base: Path) -> BatchRow:
    try:
        value = json.loads(line)
    except ValueError as err:
        return BatchRow(index, number, None, None, None, f"line {number} is not JSON: {err}")
    if not isinstance(value, dict):
        return BatchRow(index, number, None, None, None, f"line {number} is not a JSON object")
    row_id = value.get("id", number)
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return BatchRow(index, number, None, None, None, f"line {number}: id must be a string or an integer")
    image, prompt = value.get("image"), value.get("prompt")
    problem = None
    if not isinstance(image, str) or not image:
        problem = f"line {number}: 'image' must be a file path"
    elif not isinstance(prompt, str) or not prompt.strip():
        problem = f"line {number}: 'prompt' must be a non-empty string"
    path = None if problem else (Path(image) if Path(image).is_absolute() else base / image)
    return BatchRow(index, row_id, image if isinstance(image, str) else None, path,
                    prompt if isinstance(prompt, str) else None, problem)


def folder_rows(folder: str | os.PathLike, prompt: str) -> list[BatchRow]:
    """Every image file under `folder` (recursively, sorted by path), each with `prompt`; ids are the
    paths relative to `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"--images {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"--images {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [BatchRow(i, p.relative_to(folder).as_posix(), p.relative_to(folder).as_posix(), p, prompt)
            for i, p in enumerate(files)]


# ---------------------------------------------------------------------- part files, resume and merge

def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def read_part(path: Path, truncate_torn_tail: bool = False) -> list[tuple[str | int, str]]:
    """(id, line) of every complete record in a part file. A torn last line (a kill mid-write) is
    left out and, with `truncate_torn_tail` (the file's own writer, before appending), cut off."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # what follows the last newline was never finished
    if end < len(data) and truncate_torn_tail:
        with path.open("r+b") as file:
            file.truncate(end)
    records = []
    for number, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            records.append((json.loads(line)["id"], line))
        except (ValueError, TypeError, KeyError):  # only a hand-edited or damaged file has such a line
            raise UsageError(f"{path}:{number} is not a record this command wrote: remove that line (the row is "
                             "then answered again) or the whole file") from None
    return records


def completed_ids(out: Path) -> set:
    """Ids already answered (or recorded with an error) in any part file of `out`."""
    folder = parts_dir(out)
    if not folder.is_dir():
        return set()
    return {row_id for part in sorted(folder.glob("*.jsonl")) for row_id, _ in read_part(part)}


def append_records(path: Path, records: list[dict]) -> None:
    """Append a batch's records as one write, then fsync: after a kill the file ends with whole
    batches and at most one torn batch, which `read_part` cuts off."""
    data = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def merge_parts(out: Path, rows: Sequence[BatchRow]) -> None:
    """Write every row's record into `out` in input order, then remove the part files.

    Raises UsageError when `out` exists (never overwritten) or a row has no record (rows still to do,
    or part files of other machines not copied here: docs/batch.md).
    """
    folder = parts_dir(out)
    lines: dict = {}
    for part in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        for row_id, line in read_part(part):
            lines.setdefault(row_id, line)
    missing = [row.id for row in rows if row.id not in lines]
    if missing:
        raise UsageError(f"{len(missing)} of {len(rows)} rows have no record in {folder} (first: {missing[0]!r}): "
                         "run the same command again to finish them; across machines without a shared folder, "
                         "copy every machine's part files into it first")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as file:
            for row in rows:
                file.write(lines[row.id] + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp, out)  # create-if-absent: never replaces a file that appeared meanwhile
        except FileExistsError:
            raise UsageError(f"{out} appeared while the batch ran; the answers are kept in {folder}") from None
    finally:
        tmp.unlink(missing_ok=True)
    for part in folder.glob("*.jsonl"):
        part.unlink()
    folder.rmdir()


def check_output(out: Path) -> None:
    """Refuse an output path that exists (a finished run) or whose folder does not."""
    if out.exists():
        leftover = f"; its leftover {parts_dir(out)} may be removed" if parts_dir(out).exists() else ""
        raise UsageError(f"--out {out} already exists (a finished run{leftover}): choose another name or remove it, "
                         "it is never overwritten")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")


# ---------------------------------------------------------------------- processes

@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1

    def owns(self, row: BatchRow) -> bool:
        return row.index % self.world_size == self.rank

    def part_file(self, out: Path) -> Path:
        return parts_dir(out) / f"rank-{self.rank:05d}-of-{self.world_size:05d}.jsonl"


def join_processes() -> Shard:
    """This process's shard: torchrun's RANK / WORLD_SIZE (joining a gloo process group), else one process."""
    return Shard(*join_process_group("gloo"))


def _sum_over_ranks(values: list[int], shard: Shard) -> list[int]:
    total = torch.tensor(values, dtype=torch.int64)
    if shard.world_size > 1:
        dist.all_reduce(total)  # also a barrier: every rank has finished its rows
    return total.tolist()


# ---------------------------------------------------------------------- answering

def run_batch(model, processor, rows: Sequence[BatchRow], out: Path, batch_size: int = 8, max_new_tokens: int = 64,
              codec=None, shard: Shard = Shard(), progress: bool = False) -> BatchSummary:
    """Answer this shard's rows not done yet, `batch_size` at a time (greedy), appending each batch
    to the shard's part file; then, once every rank is done, rank 0 merges the parts into `out`."""
    started = time.perf_counter()
    part = shard.part_file(out)
    part.parent.mkdir(exist_ok=True)
    if part.exists():
        read_part(part, truncate_torn_tail=True)
    done = completed_ids(out)  # other ranks may already be appending theirs: only this shard's rows count
    mine = [row for row in rows if shard.owns(row)]
    todo = [row for row in mine if row.id not in done]
    bar = progress_bar(progress and shard.rank == 0, len(todo), "img",
                       "answering" if shard.world_size == 1 else f"rank 0 of {shard.world_size}")
    answered = errors = 0
    try:
        for first in range(0, len(todo), batch_size):
            records = answer_rows(model, processor, todo[first:first + batch_size], max_new_tokens, codec)
            append_records(part, records)
            failed = sum("error" in record for record in records)
            answered, errors = answered + len(records) - failed, errors + failed
            if bar is not None:
                bar.update(len(records))
    finally:
        if bar is not None:
            bar.close()
    answered, errors, skipped = _sum_over_ranks([answered, errors, len(mine) - len(todo)], shard)
    if shard.rank == 0:
        merge_parts(out, rows)
    if shard.world_size > 1:
        # Every rank waits for the merge: no rank leaves (and tears down its gloo connections, which
        # aborted a process that was still merging, seen as SIGABRT under load) before the output exists.
        dist.barrier()
    return BatchSummary(len(rows), skipped, answered, errors, time.perf_counter() - started, shard.world_size)


def answer_rows(model, processor, rows: Sequence[BatchRow], max_new_tokens: int, codec=None) -> list[dict]:
    """One record per row, in order: its answer, or the error that stopped it."""
    context = model.config.text.max_position_embeddings
    problems: dict[int, str] = {}
    images = {}
    for row in rows:
        if row.error is not None:
            problems[row.index] = row.error
            continue
        try:
            prompt_tokens = len(processor.encode_prefix(row.prompt, 1))
            if prompt_tokens + max_new_tokens > context:
                raise UsageError(f"the prompt is {prompt_tokens} tokens (image tokens included) + max_new_tokens "
                                 f"{max_new_tokens}, past the model's context of {context} tokens")
            images[row.index] = load_image(row.path, processor.image_processor.max_pixels)
        except (PaliGemmaError, OSError) as err:
            problems[row.index] = str(err)
    ready = [row for row in rows if row.index in images]
    results = {}
    try:
        answers = generate_detailed(model, processor, [images[row.index] for row in ready],
                                    [row.prompt for row in ready], max_new_tokens=max_new_tokens) if ready else []
        results = {row.index: result for row, result in zip(ready, answers)}
    except PaliGemmaError:  # a row the checks above let through: answer one at a time to find it
        for row in ready:
            try:
                [results[row.index]] = generate_detailed(model, processor, [images[row.index]], [row.prompt],
                                                         max_new_tokens=max_new_tokens)
            except PaliGemmaError as err:
                problems[row.index] = str(err)
    records = []
    for row in rows:
        if row.index in problems:
            records.append(row.record(error=problems[row.index]))
            continue
        result, image = results[row.index], images[row.index]
        records.append(row.record(answer=result.text, finish_reason=result.finish_reason,
                                  **_parsed(row.prompt, result, (image.shape[1], image.shape[0]), codec)))
    return records


def _parsed(prompt: str, result, size: tuple[int, int], codec) -> dict:
    """Detections (detect prompts) or masks (segment prompts, with a codec), in original-image pixels."""
    task = prompt_task(prompt)
    if task == "detect":
        found = parse_detections(result.text, size, result.token_spans())
        return {"detections": [d.as_json() for d in found.objects], "detection_errors": found.errors}
    if task == "segment" and codec is not None:
        found = parse_segmentations(result.text, size, codec, result.token_spans())
        return {"segmentations": [o.as_json() for o in found.objects], "segmentation_errors": found.errors}
    return {}


