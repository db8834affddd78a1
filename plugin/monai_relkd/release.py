"""``relkd package``: a bundle as the release zip that ``python -m monai.bundle download`` fetches.

One call writes, into ``out_dir``:

- ``<name>_v<version>.zip`` holding the top-level folder ``<name>/`` (MONAI's ``download`` extracts it with
  ``has_base=True`` into ``<bundle_dir>/<name>``), with the weights ``models/model.pt`` inside
  (``include_weights=True``) or not (``include_weights=False``);
- the weights beside the zip as ``<name>_v<version>_model.pt`` (the upload that ``large_files.yml`` points to);
- ``model_info.json`` with the entry ``{"<name>_v<version>": {"checksum": <sha1 of the zip>, "source": <url>,
  "model_sha256": <sha256 of models/model.pt>}}``, merged into the file already there, so that one
  ``model_info.json`` lists every bundle of a release (``--model_info models/model_info.json`` fills the
  repository's own file, the one MONAI reads at the release tag).

The zip's ``large_files.yml`` lists ``models/model.pt`` with ``url`` (``<base_url>/<name>_v<version>_model.pt``),
``hash_val`` (sha256) and ``hash_type``, and its ``configs/metadata.json`` has ``eval_metrics`` from the bundle's own
evaluation summary (``eval/summary.json``, written by ``configs/evaluate.json``) when that summary exists and is newer
than the weights; otherwise they stay null (never invented). With ``update_bundle=True`` (the default) the bundle
folder's ``large_files.yml`` and ``configs/metadata.json`` are updated to what the zip holds, so the committed bundle
matches its release.

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
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from monai_relkd import __version__
from monai_relkd.data._io import atomic_write, atomic_write_bytes, atomic_write_text
from monai_relkd.inference import load_checked_weights

__all__ = ["package_bundle", "package_command", "eval_metrics_of", "WEIGHTS", "EXCLUDED_DIRS", "PROJECT_REPO",
           "DEFAULT_BASE_URL", "SUMMARY"]

logger = logging.getLogger(__name__)

#: the project's GitHub repository (the ``$id`` of its JSON schemas names it too).
PROJECT_REPO = "monai-relkd/monai-relkd"
#: where a release of this version of the project is uploaded: one GitHub release per project version, holding every
#: bundle's zip and weights (``monai.bundle download --source github --repo monai-relkd/monai-relkd/v<version>``).
DEFAULT_BASE_URL = f"https://github.com/{PROJECT_REPO}/releases/download/v{__version__}"
#: the evaluation summary a bundle's ``configs/evaluate.json`` writes, relative to the bundle folder.
SUMMARY = "eval/summary.json"

#: the weights file of a bundle, relative to its folder.
WEIGHTS = "models/model.pt"
#: folders left out of a release zip (run outputs and caches).
EXCLUDED_DIRS = frozenset({"eval", "runs", "logs", "__pycache__", ".ipynb_checkpoints"})
_EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".tmp")
#: timestamp of every zip entry (the zip's bytes depend on content only).
_ZIP_DATE = (2022, 5, 30, 0, 0, 0)

_HOWTO_TRAIN = (
    "Train it first: `python -m monai.bundle run training --config_file {configs}/train.json "
    "--bundle_root {bundle}` "
    "(a student needs the teacher's models/model.pt, see its docs/README.md), or copy a trained model.pt there."
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


def eval_metrics_of(bundle_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``eval_metrics`` for ``metadata.json`` from the bundle's own evaluation summary, or None.

    Reads ``<bundle>/eval/summary.json`` (``python -m monai.bundle run --config_file "['configs/train.json',
    'configs/evaluate.json']"`` writes it). None - the metrics stay null - when there is no summary, when it is
    older than ``models/model.pt`` (it evaluated other weights), or when it names another model.

    Returns:
        ``{"mean_dice", "mean_hd95_mm", "mean_asd_mm", "n_cases", "sites"}`` (means over cases, all evaluated
        sites pooled; a distance is null when undefined for every case).
    """
    bundle = Path(bundle_dir)
    summary_path, weights = bundle / SUMMARY, bundle / WEIGHTS
    if not summary_path.is_file():
        return None
    if weights.is_file() and summary_path.stat().st_mtime < weights.stat().st_mtime:
        logger.warning("%s is older than %s: it evaluated other weights; eval_metrics stay null (run "
                       "configs/evaluate.json again).", summary_path, weights)
        return None
    try:
        with open(summary_path) as f:
            summary = json.load(f)
        mean, n_cases, sites = summary["mean"], int(summary["n_cases"]), sorted(summary["per_site"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{summary_path}: not an evaluation summary of monai_relkd.evaluation ({e!r}).") from None
    model = summary.get("model")
    name = json.loads((bundle / "configs" / "metadata.json").read_text()).get("name")
    if model is not None and model != name:
        logger.warning("%s evaluates %r, not %r; eval_metrics stay null.", summary_path, model, name)
        return None
    return {"mean_dice": mean.get("dice"), "mean_hd95_mm": mean.get("hd95"), "mean_asd_mm": mean.get("asd"),
            "n_cases": n_cases, "sites": sites}


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=4, ensure_ascii=False) + "\n"


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


def _require_weights(bundle: Path, name: str, version: str) -> Path:
    """The bundle's ``models/model.pt``; FileNotFoundError, saying how to train it, when it is missing."""
    weights = bundle / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} does not exist: the release of {name} {version} needs its trained weights (in the zip, or "
            "beside it with their sha256 in large_files.yml). "
            + _HOWTO_TRAIN.format(configs=bundle / "configs", bundle=bundle)
        )
    return weights


def _checked_release_files(bundle: Path, weights: Path, include_weights: bool) -> list[str]:
    """The zip's files (:func:`_release_files`), once no link leads out of the bundle and the weights load."""
    files = _release_files(bundle, include_weights)
    _check_links(bundle, files + [WEIGHTS])
    # refuse a truncated/corrupt model.pt or one of another network (torch.load with weights_only=True)
    load_checked_weights(weights, _network_of(bundle))
    return files


def _release_url(base_url: str | None, path: Path) -> str:
    """Where a release file is downloaded from: ``<base_url>/<its name>``, or its ``file://`` URI without one."""
    return _join_url(base_url, path.name) if base_url else path.as_uri()


def _filled_files(metadata: dict[str, Any], eval_metrics: dict[str, Any], weights_url: str,
                  weights_sha256: str) -> dict[str, str]:
    """``{relative path: text}`` of the files the release rewrites: ``large_files.yml``, ``configs/metadata.json``."""
    # monai.bundle.scripts.download_large_files (1.6.1) calls monai.apps.download_url(url=, filepath=<path>,
    # hash_val=, hash_type=) with each entry; with the file present and its hash right it skips the download.
    large_files = _large_files_yml({"path": WEIGHTS, "url": weights_url, "hash_val": weights_sha256,
                                    "hash_type": "sha256"})
    metadata = dict(metadata, eval_metrics=eval_metrics)
    return {"large_files.yml": large_files, "configs/metadata.json": _json_text(metadata)}


def _update_bundle_files(bundle: Path, filled: dict[str, str], base_url: str | None) -> None:
    """Write the rewritten files into the bundle folder where they differ or are missing."""
    # a local release (no base_url) leaves the bundle's large_files.yml alone: file:// URIs are no place to publish
    for rel, text in ((r, t) for r, t in filled.items() if base_url or r != "large_files.yml"):
        if not (bundle / rel).is_file() or (bundle / rel).read_text() != text:
            atomic_write_text(bundle / rel, text)


def _write_zip(zip_path: Path, name: str, bundle: Path, entries: list[str], filled: dict[str, str]) -> None:
    """Write ``entries`` (sorted relative paths, from ``filled`` or the bundle) under ``<name>/``, fixed date/mode."""

    def write_zip(f: BinaryIO) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            for rel in entries:
                info = zipfile.ZipInfo(f"{name}/{rel}", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, filled[rel].encode() if rel in filled else (bundle / rel).read_bytes())

    atomic_write(zip_path, write_zip)


def _merge_model_info(info_path: Path, release: str, entry: dict[str, str]) -> None:
    """Set ``<release>: entry`` in the ``model_info.json`` at ``info_path`` (created if missing; sorted keys)."""
    # model_info.json as MONAI reads it: monai.bundle.scripts._get_all_bundles_info (1.6.1, any tag but
    # "hosting_storage_v1") loads https://raw.githubusercontent.com/<owner>/<repo>/<tag>/models/model_info.json,
    # takes the bundle name and version from each key "<name>_v<version>" and the download URL from its "source";
    # get_bundle_versions/_get_latest_bundle_version (download(source="github") without --version) pick the
    # latest version from those keys. MONAI does not read "checksum"; the Model Zoo's CI
    # (Project-MONAI/model-zoo ci/update_model_info.py) writes the sha1 of the zip there, and so do we; "model_sha256"
    # is the weights' checksum, the same as hash_val in large_files.yml.
    entries: dict[str, Any] = {}
    if info_path.is_file():
        try:
            entries = json.loads(info_path.read_text())
        except ValueError as e:
            raise ValueError(f"{info_path}: not valid JSON ({e}); fix or remove it, then package again.") from None
    entries[release] = entry
    atomic_write_text(info_path, json.dumps(entries, indent=4, sort_keys=True) + "\n")


def package_bundle(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    include_weights: bool = True,
    base_url: str | None = DEFAULT_BASE_URL,
    model_info: str | os.PathLike | None = None,
    update_bundle: bool = True,
) -> dict[str, Any]:
    """Write the release zip of a bundle, the weights file beside it and its ``model_info.json`` entry.

    Args:
        bundle_dir: the bundle folder (``configs/metadata.json`` gives its name and version; it is validated with
            :func:`monai_relkd.metadata.validate_bundle_metadata`).
        out_dir: where the zip, the weights file and ``model_info.json`` go (created).
        include_weights: put ``models/model.pt`` in the zip (``download_large_files`` then only checks its hash);
            ``False`` leaves it out (``download_large_files`` fetches it from the URL in ``large_files.yml``).
        base_url: the URL of the folder the release files are uploaded to; default :data:`DEFAULT_BASE_URL`, the
            project's GitHub release of this version (``https://github.com/monai-relkd/monai-relkd/releases/
            download/v<version>``). It makes the ``source`` of the ``model_info.json`` entry and the ``url`` of
            the weights in ``large_files.yml``. ``None`` or ``""``: the ``file://`` URIs of the files written here
            (a local release, for tests).
        model_info: the ``model_info.json`` to merge the entry into; default ``<out_dir>/model_info.json``. Give
            the repository's ``models/model_info.json`` to fill it directly.
        update_bundle: also write the filled ``configs/metadata.json`` (``eval_metrics``) and, given a
            ``base_url``, ``large_files.yml`` into the bundle folder, when they differ.

    Returns:
        ``{"name", "version", "zip", "sha1", "sha256", "source", "model_info", "weights", "weights_sha256",
        "weights_url", "large_files", "eval_metrics", "files"}`` (paths as strings; ``weights`` is the file to
        upload beside the zip).

    Raises:
        FileNotFoundError: no ``models/model.pt`` (the message says how to train one).
        monai_relkd.inference.WeightsError: ``models/model.pt`` does not load with ``weights_only=True`` (truncated,
            corrupt) or does not match the bundle's ``network_def``.
        ValueError: a file of the bundle is a symbolic link leading out of it; an unreadable ``eval/summary.json``.
        monai_relkd.metadata.BundleMetadataError: invalid ``configs/metadata.json``.
    """
    from monai_relkd.metadata import validate_bundle_metadata

    bundle = Path(bundle_dir).resolve()
    metadata = validate_bundle_metadata(bundle)
    name, version = metadata["name"], metadata["version"]
    release = f"{name}_v{version}"
    weights = _require_weights(bundle, name, version)
    files = _checked_release_files(bundle, weights, include_weights)

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    zip_path, weights_out = out / f"{release}.zip", out / f"{release}_model.pt"
    weights_sha256 = _sha(weights, "sha256")
    weights_url = _release_url(base_url, weights_out)
    eval_metrics = eval_metrics_of(bundle) or {"mean_dice": None}
    filled = _filled_files(metadata, eval_metrics, weights_url, weights_sha256)
    if update_bundle:
        _update_bundle_files(bundle, filled, base_url)
    entries = sorted(set(files) | set(filled))
    _write_zip(zip_path, name, bundle, entries, filled)
    atomic_write_bytes(weights_out, weights.read_bytes())

    sha1 = _sha(zip_path, "sha1")
    source = _release_url(base_url, zip_path)
    info_path = Path(model_info).resolve() if model_info else out / "model_info.json"
    _merge_model_info(info_path, release, {"checksum": sha1, "source": source, "model_sha256": weights_sha256})

    return {
        "name": name,
        "version": version,
        "zip": str(zip_path),
        "sha1": sha1,
        "sha256": _sha(zip_path, "sha256"),
        "source": source,
        "model_info": str(info_path),
        "weights": str(weights_out),
        "weights_sha256": weights_sha256,
        "weights_url": weights_url,
        "large_files": filled["large_files.yml"],
        "eval_metrics": eval_metrics,
        "files": [f"{name}/{rel}" for rel in entries],
    }


def package_command(
    bundle: str,
    out: str = "release",
    include_weights: bool = True,
    base_url: str | None = DEFAULT_BASE_URL,
    model_info: str | None = None,
    update_bundle: bool = True,
) -> None:
    """``relkd package --bundle B --out DIR [--include_weights False --base_url URL --model_info F]``: the release
    files of a bundle.

    ``bundle`` is a bundle folder, or the name of one in ``./bundles`` (e.g. ``prostate_mri_student_enet``).
    ``base_url`` defaults to the project's GitHub release of this version (:data:`DEFAULT_BASE_URL`); ``--base_url
    ''`` makes a local release (``file://`` URIs). Prints what to upload and how users download it (see
    ``docs/release.md``).
    """
    path = Path(bundle)
    if not (path / "configs" / "metadata.json").is_file():
        from monai_relkd.demo import find_bundles_dir

        path = find_bundles_dir() / bundle
    result = package_bundle(path, out, include_weights=include_weights, base_url=base_url or None,
                            model_info=model_info, update_bundle=update_bundle)
    print(f"relkd package: {result['name']} {result['version']}")
    print(f"  zip            {result['zip']}  (sha1 {result['sha1']})")
    print(f"  weights        {result['weights']}  (sha256 {result['weights_sha256']}, url {result['weights_url']})")
    print(f"  model_info     {result['model_info']}  (source {result['source']})")
    print(f"  eval_metrics   {json.dumps(result['eval_metrics'])}")
    upload = [Path(result["zip"]).name, Path(result["weights"]).name]
    print(f"upload {' and '.join(upload)} to {base_url or Path(result['zip']).parent}; commit the bundle's "
          "large_files.yml and configs/metadata.json, and model_info.json as models/model_info.json (docs/release.md).")
