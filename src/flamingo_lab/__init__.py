"""flamingo-lab: ablation studies of Flamingo-style visual language models."""

__version__ = "0.1.0"
