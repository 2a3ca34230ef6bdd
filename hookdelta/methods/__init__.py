"""Delta methods: one file each, a config class plus the pieces it hooks in."""

from .lora import LoRAConfig

__all__ = ["LoRAConfig"]
