"""Serving a student needs neither pytorch-ignite nor tensorboard: ``import monai_relkd`` and every plugin piece
an inference config resolves work with those imports blocked (a fresh interpreter with an import blocker)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO

BLOCKER = textwrap.dedent(
    """
    import sys, importlib.abc

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ignite", "tensorboard"):
                raise ImportError(f"{name} is blocked for this test")
            return None

    sys.meta_path.insert(0, Blocked())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_blocker_really_blocks() -> None:
    proc = _run("import ignite")
    assert proc.returncode != 0 and "blocked for this test" in proc.stderr


def test_import_and_inference_pieces_without_ignite_or_tensorboard() -> None:
    proc = _run(
        """
        import json, torch
        import monai_relkd
        from monai.bundle import ConfigParser
        assert "ignite" not in sys.modules and "monai_relkd.engines" not in sys.modules
        for bundle in ("prostate_mri_student_enet", "prostate_mri_student_espnet", "prostate_mri_student_erfnet",
                       "prostate_mri_teacher"):
            parser = ConfigParser(json.load(open(f"bundles/{bundle}/configs/inference.json")))
            parser["bundle_root"] = f"bundles/{bundle}"
            net = parser.get_parsed_content("network_def")
            with torch.no_grad():
                out = net.eval()(torch.zeros(1, 1, 64, 64))
            assert out.shape == (1, 2, 64, 64), out.shape
            preprocessing = parser.get_parsed_content("preprocessing")
        print("ok", sorted(m for m in sys.modules if m.startswith("monai_relkd.")))
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # MONAI's short-name scan (LoadImaged, ...) walks every monai* package, ours included: they must import too
    assert proc.stdout.startswith("ok") and "monai_relkd.engines.trainer" in proc.stdout


def test_lazy_subpackages_load_on_first_use() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, monai_relkd; assert 'monai_relkd.engines' not in sys.modules; "
         "monai_relkd.engines.DistillationTrainer; assert 'monai_relkd.engines' in sys.modules; print('ok')"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
