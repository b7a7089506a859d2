"""Shared pretraining stages (LM on the world's text, vision encoder on its image-text pairs), cached
by the config that produced them and reused by every run that needs them."""

from .stages import ensure_pretrained

__all__ = ["ensure_pretrained"]
