"""sglang-evict: learned, head-granular KV-cache eviction (TrimKV / DBTrimKV) for SGLang."""

__version__ = "0.1.0"
