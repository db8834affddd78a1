"""The folder to put in ``nnUNet_extTrainer`` (``relkd nnunet-path`` prints it).

nnU-Net imports every module of this folder as a top-level module and looks the trainer class up by name;
:mod:`relkd_trainers` only re-exports the classes defined in :mod:`monai_relkd.nnunet.trainers`.
"""
