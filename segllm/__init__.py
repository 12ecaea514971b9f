"""SegLLM: multi-round reasoning segmentation with conversational mask memory."""

__version__ = "0.1.0"
