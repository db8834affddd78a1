"""Six-site prostate MRI data: the public layout's reader and validation, leave-one-site-out datalists, and the
synthetic six-site generator that is the embedded default for demos and tests."""

from .sites import (
    SITES,
    CaseProblem,
    CaseRecord,
    DataError,
    ScanResult,
    datalist_command,
    find_site_dirs,
    make_all_folds,
    make_datalist,
    scan_sites,
    write_datalist,
)
from .synthetic import SITE_PROFILES, generate_six_site_dataset, synth_command
from .untracked import UntrackedCompose

__all__ = [
    "SITES",
    "SITE_PROFILES",
    "CaseProblem",
    "CaseRecord",
    "DataError",
    "ScanResult",
    "datalist_command",
    "find_site_dirs",
    "generate_six_site_dataset",
    "make_all_folds",
    "make_datalist",
    "scan_sites",
    "synth_command",
    "UntrackedCompose",
    "write_datalist",
]
