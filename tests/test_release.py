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

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
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
SERVER_START_S = 30

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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """``python -m http.server`` on 127.0.0.1 in a subprocess serving ``www``; :meth:`requested` reads its log."""

    def __init__(self, www: Path, log: Path) -> None:
        self.log = log
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(www)],
            stdout=self._log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"http.server did not start on port {self.port}: {log.read_text()}")
                time.sleep(0.1)

    def requested(self) -> list[str]:
        """Paths of the GET requests the server answered so far (from its log lines ``"GET /path HTTP/1.1" 200``)."""
        return re.findall(r'"GET (\S+) HTTP/1\.[01]" 200', self.log.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log_file.close()


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
    server = _Server(www, root / "http_server.log")
    try:
        with_weights = package_bundle(bundle, root / "out_with_weights", include_weights=True, base_url=None)
        # the GitHub release layout: https://github.com/OWNER/REPO/releases/download/TAG/<file> and
        # https://raw.githubusercontent.com/OWNER/REPO/TAG/models/model_info.json
        assets = www / OWNER / GH_REPO / "releases" / "download" / TAG
        without = package_bundle(bundle, assets, include_weights=False, base_url=f"{server.base}/{OWNER}/{GH_REPO}"
                                 f"/releases/download/{TAG}")
        info = www / "raw" / OWNER / GH_REPO / TAG / "models" / "model_info.json"
        info.parent.mkdir(parents=True)
        shutil.move(without["model_info"], info)
        yield {"root": root, "bundle": bundle, "image": image, "base": server.base, "server": server,
               "with_weights": with_weights, "without_weights": without, "model_info": info}
    finally:
        server.stop()


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
    assert yaml.safe_load(with_w["large_files"])["large_files"][0]["url"] == Path(with_w["weights"]).as_uri()
    assert yaml.safe_load(without["large_files"])["large_files"][0]["url"] == (
        f"{release['base']}/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0_model.pt")
    assert _sha(Path(without["weights"]), "sha256") == weights_sha

    info = json.loads(release["model_info"].read_text())
    assert info == {f"{NAME}_v0.1.0": {"checksum": without["sha1"], "model_sha256": weights_sha, "source": (
        f"{release['base']}/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0.zip")}}
    local = json.loads(Path(with_w["model_info"]).read_text())
    assert local[f"{NAME}_v0.1.0"] == {"checksum": with_w["sha1"], "source": Path(with_w["zip"]).as_uri(),
                                        "model_sha256": weights_sha}

    # same bundle, same bytes (the checksum in model_info.json is reproducible)
    again = package_bundle(release["bundle"], release["root"] / "out_with_weights", include_weights=True, base_url=None)
    assert again["sha1"] == with_w["sha1"]


def test_missing_weights_is_an_error_saying_how_to_train(release, tmp_path):
    bare = tmp_path / NAME
    shutil.copytree(release["bundle"], bare, ignore=shutil.ignore_patterns("models"))
    for include_weights in (True, False):
        with pytest.raises(FileNotFoundError, match="monai.bundle run training"):
            package_bundle(bare, tmp_path / "out", include_weights=include_weights)
    assert not (tmp_path / "out").exists()


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


def test_download_by_http_url_then_download_large_files_then_infer(release, tmp_path):
    """The loopback release as a user meets it: ``monai.bundle download --url http://127.0.0.1:PORT/...zip`` (a zip
    without weights), then ``download_large_files`` fetches ``models/model.pt`` from the URL in ``large_files.yml``
    with its sha256 checked, then ``inference.json`` (the CLI) segments a NIfTI volume."""
    import yaml

    server, without = release["server"], release["without_weights"]
    before = len(server.requested())
    zip_url = f"{server.base}/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0.zip"
    _monai_bundle("download", "--name", NAME, "--bundle_dir", str(tmp_path / "dl"), "--url", zip_url,
                  "--progress", "False", cwd=tmp_path)
    bundle = tmp_path / "dl" / NAME
    assert not (bundle / "models" / "model.pt").exists()
    entry = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"][0]
    assert entry["url"].startswith(server.base + "/") and entry["hash_type"] == "sha256"

    _monai_bundle("download_large_files", "--bundle_path", str(bundle), cwd=tmp_path)
    requested = server.requested()[before:]
    assert requested == [f"/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0.zip",
                         f"/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0_model.pt"]
    weights = bundle / "models" / "model.pt"
    assert _sha(weights, "sha256") == entry["hash_val"] == without["weights_sha256"]
    assert weights.read_bytes() == (release["bundle"] / "models" / "model.pt").read_bytes()

    out = tmp_path / "pred"
    _monai_bundle("run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                  "--input_path", str(release["image"]), "--image_size", str(IMAGE_SIZE),
                  "--output_dir", str(out), "--device", "cpu", cwd=tmp_path)
    assert_mask_like(release["image"], out)


def test_eval_metrics_come_from_the_bundles_own_summary_or_stay_null(tmp_path):
    """``metadata.json``'s ``eval_metrics`` (in the zip and, with update_bundle, in the bundle) are the means of
    ``eval/summary.json`` when it evaluated these weights; null without a summary or with one older than them."""
    import os

    from monai_relkd.evaluation.summary import summarize_cases, write_summary
    from monai_relkd.networks import ENet

    bundle = tmp_path / NAME
    shutil.copytree(SOURCE, bundle, ignore=shutil.ignore_patterns("models", "eval", "runs", "__pycache__"))
    weights = bundle / "models" / "model.pt"
    weights.parent.mkdir()
    torch.save(ENet(in_channels=1, out_channels=2).state_dict(), weights)

    def packaged_metrics(out: Path) -> tuple[dict, dict]:
        result = package_bundle(bundle, out, base_url="https://example.org/releases/v0.1.0")
        with zipfile.ZipFile(result["zip"]) as zf:
            in_zip = json.loads(zf.read(f"{NAME}/configs/metadata.json"))["eval_metrics"]
        assert json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"] == in_zip
        return in_zip, result

    assert packaged_metrics(tmp_path / "none")[0] == {"mean_dice": None}

    cases = [{"case": f"Case0{i}", "site": site, "metrics": {"dice": dice, "hd95": hd, "asd": 1.0}}
             for i, (site, dice, hd) in enumerate([("HK", 0.8, 3.0), ("HK", 0.6, None), ("UCL", 0.7, 5.0)])]
    summary = summarize_cases(cases)
    summary["model"] = NAME
    write_summary(summary, bundle / "eval")
    metrics, result = packaged_metrics(tmp_path / "fresh")
    assert metrics == {"mean_dice": pytest.approx(0.7), "mean_hd95_mm": pytest.approx(4.0), "mean_asd_mm": 1.0,
                       "n_cases": 3, "sites": ["HK", "UCL"]}
    assert result["eval_metrics"] == metrics
    assert not any("/eval/" in name for name in result["files"]), "the summary itself is not shipped"
    # the bundle's own large_files.yml now lists the weights with their URL and sha256
    assert result["weights_url"] == f"https://example.org/releases/v0.1.0/{NAME}_v0.1.0_model.pt"
    assert result["weights_url"] in (bundle / "large_files.yml").read_text()
    assert _sha(weights, "sha256") in (bundle / "large_files.yml").read_text()
    # a local release (file:// URIs) does not write its URIs into the bundle
    local = package_bundle(bundle, tmp_path / "local", base_url=None)
    assert local["weights_url"].startswith("file://") and "file://" not in (bundle / "large_files.yml").read_text()

    stale = (bundle / "eval" / "summary.json").stat().st_mtime - 60
    os.utime(weights, (stale + 120, stale + 120))
    os.utime(bundle / "eval" / "summary.json", (stale, stale))
    assert packaged_metrics(tmp_path / "stale")[0] == {"mean_dice": None}


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
    server = release["server"]
    before = len(server.requested())
    dl = tmp_path / "dl"
    _monai_bundle("download", "--name", NAME, "--source", "github", "--repo", f"{OWNER}/{GH_REPO}/{TAG}",
                  "--bundle_dir", str(dl), "--progress", "False", cwd=tmp_path,
                  wrapper=[str(wrapper), release["base"]])
    requested = server.requested()[before:]
    assert f"/raw/{OWNER}/{GH_REPO}/{TAG}/models/model_info.json" in requested
    assert f"/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0.zip" in requested
    bundle = dl / NAME
    assert (bundle / "configs" / "inference.json").is_file()
    assert not (bundle / "models" / "model.pt").exists(), "this release has no weights in the zip"

    _monai_bundle("download_large_files", "--bundle_path", str(bundle), cwd=tmp_path)
    assert f"/{OWNER}/{GH_REPO}/releases/download/{TAG}/{NAME}_v0.1.0_model.pt" in server.requested()[before:]
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
