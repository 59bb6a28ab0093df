"""From (reconstructed) EM volumes to segmentation: nnU-Net datasets for the downstream pipeline."""
from .nnunet_dataset import cut_subvolumes, instance_boundaries, labels_to_classes, write_nnunet_dataset

__all__ = ["write_nnunet_dataset", "cut_subvolumes", "instance_boundaries", "labels_to_classes"]
