"""PaliGemma 1 and 2 from scratch in PyTorch.

    import paligemma, torch
    model = paligemma.load_model("path/to/checkpoint", dtype=torch.bfloat16)
    out = model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                token_type_ids=token_type_ids, labels=labels)
"""

from .beam_search import beam_search
from .checkpoint_layout import save_model
from .config import PRESETS, ConfigError, PaliGemmaConfig, TextConfig, VisionConfig
from .constrained import AnswerGrammar
from .errors import PaliGemmaError, UsageError
from .generation import GenerationResult, StreamEvent, generate, generate_detailed, stream_generate
from .hub import CheckpointError
from .images import ImageError, ImageProcessor, load_image
from .kv_cache import KVCache
from .loading import load_model
from .model import PaliGemma, PaliGemmaOutput
from .processor import Processor, ProcessorOutput, load_processor
from .scoring import Classification, classify, score
from .segmentation import Segmentation, SegmentationResult, format_segmentations, parse_segmentations
from .spm_builder import build_paligemma_spm
from .tasks import (
    Detection,
    DetectionResult,
    TokenSpan,
    encode_box,
    filter_detections,
    format_detections,
    parse_detections,
)
from .tokenizer import Tokenizer, TokenizerError
from .vqvae import MaskCodec, MaskCodecConfig, load_mask_codec, save_mask_codec

__all__ = [
    "CheckpointError", "ConfigError", "Detection", "DetectionResult", "GenerationResult", "ImageError",
    "ImageProcessor", "KVCache", "MaskCodec", "MaskCodecConfig", "PRESETS", "PaliGemma", "PaliGemmaConfig",
    "PaliGemmaError", "PaliGemmaOutput", "Processor", "ProcessorOutput", "Segmentation", "SegmentationResult",
    "StreamEvent", "TextConfig", "Tokenizer", "TokenizerError", "UsageError", "VisionConfig", "build_paligemma_spm",
    "encode_box", "format_detections", "format_segmentations", "generate", "generate_detailed", "load_image",
    "load_mask_codec", "load_model", "load_processor", "parse_detections", "parse_segmentations", "save_mask_codec",
    "save_model", "stream_generate",
    # decoding and scoring (docs/decoding.md)
    "AnswerGrammar", "Classification", "TokenSpan", "beam_search", "classify", "filter_detections", "score",
]
__version__ = "0.1.0"
