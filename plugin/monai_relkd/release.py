"""``relkd package``: a bundle as the release zip that ``python -m monai.bundle download`` fetches.

One call writes, into ``out_dir``:

- ``<name>_v<version>.zip`` holding the top-level folder ``<name>/`` (MONAI's ``download`` extracts it with
  ``has_base=True`` into ``<bundle_dir>/<name>``), with the weights ``models/model.pt`` inside
  (``include_weights=True``) or listed in ``large_files.yml`` with their URL and sha256 (``include_weights=False``;
  the weights are then written beside the zip as ``<name>_v<version>_model.pt`` for upload);
- ``model_info.json`` with the entry ``{"<name>_v<version>": {"checksum": <sha1 of the zip>, "source": <url>}}``,
  merged into the file already there, so that one ``model_info.json`` lists every bundle of a release.

What goes into the zip: every file of the bundle folder except run outputs and derived files — ``eval/``,
``runs/``, ``logs/``, ``__pycache__/``, hidden files, ``*.pyc``, ``*.tmp``, and everything in ``models/`` but
``model.pt`` (TorchScript exports ``*.ts``, intermediate checkpoints, a teacher copy: ``ckpt_export`` rebuilds a
``.ts`` from ``model.pt`` in seconds, and it would double the download). Entries are written in sorted order with a
fixed timestamp, so the same bundle gives the same bytes and the same checksum.

See ``docs/release.md`` for publishing the zip (GitHub release or Hugging Face repository) and downloading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from monai_relkd.data._io import atomic_write, atomic_write_bytes, atomic_write_text
from monai_relkd.inference import load_checked_weights

__all__ = ["package_bundle", "package_command", "WEIGHTS", "EXCLUDED_DIRS"]

#: the weights file of a bundle, relative to its folder.
WEIGHTS = "models/model.pt"
#: folders left out of a release zip (run outputs and caches).
EXCLUDED_DIRS = frozenset({"eval", "runs", "logs", "__pycache__", ".ipynb_checkpoints"})
_EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp")
#: timestamp of every zip entry (the zip's bytes depend on content only).
_ZIP_DATE = (2022, 5, 30, 0, 0, 0)

_HOWTO_TRAIN = (
    "Train it first: `python -m monai.bundle run training --config_file {configs}/train.json` "
    "(a student needs the teacher's models/model.pt, see its docs/README.md), or copy a trained model.pt there; "
    "or package without weights (include_weights=False / --include_weights False) and upload them separately."
)


def _sha(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _release_files(bundle_dir: Path, include_weights: bool) -> list[str]:
    """Relative POSIX paths of the files that go into the zip, sorted."""
    files = []
    for root, dirs, names in os.walk(bundle_dir):
        rel_root = Path(root).relative_to(bundle_dir)
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("."))
        for name in names:
            rel = (rel_root / name).as_posix()
            if name.startswith(".") or name.endswith(_EXCLUDED_SUFFIXES):
                continue
            if rel_root.parts[:1] == ("models",) and (rel != WEIGHTS or not include_weights):
                continue
            if rel == "large_files.yml":  # rewritten with the hashes of this release
                continue
            files.append(rel)
    return sorted(files)


def _large_files_yml(entry: dict[str, str]) -> str:
    """``large_files.yml`` in the Model Zoo format that ``monai.bundle.download_large_files`` reads."""
    lines = ["large_files:", f'  - path: "{entry["path"]}"']
    lines += [f'    {key}: "{entry[key]}"' for key in ("url", "hash_val", "hash_type") if key in entry]
    return "\n".join(lines) + "\n"


def _check_links(bundle_dir: Path, files: list[str]) -> None:
    """Refuse a packaged file, or a folder the zip would cover, that is a symbolic link leading out of the bundle."""
    candidates = [bundle_dir / rel for rel in files]
    for root, dirs, _ in os.walk(bundle_dir):  # os.walk does not enter linked folders: check them here
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith(".")]
        candidates += [Path(root) / d for d in dirs]
    for path in candidates:
        for parent in [path, *path.parents]:
            if parent == bundle_dir:
                break
            if parent.is_symlink() and not parent.resolve().is_relative_to(bundle_dir):
                raise ValueError(
                    f"{parent} is a symbolic link to {parent.resolve()}, outside the bundle {bundle_dir}: a release "
                    "must not pick up files from elsewhere. Copy them into the bundle, or remove the link."
                )


def _network_of(bundle_dir: Path) -> Any:
    """The bundle's ``network_def`` from ``configs/inference.json`` (built on CPU, no weights)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle_dir)
    return parser.get_parsed_content("network_def", instantiate=True)


def _join_url(base_url: str, name: str) -> str:
    return base_url.rstrip("/") + "/" + name


def package_bundle(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    include_weights: bool = True,
    base_url: str | None = None,
) -> dict[str, Any]:
    """Write the release zip of a bundle, its ``model_info.json`` entry and (without weights) the weights file.

    Args:
        bundle_dir: the bundle folder (``configs/metadata.json`` gives its name and version; it is validated with
            :func:`monai_relkd.metadata.validate_bundle_metadata`).
        out_dir: where the zip, ``model_info.json`` and the weights file go (created).
        include_weights: put ``models/model.pt`` in the zip; ``False`` leaves it out, writes it beside the zip as
            ``<name>_v<version>_model.pt`` and lists it in the zip's ``large_files.yml`` with its URL and sha256.
            With weights, ``large_files.yml`` lists their sha256 (and, given ``base_url``, the URL of the copy
            written beside the zip).
        base_url: the URL of the folder the release files are uploaded to, e.g.
            ``https://github.com/OWNER/REPO/releases/download/TAG`` (a GitHub release). It makes the ``source`` of
            the ``model_info.json`` entry and the ``url`` in ``large_files.yml``. Required with
            ``include_weights=False``. Without it the ``source`` is the ``file://`` URI of the zip written here.

    Returns:
        ``{"name", "version", "zip", "sha1", "sha256", "source", "model_info", "weights", "weights_sha256",
        "large_files", "files"}`` (paths as strings; ``weights`` is the file to upload beside the zip, or None).

    Raises:
        FileNotFoundError: ``include_weights`` and no ``models/model.pt`` (the message says how to train one).
        monai_relkd.inference.WeightsError: ``models/model.pt`` does not load with ``weights_only=True`` (truncated,
            corrupt) or does not match the bundle's ``network_def``.
        ValueError: a file of the bundle is a symbolic link leading out of it.
        ValueError: ``include_weights=False`` without ``base_url``.
        monai_relkd.metadata.BundleMetadataError: invalid ``configs/metadata.json``.
    """
    from monai_relkd.metadata import validate_bundle_metadata

    bundle = Path(bundle_dir).resolve()
    metadata = validate_bundle_metadata(bundle)
    name, version = metadata["name"], metadata["version"]
    release = f"{name}_v{version}"
    weights = bundle / WEIGHTS
    if not weights.is_file():
        if include_weights:
            raise FileNotFoundError(
                f"{weights} does not exist: the release of {name} {version} needs its trained weights. "
                + _HOWTO_TRAIN.format(configs=bundle / "configs")
            )
        raise FileNotFoundError(
            f"{weights} does not exist: a release without weights still lists their sha256 in large_files.yml. "
            + _HOWTO_TRAIN.format(configs=bundle / "configs")
        )
    if not include_weights and not base_url:
        raise ValueError(
            "include_weights=False needs base_url: the URL the weights file is uploaded to goes into "
            "large_files.yml (e.g. https://github.com/OWNER/REPO/releases/download/TAG)."
        )

    files = _release_files(bundle, include_weights)
    _check_links(bundle, files + [WEIGHTS])
    # refuse a truncated/corrupt model.pt or one of another network (torch.load with weights_only=True)
    load_checked_weights(weights, _network_of(bundle))

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    zip_path = out / f"{release}.zip"
    weights_sha256 = _sha(weights, "sha256")
    entry: dict[str, str] = {"path": WEIGHTS}
    weights_out = None
    if base_url:
        # listed with a URL, so also written beside the zip for upload; when the weights are in the zip as well,
        # download_large_files only checks their hash
        weights_out = out / f"{release}_model.pt"
        entry["url"] = _join_url(base_url, weights_out.name)
    # monai.bundle.scripts.download_large_files (1.6.1) calls monai.apps.download_url(url=, filepath=<path>,
    # hash_val=, hash_type=) with each entry; with the file present and its hash right it skips the download.
    entry.update(hash_val=weights_sha256, hash_type="sha256")
    large_files = _large_files_yml(entry)

    def write_zip(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            def add(arcname: str, data: bytes) -> None:
                info = zipfile.ZipInfo(f"{name}/{arcname}", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, data)

            for rel in sorted(files + ["large_files.yml"]):
                add(rel, large_files.encode() if rel == "large_files.yml" else (bundle / rel).read_bytes())

    atomic_write(zip_path, write_zip)
    if weights_out is not None:
        atomic_write_bytes(weights_out, weights.read_bytes())

    # model_info.json as MONAI reads it: monai.bundle.scripts._get_all_bundles_info (1.6.1, any tag but
    # "hosting_storage_v1") loads https://raw.githubusercontent.com/<owner>/<repo>/<tag>/models/model_info.json,
    # takes the bundle name and version from each key "<name>_v<version>" and the download URL from its "source";
    # get_bundle_versions/_get_latest_bundle_version (download(source="github") without --version) pick the
    # latest version from those keys. MONAI does not read "checksum"; the Model Zoo's CI
    # (Project-MONAI/model-zoo ci/update_model_info.py) writes the sha1 of the zip there, and so do we.
    sha1 = _sha(zip_path, "sha1")
    source = _join_url(base_url, zip_path.name) if base_url else zip_path.as_uri()
    info_path = out / "model_info.json"
    model_info: dict[str, Any] = {}
    if info_path.is_file():
        with open(info_path) as f:
            model_info = json.load(f)
    model_info[release] = {"checksum": sha1, "source": source}
    atomic_write_text(info_path, json.dumps(model_info, indent=4, sort_keys=True) + "\n")

    return {
        "name": name,
        "version": version,
        "zip": str(zip_path),
        "sha1": sha1,
        "sha256": _sha(zip_path, "sha256"),
        "source": source,
        "model_info": str(info_path),
        "weights": str(weights_out) if weights_out else None,
        "weights_sha256": weights_sha256,
        "large_files": large_files,
        "files": [f"{name}/{rel}" for rel in sorted(files + ["large_files.yml"])],
    }


def package_command(
    bundle: str, out: str = "release", include_weights: bool = True, base_url: str | None = None
) -> None:
    """``relkd package --bundle B --out DIR [--include_weights False --base_url URL]``: the release files of a bundle.

    ``bundle`` is a bundle folder, or the name of one in ``./bundles`` (e.g. ``prostate_mri_student_enet``).
    Prints what to upload and how users download it (see ``docs/release.md``).
    """
    path = Path(bundle)
    if not (path / "configs" / "metadata.json").is_file():
        from monai_relkd.demo import find_bundles_dir

        path = find_bundles_dir() / bundle
    result = package_bundle(path, out, include_weights=include_weights, base_url=base_url)
    print(f"relkd package: {result['name']} {result['version']}")
    print(f"  zip            {result['zip']}  (sha1 {result['sha1']})")
    if result["weights"]:
        print(f"  weights        {result['weights']}  (sha256 {result['weights_sha256']}, listed in large_files.yml)")
    print(f"  model_info     {result['model_info']}  (source {result['source']})")
    upload = [Path(result["zip"]).name] + ([Path(result["weights"]).name] if result["weights"] else [])
    print(f"upload {' and '.join(upload)}; commit model_info.json as models/model_info.json (docs/release.md).")
