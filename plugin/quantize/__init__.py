"""`quantize`: make a GPTQ checkpoint, in AutoGPTQ's on-disk format, from an fp16/bf16/fp32 model or a GGUF.

settings.py     presets, defaults and explicit options, validated as a `QuantizeConfig`
source.py       the source model: a GGUF or a transformers directory, whole or block by block
calibration.py  token windows from text; the states the model hands its first block
block.py        one block's GPTQ: steps of layers fed the same input, each fitted in turn
gptq.py         the GPTQ algorithm for one layer; gptq_layer.py: a quantized layer as integers, packed
heap.py         glibc's allocator policy while the quantizer runs
pipeline.py     `quantize()`: source → calibration → block by block → writer
command.py      the `gptq-bridge quantize` command
"""

from ..errors import CalibrationError, QuantizeError
from .block import BlockJob, LayerReport, quantize_block
from .calibration import calibration_windows
from .pipeline import Progress, QuantizeResult, quantize
from .settings import DEFAULTS, PRESETS, resolve_settings
from .source import Source, load_model_by_blocks, load_source, open_source

__all__ = [
    "quantize",
    "Progress",
    "QuantizeResult",
    "LayerReport",
    "PRESETS",
    "DEFAULTS",
    "resolve_settings",
    "calibration_windows",
    "open_source",
    "load_source",
    "load_model_by_blocks",
    "Source",
    "BlockJob",
    "quantize_block",
    "QuantizeError",
    "CalibrationError",
]
