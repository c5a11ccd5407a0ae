from .config import SinLoRAConfig
from .layer import Linear, SinLoRALayer
from .model import SinLoRAModel

__all__ = ["Linear", "SinLoRAConfig", "SinLoRALayer", "SinLoRAModel"]
