"""Image tokenizers: LlamaGen VQ (VQ-16 / VQ-8) and the IAR2 dual-codebook quantizer."""
from iar_jax.tokenizer.checkpoint import load_tokenizer
from iar_jax.tokenizer.quantizer import DualQuantizer, QuantizerOutput, VectorQuantizer, codebook_usage
from iar_jax.tokenizer.vq_model import (
    VQConfig,
    VQModel,
    VQTokenizer,
    abstract_params,
    build_model,
    check_images,
    check_params,
    init_params,
)

__all__ = [
    "VQConfig", "VQModel", "VQTokenizer", "VectorQuantizer", "DualQuantizer", "QuantizerOutput",
    "build_model", "init_params", "abstract_params", "check_images", "check_params", "codebook_usage",
    "load_tokenizer",
]
