"""Deployment export: ONNX and StableHLO artefacts, and the official PyTorch checkpoint layout."""
