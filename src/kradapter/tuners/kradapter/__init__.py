from .config import KRAdapterConfig
from .layer import KRAdapterLayer, Linear
from .model import KRAdapterModel

__all__ = ["KRAdapterConfig", "KRAdapterLayer", "KRAdapterModel", "Linear"]
