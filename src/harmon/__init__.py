"""Harmon: unified multimodal understanding and generation (Wu et al., arXiv 2503.21979), exact and seedable."""
from .quantize import quiet_torchao_warnings

quiet_torchao_warnings()  # before transformers imports torchao
from .config import PRESETS, HarmonConfig, MARConfig, VAEConfig
from .checkpoint import load_model, load_original
from .saving import save_model
from .models.harmon import Harmon
from .rng import ReferenceRNG, SeededRNG
from .sampling import generate_latents

__all__ = ["Harmon", "HarmonConfig", "MARConfig", "VAEConfig", "PRESETS", "load_model", "load_original",
           "save_model", "ReferenceRNG", "SeededRNG", "generate_latents"]
__version__ = "0.1.0"
