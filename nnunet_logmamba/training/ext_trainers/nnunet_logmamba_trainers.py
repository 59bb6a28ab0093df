"""Entry module for nnU-Net's external-trainer search (``nnUNet_extTrainer``).

nnU-Net imports every module of the folders in ``nnUNet_extTrainer`` as a top-level module and looks
for the requested class name in it. The package's start-up hook appends this folder to the variable;
this module only re-exports the trainers, which live (and are imported from) the package itself.
"""
from nnunet_logmamba.training.trainers import *  # noqa: F401,F403
from nnunet_logmamba.training.trainers import TRAINERS

__all__ = sorted(TRAINERS)
