"""Fine-tuning PaliGemma on your own data, on one machine or many (torchrun + DDP on gloo).

    from paligemma.finetune import TrainConfig, train
    model, processor = paligemma.load_model(path, dtype=torch.float32), paligemma.load_processor(path)
    summary = train(model, processor, "train.jsonl", TrainConfig(out_dir="out", model_dir=path, epochs=3),
                    eval_data="val.jsonl")

Modules: `data` (JSONL rows, dataset, collators, sampler), `trainer` (the loop), `run_folder` (claiming
`--out`, the run's log files, the skipped-rows report), `step` (one step's forward and backward
passes, the token-weighted loss), `schedule` (warmup + cosine, AdamW),
`freezing`, `lora` (peft, optional), `checkpoint` (HF layout + resumable state, no pickles),
`distributed` (torchrun env, gloo), `evaluation`, `cli`.
"""

from .checkpoint import latest_checkpoint
from .data import Collator, DataError, Example, FinetuneDataset, SkippedRow, TrainingCollator
from .evaluation import evaluate
from .freezing import FREEZABLE, set_trainable
from .lora import apply_lora, has_lora, load_adapter, merge_lora, save_adapter
from .schedule import lr_at
from .trainer import TrainConfig, TrainSummary, train

__all__ = [
    "Collator", "DataError", "Example", "FREEZABLE", "FinetuneDataset", "SkippedRow", "TrainConfig", "TrainSummary",
    "TrainingCollator", "apply_lora", "evaluate", "has_lora", "latest_checkpoint", "load_adapter", "lr_at",
    "merge_lora", "save_adapter", "set_trainable", "train",
]
