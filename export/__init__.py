"""Export: wrap checkpoints as ONNX graphs (classifier, embedder, reconstructor), check them, derive variants."""
