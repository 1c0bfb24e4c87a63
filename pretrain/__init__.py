"""Pretraining of content-based multimodal sequential recommenders under DeepSpeed ZeRO."""

__version__ = "0.1.0"
