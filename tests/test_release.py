"""Release and download: ``monai_relkd.release.package_bundle`` writes the zip MONAI's ``download`` fetches, then

- ``python -m monai.bundle download --name N --url file://<zip>`` (weights in the zip),
- ``python -m monai.bundle download --name N --source github --repo OWNER/REPO/TAG`` against a local HTTP server
  on 127.0.0.1 that serves the release layout (zip without weights, ``model_info.json``, weights file),
- ``python -m monai.bundle download_large_files --bundle_path <bundle>`` fetching the weights listed in
  ``large_files.yml`` from that server with their sha256 checked (a wrong hash fails),

and each downloaded bundle's ``inference.json`` segments a synthetic NIfTI volume. The bundle packaged is a scratch
copy of ``prostate_mri_student_enet`` with randomly initialised ENet weights (nothing is written into ``bundles/``).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_mask_like
from monai_relkd.demo import run_bundle
from monai_relkd.release import package_bundle

SOURCE = REPO / "bundles" / "prostate_mri_student_enet"
NAME = "prostate_mri_student_enet"
OWNER, GH_REPO, TAG = "monai-relkd", "monai-relkd", "v0.1.0"
IMAGE_SIZE = 32
SERVER_LIFETIME_S = 300

# Run `python -m monai.bundle ...` with MONAI's two GitHub URLs pointed at the local server (see the docstring of
# test_download_from_github_source_against_a_local_server). argv[1] is the server's base URL.
GITHUB_REDIRECT = '''
import runpy, sys
import requests as _requests
import monai.bundle.scripts as scripts

BASE = sys.argv.pop(1)
RAW = "https://raw.githubusercontent.com/"
# the URL formats this redirect mirrors; fail loudly if MONAI changes them
assert scripts._get_git_release_url("o", "r", "t", "f.zip") == "https://github.com/o/r/releases/download/t/f.zip"


def _get_git_release_url(repo_owner, repo_name, tag_name, filename):
    return f"{BASE}/{repo_owner}/{repo_name}/releases/download/{tag_name}/{filename}"


class _Requests:
    """monai.bundle.scripts.requests with raw.githubusercontent.com served from BASE/raw/."""

    def __getattr__(self, name):
        return getattr(_requests, name)

    @staticmethod
    def get(url, *args, **kwargs):
        assert url.startswith(RAW), url
        return _requests.get(BASE + "/raw/" + url[len(RAW):], *args, **kwargs)


scripts._get_git_release_url = _get_git_release_url
scripts.requests = _Requests()
sys.argv[0] = "monai.bundle"
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
'''


def _monai_bundle(*args: str, cwd: Path, wrapper: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *(wrapper or ["-m", "monai.bundle"]), *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class _Handler(http.server.SimpleHTTPRequestHandler):
    requested: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 - record instead of printing
        type(self).requested.append(self.path)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Scratch bundle with random weights, its two releases, a synthetic volume and the local server."""
    from monai_relkd.data.synthetic import generate_six_site_dataset
    from monai_relkd.networks import ENet

    root = tmp_path_factory.mktemp("release")
    bundle = root / "src" / NAME
    shutil.copytree(SOURCE, bundle, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(ENet(in_channels=1, out_channels=2).state_dict(), bundle / "models" / "model.pt")
    generate_six_site_dataset(root / "data", scale=0.05, size=IMAGE_SIZE, seed=0)
    image = sorted((root / "data" / "HK").glob("Case*[0-9].nii.gz"))[0]

    www = root / "www"
    www.mkdir()
    _Handler.requested = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(www)))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopper = threading.Timer(SERVER_LIFETIME_S, server.shutdown)  # bounded lifetime, whatever happens
    stopper.daemon = True
    stopper.start()
    try:
        with_weights = package_bundle(bundle, root / "out_with_weights", include_weights=True)
        # the GitHub release layout: https://github.com/OWNER/REPO/releases/download/TAG/<file> and
        # https://raw.githubusercontent.com/OWNER/REPO/TAG/models/model_info.json
        assets = www / OWNER / GH_REPO / "releases" / "download" / TAG
        without = package_bundle(bundle, assets, include_weights=False, base_url=f"{base}/{OWNER}/{GH_REPO}"
                                 f"/releases/download/{TAG}")
        info = www / "raw" / OWNER / GH_REPO / TAG / "models" / "model_info.json"
        info.parent.mkdir(parents=True)
        shutil.move(without["model_info"], info)
        yield {"root": root, "bundle": bundle, "image": image, "base": base, "with_weights": with_weights,
               "without_weights": without, "model_info": info}
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _infer(bundle_dir: Path, image: Path, out: Path) -> None:
    """The downloaded bundle's inference.json on one volume: a 0/1 mask with the volume's shape and affine."""
    run_bundle(bundle_dir, ["inference.json"], input_path=str(image), image_size=IMAGE_SIZE, output_dir=str(out),
               device="cpu")
    assert_mask_like(image, out)


def _sha(path: Path, algorithm: str) -> str:
    return hashlib.new(algorithm, Path(path).read_bytes()).hexdigest()


def test_zip_layout_large_files_and_model_info(release):
    with_w, without = release["with_weights"], release["without_weights"]
    weights_sha = _sha(release["bundle"] / "models" / "model.pt", "sha256")
    for result, has_weights in ((with_w, True), (without, False)):
        assert Path(result["zip"]).name == f"{NAME}_v0.1.0.zip"
        with zipfile.ZipFile(result["zip"]) as zf:
            names = zf.namelist()
            large_files = zf.read(f"{NAME}/large_files.yml").decode()
        assert all(n.startswith(f"{NAME}/") for n in names)
        assert {f"{NAME}/configs/inference.json", f"{NAME}/configs/metadata.json", f"{NAME}/LICENSE",
                f"{NAME}/docs/README.md", f"{NAME}/large_files.yml"} <= set(names)
        assert (f"{NAME}/models/model.pt" in names) is has_weights
        assert not any(part in n.split("/") for n in names for part in ("eval", "runs", "__pycache__"))
        import yaml

        entry = yaml.safe_load(large_files)["large_files"][0]
        assert entry["path"] == "models/model.pt"
        assert entry["hash_val"] == weights_sha and entry["hash_type"] == "sha256"
        assert result["sha1"] == _sha(Path(result["zip"]), "sha1")
    assert "url" not in yaml.safe_load(with_w["large_files"])["large_files"][0]
    assert yaml.safe_load(without["large_files"])["large_files"][0]["url"] == (
        f"{release['base']}/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0_model.pt")
    assert _sha(Path(without["weights"]), "sha256") == weights_sha

    info = json.loads(release["model_info"].read_text())
    assert info == {f"{NAME}_v0.1.0": {"checksum": without["sha1"], "source": (
        f"{release['base']}/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0.zip")}}
    local = json.loads(Path(with_w["model_info"]).read_text())
    assert local[f"{NAME}_v0.1.0"] == {"checksum": with_w["sha1"], "source": Path(with_w["zip"]).as_uri()}

    # same bundle, same bytes (the checksum in model_info.json is reproducible)
    again = package_bundle(release["bundle"], release["root"] / "again", include_weights=True)
    assert again["sha1"] == with_w["sha1"]


def test_missing_weights_is_an_error_saying_how_to_train(release, tmp_path):
    bare = tmp_path / NAME
    shutil.copytree(release["bundle"], bare, ignore=shutil.ignore_patterns("models"))
    with pytest.raises(FileNotFoundError, match="monai.bundle run training"):
        package_bundle(bare, tmp_path / "out")
    assert not (tmp_path / "out" / f"{NAME}_v0.1.0.zip").exists()
    with pytest.raises(ValueError, match="base_url"):
        package_bundle(release["bundle"], tmp_path / "out", include_weights=False)


def test_download_by_url_then_infer(release, tmp_path):
    zip_uri = Path(release["with_weights"]["zip"]).as_uri()
    _monai_bundle("download", "--name", NAME, "--bundle_dir", str(tmp_path / "dl"), "--url", zip_uri,
                  "--progress", "False", cwd=tmp_path)
    bundle = tmp_path / "dl" / NAME
    assert (bundle / "models" / "model.pt").read_bytes() == (release["bundle"] / "models" / "model.pt").read_bytes()
    # as a user runs it: the CLI, from another folder, with the downloaded config
    out = tmp_path / "pred"
    _monai_bundle("run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                  "--input_path", str(release["image"]), "--image_size", str(IMAGE_SIZE),
                  "--output_dir", str(out), "--device", "cpu", cwd=tmp_path)
    assert_mask_like(release["image"], out)


def test_download_from_github_source_against_a_local_server(release, tmp_path):
    """``--source github`` with MONAI's real download code, served from 127.0.0.1.

    MONAI 1.6.1 has no option for the GitHub host: ``monai.bundle.scripts._get_git_release_url`` hard-codes
    ``https://github.com/{owner}/{repo}/releases/download/{tag}/{file}`` and ``_get_all_bundles_info`` (used for the
    latest version when ``--version`` is not given) calls ``requests.get`` on
    ``https://raw.githubusercontent.com/{owner}/{repo}/{tag}/models/model_info.json``. The test runs the CLI through a
    small wrapper (``GITHUB_REDIRECT``) that replaces exactly those two host prefixes — the URL builder
    ``_get_git_release_url`` and the ``requests`` module object that ``monai.bundle.scripts`` calls ``get`` on — by
    ``http://127.0.0.1:<port>/`` (and ``.../raw/``), then runs ``monai.bundle``'s ``__main__`` with ``runpy``.
    Everything else is MONAI's: argument handling, ``download`` picking the latest version from ``model_info.json``
    (``get_bundle_versions``), ``_download_from_github``, ``download_url``, ``extractall`` and the monai version
    check. The server's request log shows both files were fetched from it. Then the real, unpatched
    ``python -m monai.bundle download_large_files`` fetches the weights that the zip lists in ``large_files.yml``
    from the same server and checks their sha256.
    """
    wrapper = tmp_path / "github_redirect.py"
    wrapper.write_text(GITHUB_REDIRECT)
    _Handler.requested.clear()
    dl = tmp_path / "dl"
    _monai_bundle("download", "--name", NAME, "--source", "github", "--repo", f"{OWNER}/{GH_REPO}/{TAG}",
                  "--bundle_dir", str(dl), "--progress", "False", cwd=tmp_path,
                  wrapper=[str(wrapper), release["base"]])
    assert f"/raw/{OWNER}/{GH_REPO}/{TAG}/models/model_info.json" in _Handler.requested
    assert f"/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0.zip" in _Handler.requested
    bundle = dl / NAME
    assert (bundle / "configs" / "inference.json").is_file()
    assert not (bundle / "models" / "model.pt").exists(), "this release has no weights in the zip"

    _monai_bundle("download_large_files", "--bundle_path", str(bundle), cwd=tmp_path)
    assert f"/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0_model.pt" in _Handler.requested
    weights = bundle / "models" / "model.pt"
    assert weights.read_bytes() == (release["bundle"] / "models" / "model.pt").read_bytes()
    _infer(bundle, release["image"], tmp_path / "pred")


def test_download_large_files_rejects_a_wrong_hash(release, tmp_path):
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    bundle = tmp_path / NAME
    with zipfile.ZipFile(release["without_weights"]["zip"]) as zf:
        zf.extractall(tmp_path)
    yml = bundle / "large_files.yml"
    good = release["without_weights"]["weights_sha256"]
    yml.write_text(yml.read_text().replace(good, "0" * 64))
    with pytest.raises(HashCheckError):
        download_large_files(bundle_path=str(bundle))
    assert not (bundle / "models" / "model.pt").exists()
    yml.write_text(yml.read_text().replace("0" * 64, good))
    download_large_files(bundle_path=str(bundle))
    assert _sha(bundle / "models" / "model.pt", "sha256") == good


def test_package_refuses_truncated_or_foreign_weights_and_links_out_of_the_bundle(tmp_path):
    """The weights are loaded with weights_only=True into the bundle's network before anything is written."""
    from monai_relkd.inference import WeightsError
    from monai_relkd.networks import ENet, ERFNet

    bundle = tmp_path / NAME
    shutil.copytree(SOURCE, bundle, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
    (bundle / "models").mkdir()
    weights = bundle / "models" / "model.pt"
    torch.save(ENet(in_channels=1, out_channels=2).state_dict(), weights)
    good = weights.read_bytes()
    out = tmp_path / "out"

    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError, match=f"^{weights}: cannot load the weights.*truncated or corrupt"):
        package_bundle(bundle, out)
    torch.save(ERFNet(in_channels=1, out_channels=2).state_dict(), weights)
    with pytest.raises(WeightsError, match="do not match the bundle's network ENet"):
        package_bundle(bundle, out)
    assert not out.exists(), "nothing is written for a refused bundle"
    weights.write_bytes(good)

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not part of the bundle")
    for link, target in [(bundle / "docs" / "notes.txt", outside / "secret.txt"), (bundle / "extra", outside)]:
        link.symlink_to(target)
        with pytest.raises(ValueError, match=f"{link} is a symbolic link to {target}, outside the bundle"):
            package_bundle(bundle, out)
        link.unlink()
    (bundle / "docs" / "inside.md").symlink_to(bundle / "docs" / "README.md")  # a link within the bundle is fine
    result = package_bundle(bundle, out)
    assert f"{NAME}/docs/inside.md" in result["files"]
    with zipfile.ZipFile(result["zip"]) as zf:
        assert zf.read(f"{NAME}/models/model.pt") == good
        assert not any("secret" in n or "extra" in n for n in zf.namelist())
