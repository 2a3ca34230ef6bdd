"""Delta methods: one file each, a config class plus the pieces it hooks in."""

from .adalora import AdaLoRAConfig
from .adapter import AdapterConfig
from .bitfit import BitFitConfig
from .boft import BOFTConfig
from .c3a import C3AConfig
from .compacter import CompacterConfig
from .composition import AverageConfig, FuseConfig, SplitConfig
from .delora import DeLoRAConfig
from .fourierft import FourierFTConfig
from .gralora import GraLoRAConfig
from .hira import HiRAConfig
from .hra import HRAConfig
from .ia3 import IA3Config
from .lily import LilyConfig
from .llama_adapter import LlamaAdapterConfig
from .ln_tuning import LNTuningConfig
from .loha import LoHaConfig
from .lokr import LoKrConfig
from .lora import LoRAConfig
from .low_rank_adapter import LowRankAdapterConfig
from .miss import MiSSConfig
from .oft import OFTConfig
from .p_tuning import PTuningConfig
from .parallel_adapter import ParallelAdapterConfig
from .prefix import PrefixConfig
from .randlora import RandLoRAConfig
from .reft import DiReFTConfig, LoReFTConfig
from .road import RoAdConfig
from .shira import SHiRAConfig
from .soft_prompt import SoftPromptConfig
from .trainable_tokens import TrainableTokensConfig
from .vblora import VBLoRAConfig
from .vera import VeRAConfig

__all__ = [
    "AdapterConfig",
    "AverageConfig",
    "FuseConfig",
    "SplitConfig",
    "BitFitConfig",
    "CompacterConfig",
    "IA3Config",
    "LNTuningConfig",
    "LoRAConfig",
    "LoHaConfig",
    "LoKrConfig",
    "VeRAConfig",
    "TrainableTokensConfig",
    "LoReFTConfig",
    "DiReFTConfig",
    "OFTConfig",
    "BOFTConfig",
    "FourierFTConfig",
    "AdaLoRAConfig",
    "PTuningConfig",
    "LlamaAdapterConfig",
    "RoAdConfig",
    "VBLoRAConfig",
    "RandLoRAConfig",
    "LilyConfig",
    "SHiRAConfig",
    "HiRAConfig",
    "DeLoRAConfig",
    "GraLoRAConfig",
    "MiSSConfig",
    "C3AConfig",
    "HRAConfig",
    "LowRankAdapterConfig",
    "ParallelAdapterConfig",
    "PrefixConfig",
    "SoftPromptConfig",
]
