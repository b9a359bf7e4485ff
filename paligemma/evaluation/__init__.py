"""Evaluating a model with each task's own metric, as the papers report it (docs/eval.md).

    from paligemma.evaluation import evaluate_examples
    from paligemma.evaluation.data import read_eval_jsonl
    result = evaluate_examples(model, processor, read_eval_jsonl("val.jsonl", "detect"), "detect")
    result.metrics["map"]

Modules: `scoring` (answers -> metrics, shared with fine-tuning's --eval-task), `runner` (batched
greedy answers, then scoring), `data` (JSONL rows with several references, read with fine-tuning's
row checks) and `cli` (`paligemma eval`). The metrics themselves are plain functions in
`paligemma.metrics`. Fine-tuning imports this package and `data` imports fine-tuning's, so this
`__init__` leaves `data` and `cli` out (importing them here would make the two packages import
each other).
"""

from .runner import EvalResult, default_max_new_tokens, evaluate_examples
from .scoring import METRICS, TASKS, ReferenceAnswerError, TaskScores, score_answers

__all__ = ["METRICS", "TASKS", "EvalResult", "ReferenceAnswerError", "TaskScores", "default_max_new_tokens",
           "evaluate_examples", "score_answers"]
