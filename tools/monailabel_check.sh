#!/usr/bin/env bash
# End-to-end check of the student bundles in MONAI Label 0.8.5 (monaibundle sample app), offline on 127.0.0.1.
#
#   tools/monailabel_check.sh                                  # all three students
#   tools/monailabel_check.sh prostate_mri_student_enet        # one (or several) of them
#   tools/monailabel_check.sh --help                           # options of tools/monailabel_check.py
#
# 1. Builds MONAI Label's environment in its own venv (tools/monailabel/requirements.txt, then
#    monailabel==0.8.5 --no-deps), cached at ${MONAI_RELKD_CACHE:-~/.cache/monai_relkd}/monailabel-venv-<hash>;
#    a change of the requirement list builds a new one (and removes the old). Cold: ~3 min; warm: seconds.
# 2. Installs this checkout of monai-relkd into it (non-editable, --no-deps).
# 3. Runs tools/monailabel_check.py in that venv: scratch copy of the sample app and the bundles, synthetic data,
#    teacher trained with the bundle CLI, each student trained through MONAI Label's REST API (once without the
#    teacher checkpoint: must fail with a clear message; once with it: must write models/model.pt), then the
#    server restarted and a synthetic volume segmented through POST /infer/<student>. Exit 0 only if all pass.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE="${MONAI_RELKD_CACHE:-$HOME/.cache/monai_relkd}"
REQ="$REPO/tools/monailabel/requirements.txt"
MONAILABEL_VERSION="0.8.5"

mkdir -p "$CACHE"
KEY="$( { cat "$REQ"; echo "monailabel==$MONAILABEL_VERSION"; "$PYTHON" -c 'import sys; print(sys.version)'; } \
        | sha256sum | cut -c1-12)"
VENV="$CACHE/monailabel-venv-$KEY"

# one check at a time per cache (the venv is shared; the check itself is CPU-bound)
exec 9>"$CACHE/monailabel-check.lock"
if ! flock -w 1800 9; then
    echo "monailabel_check: another check holds $CACHE/monailabel-check.lock for 30 min; giving up." >&2
    exit 1
fi

if [[ ! -f "$VENV/.complete" ]]; then
    start=$SECONDS
    echo "monailabel_check: building $VENV (first run, or tools/monailabel/requirements.txt changed)"
    rm -rf "$VENV"
    for old in "$CACHE"/monailabel-venv-*; do  # earlier builds, each ~6 GB
        [[ -d "$old" && "$old" != "$VENV" ]] && rm -rf "$old"
    done
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ" \
        2> >(grep -v "is ignored: it is neither" >&2)
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "monailabel==$MONAILABEL_VERSION" \
        2> >(grep -v "is ignored: it is neither" >&2)
    "$VENV/bin/python" -c "import torchvision.utils, monai, monailabel.app; assert monai.__version__ == '1.5.2'"
    touch "$VENV/.complete"
    echo "monailabel_check: venv built in $((SECONDS - start)) s"
fi

# this checkout of monai-relkd, as a package (not editable: the check must see what would be installed)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --force-reinstall "$REPO" 2> >(grep -v "is ignored: it is neither" >&2)
"$VENV/bin/python" -c "import monai_relkd, sys; sys.exit(0 if '$VENV' in monai_relkd.__file__ else 1)"

export PATH="$VENV/bin:$PATH"   # the `monailabel` launcher runs `python` from PATH
exec "$VENV/bin/python" "$REPO/tools/monailabel_check.py" "$@"
