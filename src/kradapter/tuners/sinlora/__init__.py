from .config import SinLoRAConfig
from .layer import Conv, Linear, SinLoRALayer
from .model import SinLoRAModel

__all__ = ["Conv", "Linear", "SinLoRAConfig", "SinLoRALayer", "SinLoRAModel"]
