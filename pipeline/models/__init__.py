"""Models: building from config, loading local checkpoints, finding layers, the zoo's own networks.

A model for this pipeline is any ``nn.Module`` mapping a clip to class logits; what it needs to know about the
model (the explained layer, the classifier) is found by name or automatically.
"""

from pipeline.errors import ModelError
from pipeline.models.build import build_model, load_checkpoint
from pipeline.models.demo import DemoNet3D
from pipeline.models.lookup import find_classifier, find_layer, get_module, is_linear_head

__all__ = [
    "DemoNet3D",
    "ModelError",
    "build_model",
    "find_classifier",
    "find_layer",
    "get_module",
    "is_linear_head",
    "load_checkpoint",
]
