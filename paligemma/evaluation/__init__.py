"""Evaluating a model with each task's own metric, as the papers report it (docs/eval.md).

    from paligemma.evaluation import evaluate_examples, read_eval_jsonl
    examples = read_eval_jsonl("val.jsonl", "detect")
    result = evaluate_examples(model, processor, examples, "detect")   # result.metrics["map"]

Modules: `data` (JSONL rows with several references), `scoring` (answers -> metrics, shared with
fine-tuning's --eval-task), `runner` (batched greedy answers, then scoring), `cli` (`paligemma eval`).
The metrics themselves are plain functions in `paligemma.metrics`.
"""

from .data import TASKS, EvalExample, eval_example, read_eval_jsonl
from .runner import EvalResult, evaluate_examples
from .scoring import METRICS, TaskScores, score_answers

__all__ = ["METRICS", "TASKS", "EvalExample", "EvalResult", "TaskScores", "eval_example", "evaluate_examples",
           "read_eval_jsonl", "score_answers"]
