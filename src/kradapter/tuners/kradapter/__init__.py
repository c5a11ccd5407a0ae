from .config import KRAdapterConfig
from .layer import Conv, KRAdapterLayer, Linear
from .model import KRAdapterModel

__all__ = ["Conv", "KRAdapterConfig", "KRAdapterLayer", "KRAdapterModel", "Linear"]
