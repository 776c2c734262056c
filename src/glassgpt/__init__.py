"""glassgpt: a GPT you can see through.

    from glassgpt import GPT, GPTConfig, get_tokenizer
    model = GPT.from_preset("gpt2")
    tokenizer = get_tokenizer("gpt2")
"""

from glassgpt.config import PRESETS, GPTConfig, get_preset
from glassgpt.model import GPT, KVCache
from glassgpt.tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "get_preset", "get_tokenizer", "CharTokenizer",
           "GPT2Tokenizer"]
__version__ = "0.1.0"
