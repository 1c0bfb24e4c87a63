"""Serving files of a trained model: every catalog item's embedding, a FAISS index of them, and the user tower as
ONNX (``python -m serve``; docs/serving.md)."""
