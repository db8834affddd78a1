"""``relkd export``: a bundle's trained network as TorchScript or ONNX, checked against the eager model on a volume.

::

    relkd export --bundle B --format torchscript|onnx [--out F --opset 18 --image Case00.nii.gz --tolerance 1e-3]

1. The network is built from the bundle's ``configs/inference.json`` (``network_def``) and its ``models/model.pt`` is
   loaded with ``weights_only=True`` (:func:`monai_relkd.inference.load_checked_weights`).
2. A real volume is preprocessed exactly as ``inference.json`` does (``preprocessing``: load, orient, normalise,
   resize in-plane to ``image_size``) and cut into its axial slices, ``(D, 1, H, W)``: what ``SliceInferer`` feeds the
   network.
3. Export:

   - ``torchscript``: ``torch.jit.script`` (as MONAI's ``ckpt_export``); loads with ``torch.jit.load`` and no
     monai_relkd import. Not frozen: ``torch.jit.freeze`` of the scripted ENet changed its logits by up to 7e-4
     (of at most 0.35) on a volume, where the scripted module matches the eager one exactly.
   - ``onnx``: ``torch.onnx.export(dynamo=True)`` (``torch.export``) with a dynamic batch and dynamic height and
     width (multiples of the ``k`` of ``metadata.json``'s ``"k*n"`` spatial shape), input ``image``, output
     ``pred``; opset 18 by default (the exporter's own opset; a lower one such as 17 is converted by ONNX after
     export). The opset actually written is read back from the file and reported.

4. The exported model runs on every slice of the volume (ONNX through ONNX Runtime on the CPU) and the maximum
   absolute difference of its logits from the eager model's is printed. Above ``tolerance`` nothing is written and
   :class:`ExportMismatch` is raised; otherwise the file is written atomically (default ``models/model.ts`` or
   ``models/model.onnx`` in the bundle, which ``configs/inference_onnx.json`` reads).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from monai_relkd.bundle_support import inference_parser
from monai_relkd.data._io import atomic_write_bytes

__all__ = ["export_bundle", "export_command", "load_bundle_network", "volume_slices", "ExportMismatch", "FORMATS",
           "DEFAULT_OPSET", "DEFAULT_TOLERANCE"]

#: export format -> default file name in the bundle's ``models/``.
FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
#: the ONNX opset the dynamo exporter of torch 2.9+ writes natively.
DEFAULT_OPSET = 18
#: largest accepted |exported - eager| on the logits (float32, same CPU).
DEFAULT_TOLERANCE = 1e-3


class ExportMismatch(ValueError):
    """The exported model's output differs from the eager model's by more than the tolerance."""


def load_bundle_network(bundle_dir: str | os.PathLike, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """The bundle's ``network_def`` on the CPU in eval mode, with ``models/model.pt`` (or ``weights``) loaded."""
    from monai_relkd.inference import load_checked_weights

    bundle = Path(bundle_dir).resolve()
    network = inference_parser(bundle).get_parsed_content("network_def", instantiate=True)
    network.load_state_dict(load_checked_weights(weights or bundle / "models" / "model.pt", network))
    return network.eval()


def volume_slices(bundle_dir: str | os.PathLike, image: str | os.PathLike, image_size: int | None = None) -> torch.Tensor:
    """One NIfTI volume preprocessed by the bundle's ``inference.json``, as its axial slices ``(D, 1, H, W)``."""
    override = {} if image_size is None else {"image_size": int(image_size)}
    parser = inference_parser(Path(bundle_dir).resolve(), **override)
    preprocessing = parser.get_parsed_content("preprocessing", instantiate=True)
    volume = torch.as_tensor(preprocessing({"image": str(image)})["image"]).float()  # (1, H, W, D)
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"{image}: expected one channel after preprocessing, got shape {tuple(volume.shape)}.")
    return volume.permute(3, 0, 1, 2).contiguous()


def _first_image(bundle: Path) -> str:
    from monai_relkd.inference import inference_datalist

    parser = inference_parser(bundle)
    return inference_datalist(parser.get_parsed_content("input_path"), parser["output_postfix"])[0]["image"]


def _spatial_multiple(bundle: Path) -> int:
    """``k`` of the ``"k*n"`` spatial shape in ``metadata.json`` (1 when absent)."""
    import json

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    shape = meta.get("network_data_format", {}).get("inputs", {}).get("image", {}).get("spatial_shape", [])
    match = re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", str(shape[0])) if shape else None
    return int(match.group(1)) if match else 1


def _max_abs_difference(eager: torch.nn.Module, exported: Callable[[torch.Tensor], torch.Tensor],
                        slices: torch.Tensor, batch: int) -> float:
    worst = 0.0
    with torch.inference_mode():
        for start in range(0, len(slices), batch):
            x = slices[start : start + batch]
            worst = max(worst, float((exported(x) - eager(x)).abs().max()))
    return worst


def _torchscript(network: torch.nn.Module) -> tuple[bytes, Callable[[torch.Tensor], torch.Tensor]]:
    scripted = torch.jit.script(network)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    loaded = torch.jit.load(io.BytesIO(buffer.getvalue()), map_location="cpu")
    return buffer.getvalue(), loaded


def _onnx(network: torch.nn.Module, example: torch.Tensor, opset: int,
          multiple: int) -> tuple[bytes, Callable[[torch.Tensor], torch.Tensor], int]:
    import onnxruntime as ort

    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    spatial = {2: Dim("height_over_k", min=1, max=4096), 3: Dim("width_over_k", min=1, max=4096)}
    dynamic = {0: batch, **{axis: multiple * dim if multiple > 1 else dim for axis, dim in spatial.items()}}
    program = torch.onnx.export(network, (example,), dynamo=True, opset_version=int(opset), input_names=["image"],
                                output_names=["pred"], dynamic_shapes=(dynamic,), verbose=False)
    data = program.model_proto.SerializeToString()
    written = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), int(opset))
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"image": x.contiguous().numpy()})[0])

    return data, run, int(written)


def export_bundle(
    bundle_dir: str | os.PathLike,
    format: str = "onnx",  # noqa: A002 - the CLI's word
    out: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
    image: str | os.PathLike | None = None,
    image_size: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    batch: int = 16,
    ckpt_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Export a bundle's network and check it against the eager model on a volume (see the module docstring).

    Args:
        bundle_dir: the bundle folder (with ``models/model.pt``).
        format: ``"torchscript"`` or ``"onnx"``.
        out: the file to write; default ``<bundle>/models/model.ts`` or ``model.onnx``.
        opset: ONNX opset (ignored for TorchScript).
        image: the NIfTI volume of the check; default the first image of the bundle's ``input_path``.
        image_size: in-plane size of the check (default: the bundle's ``image_size``).
        tolerance: largest accepted maximum absolute difference of the logits.
        batch: slices per forward in the check.
        ckpt_path: the weights; default ``<bundle>/models/model.pt``.

    Returns:
        ``{"format", "path", "opset", "image", "slices", "max_abs_diff", "tolerance"}``.

    Raises:
        ValueError: an unknown format, tolerance <= 0 or batch < 1.
        ExportMismatch: the difference is above ``tolerance`` (nothing is written).
        monai_relkd.inference.WeightsError: missing, corrupt or foreign ``models/model.pt``.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}.")
    if not tolerance > 0 or int(batch) < 1:
        raise ValueError(f"tolerance must be > 0 and batch >= 1, got {tolerance} and {batch}.")
    bundle = Path(bundle_dir).resolve()
    network = load_bundle_network(bundle, ckpt_path)
    image = str(image) if image is not None else _first_image(bundle)
    slices = volume_slices(bundle, image, image_size)
    if format == "torchscript":
        data, run = _torchscript(network)
        written_opset = None
    else:
        example = slices[: max(2, min(int(batch), len(slices)))]
        if len(example) < 2:  # a batch of 1 would be exported as a constant batch size
            example = example.repeat(2, 1, 1, 1)
        data, run, written_opset = _onnx(network, example, opset, _spatial_multiple(bundle))
    diff = _max_abs_difference(network, run, slices, int(batch))
    summary = {"format": format, "opset": written_opset, "image": image, "slices": tuple(slices.shape),
               "max_abs_diff": diff, "tolerance": float(tolerance)}
    if not diff <= tolerance:
        raise ExportMismatch(
            f"{bundle.name}: the {format} export differs from the eager model by up to {diff:.3g} on the logits of "
            f"{image} (tolerance {tolerance:g}); nothing was written."
        )
    path = Path(out) if out is not None else bundle / "models" / FORMATS[format]
    atomic_write_bytes(path, data)
    return {**summary, "path": str(path)}


def export_command(bundle: str, format: str = "onnx", out: str | None = None, opset: int = DEFAULT_OPSET,  # noqa: A002
                   image: str | None = None, image_size: int | None = None,
                   tolerance: float = DEFAULT_TOLERANCE, ckpt_path: str | None = None) -> None:
    """``relkd export --bundle B --format torchscript|onnx [--out F --opset 18 --image NIFTI --tolerance 1e-3
    --ckpt_path W]``.

    ``bundle`` is a bundle folder, or the name of one in ``./bundles``. Prints the file, the opset and the maximum
    absolute difference from the eager model on the volume's slices; exits non-zero above the tolerance.
    """
    path = Path(bundle)
    if not (path / "configs" / "inference.json").is_file():
        from monai_relkd.demo import find_bundles_dir

        path = find_bundles_dir() / bundle
    r = export_bundle(path, format, out=out, opset=opset, image=image, image_size=image_size, tolerance=tolerance,
                      ckpt_path=ckpt_path)
    opset_text = f", opset {r['opset']}" if r["opset"] is not None else ""
    print(f"relkd export: {r['path']} ({r['format']}{opset_text})")
    print(f"  check on {r['image']}: {r['slices'][0]} slices of {r['slices'][2]}x{r['slices'][3]}, max |exported - "
          f"eager| = {r['max_abs_diff']:.3g} on the logits (tolerance {r['tolerance']:g})")
