"""Re-export of the monai-relkd trainers for nnU-Net's ``nnUNet_extTrainer`` lookup (see ``relkd nnunet-path``)."""

from monai_relkd.nnunet.trainers import *  # noqa: F401,F403
from monai_relkd.nnunet.trainers import __all__  # noqa: F401
