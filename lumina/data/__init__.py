"""Data: offline tiktoken tokenizers (``tokenizer.py``); datasets and batching follow."""

from lumina.data.tokenizer import Tokenizer, TokenizerError, get_tokenizer, install_offline_cache

__all__ = ["Tokenizer", "TokenizerError", "get_tokenizer", "install_offline_cache"]
