"""Regenerate the shipped bundles (the teacher's configs and the three students) from the templates in
``plugin/monai_relkd/bundle_templates``.

The teacher's generated files come from ``bundle_templates/common`` and ``bundle_templates/teacher``
(``monai_relkd.bundle_generator.write_teacher``); its model card ``docs/README.md`` is written by hand.

Each entry of :data:`STUDENTS` is one ``relkd new-student`` call; for ENet it is::

    relkd new-student --network monai_relkd.networks.ENet --network_args '{"in_channels": 1, "out_channels": 2}' \\
        --teacher_bundle bundles/prostate_mri_teacher --out bundles/prostate_mri_student_enet \\
        --taps encoder.stage3=aspp,decoder.stage4=decoder --gkd True --overwrite True --card '{...}'

Run ``python tools/make_student_bundles.py`` after changing a template and commit the bundles with it;
``tests/test_bundle_generator.py`` fails while a shipped bundle differs from what this script writes. Only the
generated files are written (``models/``, ``eval/``, ``runs/`` and the teacher's ``docs/`` are never touched).
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
TEACHER = "prostate_mri_teacher"
TEACHER_CARD = {
    "teacher_display": "DeepLabV3+",
    "teacher_summary": "DeepLabV3+ R50, OS 16",
}
_TWO_D = {"in_channels": 1, "out_channels": 2}

#: bundle name -> keyword arguments of ``monai_relkd.bundle_generator.new_student`` (besides teacher and folder).
STUDENTS: dict[str, dict] = {
    "prostate_mri_student_enet": {
        "network": "monai_relkd.networks.ENet",
        "network_args": _TWO_D,
        "taps": "encoder.stage3=aspp,decoder.stage4=decoder",
        "gkd": True,
        "card": {
            "citation": "Paszke et al., 2016",
            "reference": "Paszke A., Chaurasia A., Kim S., Culurciello E. ENet: A Deep Neural Network Architecture for "
                         "Real-Time Semantic Segmentation. arXiv:1606.02147, 2016.",
            "card_reference": "A. Paszke, A. Chaurasia, S. Kim, E. Culurciello. ENet: A Deep Neural Network "
                              "Architecture for Real-Time Semantic Segmentation. arXiv:1606.02147, 2016.",
            **TEACHER_CARD,
        },
    },
    "prostate_mri_student_espnet": {
        "network": "monai_relkd.networks.ESPNet",
        "network_args": _TWO_D,
        "taps": "encoder.stage2=aspp,encoder.stage1=decoder",
        "card": {
            "citation": "Mehta et al., 2018",
            "reference": "Mehta S., Rastegari M., Caspi A., Shapiro L., Hajishirzi H. ESPNet: Efficient Spatial "
                         "Pyramid of Dilated Convolutions for Semantic Segmentation. ECCV 2018.",
            "card_reference": "S. Mehta, M. Rastegari, A. Caspi, L. Shapiro, H. Hajishirzi. ESPNet: Efficient "
                              "Spatial Pyramid of Dilated Convolutions for Semantic Segmentation. ECCV 2018.",
            "tuning_warning": "They do not suit ESPNet: on the synthetic leave-one-site-out benchmark ESPNet "
                              "distilled with them predicted background only for its first 300-500 steps, and on "
                              "one fold of three (BMC held out) for all 800. Re-tune them on your validation split "
                              "before distilling ESPNet.",
            **TEACHER_CARD,
        },
    },
    "prostate_mri_student_erfnet": {
        "network": "monai_relkd.networks.ERFNet",
        "network_args": _TWO_D,
        "taps": "encoder.stage2=aspp,decoder.stage1=decoder",
        "card": {
            "citation": "Romera et al., 2018",
            "reference": "Romera E., Alvarez J.M., Bergasa L.M., Arroyo R. ERFNet: Efficient Residual Factorized "
                         "ConvNet for Real-Time Semantic Segmentation. IEEE T-ITS 2018.",
            "card_reference": "E. Romera, J. M. Alvarez, L. M. Bergasa, R. Arroyo. ERFNet: Efficient Residual "
                              "Factorized ConvNet for Real-Time Semantic Segmentation. IEEE T-ITS 2018.",
            **TEACHER_CARD,
        },
    },
}


def make_student_bundles(out: str | None = None, teacher_bundle: str | None = None, quiet: bool = False) -> None:
    """Write the teacher's generated files and every bundle of :data:`STUDENTS` into ``out`` (default: the
    repository's ``bundles/``).

    Args:
        out: folder receiving one folder per bundle.
        teacher_bundle: the teacher bundle the students read (default: the teacher just written to ``out``).
        quiet: do not print the candidate taps.
    """
    sys.path.insert(0, str(REPO / "plugin"))
    from monai_relkd.bundle_generator import new_student, write_teacher

    root = Path(out) if out else REPO / "bundles"
    write_teacher(root / TEACHER, name=TEACHER, overwrite=True)
    teacher = Path(teacher_bundle) if teacher_bundle else root / TEACHER
    for name, spec in STUDENTS.items():
        result = new_student(teacher_bundle=teacher, out=root / name, name=name, overwrite=True, **spec)
        if not quiet:
            print(result.summary())


if __name__ == "__main__":
    fire.Fire(make_student_bundles)
