"""`paligemma eval` and fine-tuning's --eval-task on the bundled demo model and shapes-world rows.

The metrics themselves are checked against their reference implementations in test_metrics.py; here
the command's numbers are recomputed from its own predictions file with paligemma.metrics, so the
file, the table and the JSON summary are shown to agree, row by row and in total.
"""

from __future__ import annotations

import json

import pytest

from paligemma import metrics
from paligemma.cli import main
from paligemma.cli_common import DEMO_MASK_CODEC, DEMO_MODEL_DIR
from paligemma.demo.recipe import EVAL_SEED0, SCENE_SIZE
from paligemma.demo.scenes import (
    SHAPES,
    caption,
    count,
    count_answer,
    count_prompt,
    detect_answer,
    detect_prompt,
    generate_scene,
    segment_answer,
    segment_prompt,
)
from paligemma.errors import UsageError
from paligemma.evaluation.cli import write_new_file
from paligemma.segmentation import parse_segmentations
from paligemma.tasks import parse_detections
from paligemma.vqvae import load_mask_codec

SIZE = (SCENE_SIZE, SCENE_SIZE)


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Four held-out scenes as PNGs and one JSONL file per task (a few rows each)."""
    root = tmp_path_factory.mktemp("shapes-eval")
    (root / "images").mkdir()
    codec = load_mask_codec(DEMO_MASK_CODEC)
    rows = {task: [] for task in ("caption", "vqa", "detect", "refer", "segment")}
    for i in range(4):
        scene = generate_scene(EVAL_SEED0 + 70_000 + i)
        image = f"images/{i}.png"
        scene.image.save(root / image)
        text = caption(scene)
        rows["caption"].append({"image": image, "prefix": "caption en", "suffix": [text, text.replace(",", " and")]})
        shape = SHAPES[i % len(SHAPES)]
        answer = count_answer(scene, shape)
        rows["vqa"].append({"image": image, "prefix": count_prompt(shape), "answers": [answer] * 8 + ["lots", "?"]})
        rows["detect"] += [{"image": image, "prefix": detect_prompt(s), "suffix": detect_answer(scene, s)}
                           for s in SHAPES[:2]]
        rows["refer"] += [{"image": image, "prefix": detect_prompt(s), "suffix": detect_answer(scene, s)}
                          for s in SHAPES if count(scene, s) == 1][:1]
        rows["segment"] += [{"image": image, "prefix": segment_prompt(s), "suffix": segment_answer(scene, s, codec)}
                            for s in SHAPES if count(scene, s)][:1]
    return {task: _write(root / f"{task}.jsonl", task_rows) for task, task_rows in rows.items()}


def _evaluate(capsys, data, task, out, *extra):
    code = main(["eval", "--data", str(data), "--task", task, "--json", "--out", str(out), "--no-progress",
                 "--batch-size", "4", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return json.loads(captured.out), records


def test_caption_cider_and_predictions_file(shapes, tmp_path, capsys):
    summary, records = _evaluate(capsys, shapes["caption"], "caption", tmp_path / "pred.jsonl")
    assert summary["task"] == "caption" and summary["num_examples"] == len(records) == 4
    assert summary["model"] == str(DEMO_MODEL_DIR) and summary["predictions"] == str(tmp_path / "pred.jsonl")
    rows = [json.loads(line) for line in shapes["caption"].read_text().splitlines()]
    assert [r["references"] for r in records] == [row["suffix"] for row in rows]  # both references kept
    assert [r["row"] for r in records] == [f"{shapes['caption']}:{n}" for n in range(1, 5)]
    predictions = [r["prediction"] for r in records]
    references = [r["references"] for r in records]
    assert summary["metrics"]["cider"] == pytest.approx(metrics.cider(predictions, references), rel=1e-12)
    assert [r["cider"] for r in records] == pytest.approx(metrics.cider_scores(predictions, references), rel=1e-12)
    assert summary["metrics"]["exact_match"] == sum(r["exact_match"] for r in records) / 4
    assert all(r["finish_reason"] in ("eos", "length") for r in records)
    assert summary["metrics"]["exact_match"] >= 0.5  # the demo model captions most held-out scenes exactly


def test_vqa_accuracy_from_ten_answers(shapes, tmp_path, capsys):
    summary, records = _evaluate(capsys, shapes["vqa"], "vqa", tmp_path / "pred.jsonl")
    assert all(len(r["references"]) == 10 for r in records)
    scores = [metrics.vqa_score(r["prediction"], r["references"]) for r in records]
    assert [r["vqa_accuracy"] for r in records] == scores
    assert summary["metrics"]["vqa_accuracy"] == pytest.approx(sum(scores) / len(scores))
    assert set(scores) <= {0.0, 1.0}  # eight humans agree: a match is 1, anything else 0


def test_ocr_anls_table(shapes, tmp_path, capsys):
    code = main(["eval", "--data", str(shapes["caption"]), "--task", "ocr", "--limit", "2", "--no-progress",
                 "--out", str(tmp_path / "pred.jsonl")])
    out = capsys.readouterr().out
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    expected = metrics.anls([r["prediction"] for r in records], [r["references"] for r in records])
    assert f"| anls | {expected:.4f} |" in out and "| ocr metric (2 rows) | score |" in out
    assert "2 rows in" in out and str(tmp_path / "pred.jsonl") in out


def test_score_answers_without_a_model():
    from paligemma.evaluation import score_answers

    scores = score_answers("ocr", ["OPEN 24 HOURS", "0pen"], [["open 24 hours"], ["open", "closed"]])
    assert scores.metrics == pytest.approx({"anls": (1.0 + 0.75) / 2, "exact_match": 0.0})
    assert [r["exact_match"] for r in score_answers("vqa", ["yes "], [["yes"] * 10]).per_example] == [True]
    box = "<loc0000><loc0000><loc0511><loc0511> cat"
    refer = score_answers("refer", [box + " ; " + box, ""], [[box], [box]], image_sizes=[(100, 50)] * 2)
    assert refer.metrics == {"box_accuracy": 0.5, "malformed_answers": 0}
    assert refer.per_example[1] == {"box": None, "iou": 0.0, "errors": []}
    with pytest.raises(UsageError, match="needs each image's"):
        score_answers("detect", [box], [[box]])
    with pytest.raises(UsageError, match="unknown evaluation task"):
        score_answers("count", ["1"], [["1"]])


def test_detect_map_from_the_answers(shapes, tmp_path, capsys):
    summary, records = _evaluate(capsys, shapes["detect"], "detect", tmp_path / "pred.jsonl")
    # Each box carries the probability the model wrote it with: the score COCO's ranking uses.
    predicted = [[(o["label"], o["box"], o["score"]) for o in r["objects"]] for r in records]
    assert all(0.0 < score <= 1.0 for objects in predicted for _, _, score in objects)
    parsed = [parse_detections(r["prediction"], SIZE).objects for r in records]
    assert [[(d.label, d.box) for d in p] for p in parsed] == [[(label, box) for label, box, _ in p] for p in predicted]
    truth = [parse_detections(r["references"][0], SIZE).objects for r in records]
    expected = metrics.detection_map(predicted, truth)
    counts = metrics.detection_matches(predicted, truth)
    assert {k: summary["metrics"][k] for k in ("map", "map50", "map75")} == pytest.approx(expected)
    assert summary["metrics"]["recall50"] == pytest.approx(counts.recall)
    assert summary["metrics"]["precision50"] == pytest.approx(counts.precision)
    assert sum(r["matched50"] for r in records) == counts.matched
    assert summary["metrics"]["map50"] > 0.5 and summary["metrics"]["malformed_answers"] == 0


def test_refer_box_accuracy(shapes, tmp_path, capsys):
    summary, records = _evaluate(capsys, shapes["refer"], "refer", tmp_path / "pred.jsonl")
    truth = [parse_detections(r["references"][0], SIZE).objects[0].box for r in records]
    assert [r["iou"] for r in records] == pytest.approx([metrics.box_iou(r["box"], t) for r, t in zip(records, truth)])
    assert summary["metrics"]["box_accuracy"] == metrics.box_accuracy([r["box"] for r in records], truth)


def test_segment_miou_with_the_checkpoint_codec(shapes, tmp_path, capsys):
    summary, records = _evaluate(capsys, shapes["segment"], "segment", tmp_path / "pred.jsonl")
    codec = load_mask_codec(DEMO_MASK_CODEC)
    predicted = [parse_segmentations(r["prediction"], SIZE, codec).objects for r in records]
    truth = [parse_segmentations(r["references"][0], SIZE, codec).objects for r in records]
    assert summary["metrics"]["miou"] == pytest.approx(metrics.mask_miou(predicted, truth))
    assert 0.5 < summary["metrics"]["miou"] <= 1.0


def test_problems_are_found_before_the_model_loads(shapes, tmp_path, capsys, monkeypatch):
    import paligemma.evaluation.cli as eval_cli

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was found")

    monkeypatch.setattr(eval_cli, "load", no_load)
    existing = tmp_path / "pred.jsonl"
    existing.write_text("keep me\n")
    detect_rows = [json.loads(line) for line in shapes["detect"].read_text().splitlines()]
    cases = [
        (["--data", str(shapes["caption"]), "--task", "caption", "--out", str(existing)], "already exists"),
        (["--data", str(shapes["caption"]), "--task", "caption", "--out", str(tmp_path / "no" / "p.jsonl")],
         "does not exist"),
        (["--data", str(shapes["caption"]), "--task", "detect"], "caption.jsonl:1: a detect row takes one reference"),
        (["--data", str(_write(shapes["detect"].parent / "bad_reference.jsonl",  # beside the images
                               [{**detect_rows[0], "suffix": "<loc0001> circle"}])),
          "--task", "detect"], "bad_reference.jsonl:1: the reference is not a valid detect answer"),
        (["--data", str(_write(tmp_path / "noref.jsonl", [{"image": "x.png", "prefix": "caption en"}])),
          "--task", "caption"], "noref.jsonl:1: missing field 'suffix'"),
        (["--data", str(_write(tmp_path / "noimg.jsonl", [{"image": "x.png", "prefix": "p", "suffix": ["a"]}])),
          "--task", "ocr"], "noimg.jsonl:1: image"),
        (["--data", str(shapes["caption"]), "--task", "caption", "--limit", "0"], "--limit must be >= 1"),
    ]
    for args, message in cases:
        assert main(["eval", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert existing.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noimg.jsonl", "noref.jsonl", "pred.jsonl"]


def test_predictions_file_is_created_whole_or_not_at_all(tmp_path):
    path = tmp_path / "p.jsonl"
    write_new_file(path, "a\n")
    with pytest.raises(UsageError, match="appeared while evaluating"):
        write_new_file(path, "b\n")
    assert path.read_text() == "a\n" and [p.name for p in tmp_path.iterdir()] == ["p.jsonl"]  # no temporary left


def test_finetune_eval_task_logs_the_task_metrics(shapes, tmp_path, capsys):
    out = tmp_path / "run"
    train_rows = [{**row, "suffix": row["suffix"][0]} for row in map(json.loads, shapes["caption"].read_text()
                                                                      .splitlines())]
    data = _write(shapes["caption"].parent / "train_captions.jsonl", train_rows)
    code = main(["finetune", "--model", str(DEMO_MODEL_DIR), "--data", str(data), "--eval-data", str(data),
                 "--eval-task", "caption", "--out", str(out), "--steps", "1", "--batch-size", "2", "--lr", "1e-6",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [record for record in logged if "eval_loss" in record]
    assert len(evals) == 1 and {"cider", "exact_match"} <= set(evals[0])
    assert json.loads(captured.out)["eval"]["cider"] == evals[0]["cider"]
    # The same rows and (nearly) the same weights through `paligemma eval`: the same metric, by the same code.
    summary, _ = _evaluate(capsys, data, "caption", tmp_path / "pred.jsonl", "--model", str(out / "final"),
                           "--no-optimize")
    assert summary["metrics"]["exact_match"] == evals[0]["exact_match"]


def test_finetune_eval_task_needs_eval_data(shapes, tmp_path, capsys):
    assert main(["finetune", "--model", str(DEMO_MODEL_DIR), "--data", str(shapes["caption"]), "--eval-task",
                 "caption", "--out", str(tmp_path / "run")]) == 2
    assert "--eval-task scores the --eval-data set" in capsys.readouterr().err
