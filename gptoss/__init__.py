"""gptoss: gpt-oss sparse-expert language models in JAX/Flax NNX, with experts kept packed in MXFP4."""

from gptoss.config import ConfigError, ModelConfig
from gptoss.engine import Generation, generate, generate_stream
from gptoss.io import CheckpointError, from_pretrained, save_pretrained
from gptoss.model import GptOss, pack_dense, random_model, unpack_dense
from gptoss.quant import MXFP4Array, QuantWeight, dequantize, quantize
from gptoss.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "Generation", "GptOss", "MXFP4Array", "ModelConfig", "QuantWeight",
           "__version__", "dequantize", "from_pretrained", "generate", "generate_stream", "load_tokenizer",
           "pack_dense", "quantize", "random_model", "save_pretrained", "unpack_dense"]
