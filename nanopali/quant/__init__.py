"""Weight-only int8 / int4 quantization for inference (not part of the PaliGemma papers).

    weight_only.py  the math (quantize / dequantize, plain PyTorch), torch's packed int8 / int4 kernels
                    with a dequantize fallback, QuantizedLinear and QuantizedEmbedding (the tied LM head)
    convert.py      which layers are quantized (`quantize_model`, in place or on a meta skeleton),
                    the per-tensor entry a streaming loader calls, and the quantized checkpoint format

Data flows float weight → quantize_weight → buffers (qweight, scale[, zero]) → module → at each call
either the packed kernel (few rows: decoding) or dequantize + dense matmul (many rows: prefill).
"""
from .convert import (SCHEMES, check_scheme, layer_scheme, quantize_linear_weight, quantize_model, quantized_skeleton,
                      quantizing_place, save_quantized)
from .weight_only import (QuantizedEmbedding, QuantizedLinear, dequantize_int4, dequantize_int8, quantize_int4,
                          quantize_int8, quantize_weight)

__all__ = ["SCHEMES", "QuantizedEmbedding", "QuantizedLinear", "dequantize_int4", "dequantize_int8",
           "check_scheme", "layer_scheme", "quantize_int4", "quantize_int8", "quantize_linear_weight",
           "quantize_model", "quantize_weight", "quantized_skeleton", "quantizing_place", "save_quantized"]
