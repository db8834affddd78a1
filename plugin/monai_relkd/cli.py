"""The ``relkd`` command line, built on python-fire.

Each sub-command is a plain function that lives beside the code it drives; this module only names them::

    relkd synth --out DIR [--scale 1.0 --size 128 --seed 0]
    relkd datalist --root R --test_site UCL [--val_fraction 0.2 --seed 0] --out datalist.json
    relkd profile --network monai_relkd.networks.ENet --shape 1,1,384,384
    relkd evaluate --pred DIR --datalist datalist.json [--split test]
    relkd fsd --bundle B --datalist datalist.json --tap NAME
    relkd report RUN_DIR [RUN_DIR ...] [--out DIR]
    relkd package --bundle B --out DIR [--include_weights False --base_url URL]
    relkd demo [--out relkd_demo]
    relkd nnunet-path                                   # value for nnUNet_extTrainer
    relkd to-nnunet --root R --dataset-id 501 --test-site HK [--out $nnUNet_raw]

``relkd COMMAND --help`` prints the arguments of one command.
"""

from __future__ import annotations

import fire


def commands() -> dict:
    """Return the mapping ``name -> function`` of every ``relkd`` sub-command."""
    from monai_relkd.data.sites import datalist_command
    from monai_relkd.data.synthetic import synth_command
    from monai_relkd.demo import demo_command
    from monai_relkd.evaluation import evaluate_command, fsd_command
    from monai_relkd.nnunet import nnunet_path_command
    from monai_relkd.nnunet.convert import to_nnunet_command
    from monai_relkd.profiling import profile_command
    from monai_relkd.release import package_command
    from monai_relkd.reports import report_command

    return {
        "synth": synth_command,
        "datalist": datalist_command,
        "profile": profile_command,
        "evaluate": evaluate_command,
        "fsd": fsd_command,
        "report": report_command,
        "package": package_command,
        "demo": demo_command,
        "nnunet-path": nnunet_path_command,
        "to-nnunet": to_nnunet_command,
    }


def main() -> None:
    """Entry point of the ``relkd`` console script."""
    fire.Fire(commands(), name="relkd")


if __name__ == "__main__":
    main()
