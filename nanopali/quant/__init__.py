"""Weight-only int8 / int4 quantization for inference (not part of the PaliGemma papers), and the frozen
base that LoRA trains through (QLoRA: train/qlora.py; the layers are differentiable w.r.t. their input).

    weight_only.py  the math (quantize / dequantize, plain PyTorch): the reference path
    modules.py      QuantizedLinear and QuantizedEmbedding (the tied LM head): torch's packed int8 / int4
                    kernels for decoding, dequantize + dense matmul for prefill, one fallback
    cpu_int4.py     the layout of torch's CPU int4 kernel: the only copy an int4 layer keeps on a CPU
    convert.py      which layers are quantized (`quantize_model`, in place or on a meta skeleton), and
                    `quantizing_place`, which nanopali.load(quantize=...) hands each tensor to as it is read
The quantized checkpoint format lives with the other formats: formats/quantized.py.

Data flows float weight → quantize_weight → buffers (qweight, scale[, zero]) → module → at each call
either the packed kernel (few rows: decoding) or dequantize + dense matmul (many rows: prefill).
"""
from .convert import (SCHEMES, check_scheme, layer_scheme, quantize_linear_weight, quantize_model, quantized_skeleton,
                      quantizing_place)
from .modules import QuantizedEmbedding, QuantizedLinear
from .weight_only import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, quantize_weight

__all__ = ["SCHEMES", "QuantizedEmbedding", "QuantizedLinear", "dequantize_int4", "dequantize_int8",
           "check_scheme", "layer_scheme", "quantize_int4", "quantize_int8", "quantize_linear_weight",
           "quantize_model", "quantize_weight", "quantized_skeleton", "quantizing_place"]
