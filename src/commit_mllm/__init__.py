"""commit-mllm: coordinated multimodal instruction tuning (CoMMIT)."""

__version__ = "0.1.0"
