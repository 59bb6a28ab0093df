"""Training: losses, the self-supervised trainer, model files."""
from .checkpoint import DEFAULT_MODEL_DIR, load_model, save_model, training_stages
from .losses import reconstruction_loss
from .trainer import Trainer, TrainingConfig, learning_rate_factor

__all__ = ["Trainer", "TrainingConfig", "reconstruction_loss", "learning_rate_factor", "load_model",
           "save_model", "training_stages", "DEFAULT_MODEL_DIR"]
