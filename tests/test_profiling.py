"""Profiler: FLOP convention, latency fields, network resolution (class path, MONAI network, bundle), CLI."""

from __future__ import annotations

import json

import fire
import pytest
import torch
import torch.nn as nn

from monai_relkd.networks import ENet
from monai_relkd.profiling import (
    count_flops,
    count_parameters,
    measure_latency,
    parse_shape,
    profile_command,
    profile_network,
    resolve_network,
    to_markdown,
)


def test_conv_flops_match_hand_formula():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    got = count_flops(conv, (2, 3, 32, 20))
    macs = 2 * 8 * 32 * 20 * 3 * 3 * 3  # B * C_out * H_out * W_out * C_in * k * k
    assert got["macs"] == macs
    assert got["flops"] == 2 * macs
    assert got["gmacs"] == pytest.approx(macs / 1e9)
    assert got["gflops"] == pytest.approx(2 * macs / 1e9)


def test_strided_conv_and_linear_flops():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    assert count_flops(conv, (1, 4, 16, 16))["macs"] == 6 * 8 * 8 * 4 * 9
    assert count_flops(nn.Linear(10, 5), (3, 4, 10))["macs"] == 3 * 4 * 10 * 5


@pytest.mark.parametrize(
    "shape,expected",
    [("1,1,384,384", (1, 1, 384, 384)), ("1x3x64x64", (1, 3, 64, 64)), ("(2, 1, 32, 32)", (2, 1, 32, 32)),
     ((1, 1, 64, 64), (1, 1, 64, 64)), ([1, 1, 8, 8, 8], (1, 1, 8, 8, 8))],
)
def test_parse_shape(shape, expected):
    assert parse_shape(shape) == expected


@pytest.mark.parametrize("shape", ["1,1", "a,b,c,d", (1, 1, 0, 4), 5])
def test_parse_shape_errors(shape):
    with pytest.raises((ValueError, TypeError)):
        parse_shape(shape)


def test_latency_fields_and_threads():
    before = torch.get_num_threads()
    net = nn.Conv2d(1, 2, 3, padding=1)
    r = measure_latency(net, (1, 1, 32, 32), repeats=5, warmup=1, threads=1)
    assert r["threads"] == 1 and torch.get_num_threads() == before
    assert r["latency_ms_min"] <= r["latency_ms_median"] <= r["latency_ms_max"]
    assert r["latency_ms_iqr"] >= 0 and r["latency_repeats"] == 5 and r["latency_warmup"] == 1
    with pytest.raises(ValueError):
        measure_latency(net, (1, 1, 8, 8), repeats=0)


def test_monai_network_through_same_api():
    kwargs = dict(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2))
    r = profile_network("monai.networks.nets.UNet", shape=(1, 1, 64, 64), repeats=2, warmup=1, memory=False, **kwargs)
    from monai.networks.nets import UNet

    assert r["params"] == count_parameters(UNet(**kwargs))
    assert r["gmacs"] > 0 and r["gflops"] == pytest.approx(2 * r["gmacs"])
    json.dumps(r)  # serialisable
    table = to_markdown([r])
    assert "monai.networks.nets.UNet" in table and "GMACs" in table and "GFLOPs" in table


def test_resolve_errors():
    with pytest.raises(ValueError, match="ENet"):
        resolve_network("monai_relkd.networks.ENett")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_network("no_such_package.Net")
    with pytest.raises(ValueError, match="dotted class path"):
        resolve_network("ENet")
    with pytest.raises(TypeError):
        resolve_network("collections.OrderedDict")
    net = ENet()
    assert resolve_network(net) is net


def _write_bundle(root, out_channels=2):
    (root / "configs").mkdir(parents=True)
    config = {
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "monai_relkd.networks.ENet", "in_channels": 1, "out_channels": out_channels},
        "network": "$@network_def.to(@device)",
    }
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    return root


def test_profile_command_on_bundle_dir(tmp_path, capsys):
    bundle = _write_bundle(tmp_path / "tiny_bundle")
    out = tmp_path / "out" / "profile.json"
    profile_command(str(bundle), shape="1,1,64,64", repeats=2, warmup=1, json_out=str(out))
    printed = capsys.readouterr().out
    assert "| network |" in printed and "tiny_bundle (ENet)" in printed
    result = json.loads(out.read_text())
    assert result["params"] == count_parameters(ENet())
    assert result["input_shape"] == [1, 1, 64, 64]
    assert result["mem_peak_rss_mb"] > 0 and result["mem_forward_mb"] >= 0 and result["mem_method"]
    assert result["threads"] >= 1
    # kwargs override bundle config ids
    net = resolve_network(str(bundle), **{"network_def::out_channels": 3})
    assert net.head.out_channels == 3


def test_not_a_bundle(tmp_path):
    with pytest.raises(ValueError, match="not a bundle"):
        resolve_network(str(tmp_path))


def test_profile_command_via_fire_tuple_shape(tmp_path, capsys):
    out = tmp_path / "espnet.json"
    fire.Fire(
        profile_command,
        command=["--network", "monai_relkd.networks.ESPNet", "--shape", "1,1,32,32", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--json_out", str(out), "--q", "2"],
    )
    result = json.loads(out.read_text())
    assert result["input_shape"] == [1, 1, 32, 32] and result["threads"] == 1
    from monai_relkd.networks import ESPNet

    assert result["params"] == count_parameters(ESPNet(q=2))
