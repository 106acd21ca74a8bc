"""M4V: Multi-Modal Mamba for text-to-video generation."""

__version__ = "0.1.0"
