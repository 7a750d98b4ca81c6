"""magicfusion: Stable Diffusion 1.x from scratch in PyTorch, and MagicFusion (arXiv 2303.13126) on top of it.

    import magicfusion
    model = magicfusion.load("sd-v1-5.safetensors", tokenizer="weights/tokenizer")
    image = magicfusion.generate(model, "a lion with a crown", seed=0, sampler="dpmpp-2m", karras=True, steps=25)[0]
    result = magicfusion.fuse(model, magicfusion.load("expert.safetensors", tokenizer="weights/tokenizer"),
                              "a lion with a crown", fuse_until=600)
    result.fused[0].save("fused.png")
"""
from .checkpoint import load
from .errors import InputError
from .model import Model
from .pipeline import FuseResult, Images, fuse, generate
from .samplers import SAMPLERS
from .sampling import release_graphs

__all__ = ["load", "generate", "fuse", "Model", "FuseResult", "Images", "InputError", "SAMPLERS", "release_graphs"]
