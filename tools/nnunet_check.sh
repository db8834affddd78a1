#!/usr/bin/env bash
# The nnU-Net tests (tests/test_nnunet.py) in an environment of their own, with the `nnunet` extra installed.
#
#   tools/nnunet_check.sh            # the whole file
#   tools/nnunet_check.sh -k lookup  # extra pytest arguments
#
# Why a venv of its own: nnU-Net v2 imports its own trainers (through timm) before it looks in nnUNet_extTrainer,
# and timm needs torchvision. The package registry has only CUDA builds of torchvision, which do not load against
# the CPU torch of the main test environment ("operator torchvision::nms does not exist"). This venv takes the
# matching pair torch 2.14.1 + torchvision 0.29.1 (a CUDA build that runs on the CPU, ~5 GB, from local disk on our
# machines), as MONAI Label's check does, and leaves the main environment's CPU torch alone. In the main test run
# tests/test_nnunet.py runs its converter and CLI tests and skips the nnU-Net ones, saying nnunetv2 is not installed.
#
# The venv is cached at ${MONAI_RELKD_CACHE:-~/.cache/monai_relkd}/nnunet-venv-<hash>; a change of setup.cfg's
# nnunet extra or of Python builds a new one. Cold: a few minutes; warm: seconds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE="${MONAI_RELKD_CACHE:-$HOME/.cache/monai_relkd}"
TORCH_PAIR=(torch==2.14.1 torchvision==0.29.1)

mkdir -p "$CACHE"
KEY="$( { sed -n '/^nnunet =/,/^$/p' "$REPO/setup.cfg"; echo "${TORCH_PAIR[*]}"; "$PYTHON" -c 'import sys; print(sys.version)'; } \
        | sha256sum | cut -c1-12)"
VENV="$CACHE/nnunet-venv-$KEY"

exec 9>"$CACHE/nnunet-check.lock"
if ! flock -w 1800 9; then
    echo "nnunet_check: another check holds $CACHE/nnunet-check.lock for 30 min; giving up." >&2
    exit 1
fi

quiet_pip() {
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if [[ ! -f "$VENV/.complete" ]]; then
    start=$SECONDS
    echo "nnunet_check: building $VENV (first run, or the nnunet extra changed)"
    rm -rf "$VENV"
    for old in "$CACHE"/nnunet-venv-*; do
        [[ -d "$old" && "$old" != "$VENV" ]] && rm -rf "$old"
    done
    "$PYTHON" -m venv "$VENV"
    quiet_pip "${TORCH_PAIR[@]}"
    # the package's own requirements and both extras, against the torch pair above (never replacing it)
    quiet_pip -c <(printf '%s\n' "${TORCH_PAIR[@]}") "$REPO[test,nnunet]"
    "$VENV/bin/python" -c "import torchvision.ops, nnunetv2, timm"
    touch "$VENV/.complete"
    echo "nnunet_check: venv built in $((SECONDS - start)) s"
fi

# this checkout of monai-relkd, as a package (not editable: the check sees what would be installed)
quiet_pip --no-deps --no-build-isolation --force-reinstall "$REPO"
cd "$REPO"
"$VENV/bin/python" -c "import monai_relkd, sys; sys.exit(0 if '$VENV' in monai_relkd.__file__ else 1)"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_nnunet.py "$@"
