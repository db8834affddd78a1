"""The ``relkd`` command line, built on python-fire.

Each sub-command is a plain function that lives beside the code it drives; this module only names them::

    relkd synth --out DIR [--scale 1.0 --size 128 --seed 0]
    relkd datalist --root R --test_site UCL [--val_fraction 0.2 --seed 0] --out datalist.json
    relkd profile --network monai_relkd.networks.ENet --shape 1,1,384,384
    relkd evaluate --pred DIR --datalist datalist.json [--split test]
    relkd fsd --bundle B --datalist datalist.json --tap NAME
    relkd report RUN_DIR [RUN_DIR ...] [--out DIR]
    relkd package --bundle B --out DIR [--include_weights False --base_url URL --model_info F]
    relkd export --bundle B --format torchscript|onnx [--out F --opset 18 --image NIFTI]
    relkd new-student --network monai.networks.nets.UNet --network_args '{...}' --teacher_bundle T --out DIR
    relkd demo [--out relkd_demo]
    relkd nnunet-path                                   # value for nnUNet_extTrainer
    relkd to-nnunet --root R --dataset-id 501 --test-site HK [--out $nnUNet_raw]

``relkd COMMAND --help`` prints the arguments of one command.

A user error (bad data, missing file, invalid argument or config) prints one line ``relkd <command>: error: ...``
(details, e.g. the list of bad cases, on the lines after it) and exits with status 2; ``--debug`` (anywhere on the
command line) shows the traceback instead. Any other exception is a bug: one line, status 1, traceback with
``--debug``.
"""

from __future__ import annotations

import sys

import fire

#: exception types that are the user's to fix (their message says how); everything else is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, LookupError, RuntimeError)


def commands() -> dict:
    """Return the mapping ``name -> function`` of every ``relkd`` sub-command."""
    from monai_relkd.bundle_generator import new_student_command
    from monai_relkd.data.sites import datalist_command
    from monai_relkd.data.synthetic import synth_command
    from monai_relkd.demo import demo_command
    from monai_relkd.evaluation import evaluate_command, fsd_command
    from monai_relkd.export import export_command
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
        "export": export_command,
        "new-student": new_student_command,
        "demo": demo_command,
        "nnunet-path": nnunet_path_command,
        "to-nnunet": to_nnunet_command,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``relkd`` console script (see the module docstring for errors and exit codes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        fire.Fire(commands(), command=argv, name="relkd")
    except fire.core.FireExit:
        raise
    except Exception as e:
        if debug:
            raise
        text = (e.args[0] if isinstance(e, KeyError) and e.args else str(e)) or type(e).__name__
        label = "error" if isinstance(e, USER_ERRORS) else f"internal error ({type(e).__name__}; please report it)"
        print(f"relkd {command}: {label}: {text}".rstrip(), file=sys.stderr)
        if not isinstance(e, USER_ERRORS):
            print("run again with --debug for the traceback.", file=sys.stderr)
        sys.exit(2 if isinstance(e, USER_ERRORS) else 1)
    except SystemExit as e:  # e.g. monai_relkd.inference.InferenceFailed: its message is already the cause
        if debug or e.code in (None, 0) or isinstance(e.code, int):
            raise
        print(f"relkd {command}: error: {e.code}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
