"""deepserve's training half: offline PyTorch jobs that publish ONNX models into a model repository."""
