"""Model definitions: plain nn.Module code with a config dataclass, found through a registry."""

from runtime.models.registry import MODELS, model_class

__all__ = ["MODELS", "model_class"]
