"""A JAX-free runtime for exported models: NumPy and onnxruntime only.

``video.video_depth`` runs the official long-video algorithm around an exported
clip model and ``video.stream_depth`` the streaming loop around an exported
streaming model; ``model.ExportedModel`` opens either from its ``.onnx`` and ``.onnx.json``
(``metadata``).
Nothing here (or in the modules it imports) may import JAX.
"""
