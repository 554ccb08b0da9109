"""deepserve's serving half: the Open Inference Protocol over gRPC on onnxruntime. Never imports torch."""

__version__ = "0.1.0"
