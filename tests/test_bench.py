"""`capsctl bench` in a tiny configuration: the JSON report has every field, with sane values.

No timing is asserted (the machine is shared); only that each figure exists and is positive.
"""

from __future__ import annotations

import json

import pytest

from capsctl.bench import DECODER
from capsctl.bench.measure import (
    BenchConfig,
    decoder_trained,
    peak_rss_mb,
    variant_size,
    variant_spec,
    window_order,
)
from capsctl.bench.report import checks
from capsctl.model import flops

from ._helpers import assert_one_line_error, run_cli

TINY_ARGS = ["--batch", "4", "--windows", "2", "--steps", "1", "--warmup", "1", "--infer-batch", "8",
        "--infer-batches", "1", "--sgemm", "64"]


def _check_backend(r: dict, name: str) -> None:
    assert r["backend"] == name and r["available"] is True and "error" not in r, r
    assert name in r["describe"]
    assert r["sgemm"]["n"] == 64 and r["sgemm"]["gflops"] > 0 and r["sgemm"]["gflops_per_cpu_s"] > 0
    assert list(r["heads"]) == ["capsule", DECODER, "pool"]  # the decoder timed right beside its reference
    for name_, head in r["heads"].items():
        assert head["train_images_per_s"] > 0 and head["train_step_ms"] > 0
        assert head["achieved_gflops"] > 0 and head["sgemm_fraction"] > 0
        assert head["train_step_cpu_ms"] > 0 and head["sgemm_fraction_cpu"] > 0
        assert set(head["infer_images_per_s"]) == (set() if name_ == DECODER else {"28x28", "56x28"})
        assert all(v > 0 for v in head["infer_images_per_s"].values())
    _check_decoder(r)
    assert r["capsule_step_ratio"] > 0 and r["capsule_step_ratio_cpu"] > 0
    assert 0 < r["capsule_head_flop_share"] < 0.1  # the head is ~3.4% of the seed model's FLOPs
    assert 10 < r["train_peak_rss_mb"] < 100_000
    rt = r["routing"]
    assert rt["batch"] == 4 and rt["naive_ms"] > 0 and rt["vectorised_ms"] > 0 and rt["speedup"] > 0


def _check_decoder(r: dict) -> None:
    assert r["decoder_trained"] is True  # the decoder's loss reached its weights: it ran in the step
    assert r["decoder_step_ratio"] > 0 and r["decoder_step_ratio_cpu"] > 0
    assert r["decoder_flop_ratio"] == pytest.approx(1 + 2_818_048 / 79_597_408)
    assert r["heads"][DECODER]["train_gflop_per_image"] > r["heads"]["capsule"]["train_gflop_per_image"]


# one test for every backend (Keras' run is slow: it traces its training step for each head and size)
@pytest.mark.parametrize("name", [pytest.param("torch", marks=pytest.mark.torch),
                                  pytest.param("keras", marks=[pytest.mark.keras, pytest.mark.slow])])
def test_bench_json(capsys, name):
    code, out, _ = run_cli(["bench", "--backend", name, *TINY_ARGS, "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["config"]["batch"] == 4 and report["config"]["backends"] == [name]
    assert report["machine"]["cores"] >= 1
    assert report["flops_per_image"]["capsule"]["forward"] == 79_597_408
    _check_backend(report["backends"][name], name)
    targets = {(c["target"], c["backend"]) for c in report["checks"]}
    assert ("capsule step / pool step", name) in targets
    assert ("capsule+decoder step / capsule step", name) in targets
    assert all(isinstance(c["met"], bool) for c in report["checks"])


@pytest.mark.torch
def test_bench_decoder_only_torch(capsys):
    """`--heads capsule+decoder`: only the decoder's training step and its plain capsule reference."""
    code, out, _ = run_cli(["bench", "--backends", "torch", "--heads", DECODER, *TINY_ARGS, "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["config"]["heads"] == [DECODER]
    assert report["flops_per_image"][DECODER]["decoder"] == 2_818_048
    assert report["flops_per_image"]["capsule"]["decoder"] == 0
    r = report["backends"]["torch"]
    assert r["available"] is True and "error" not in r, r
    assert list(r["heads"]) == ["capsule", DECODER]
    assert all(h["infer_images_per_s"] == {} for h in r["heads"].values())  # no inference
    assert r["infer_peak_rss_mb"] is None and "routing" not in r and "capsule_step_ratio" not in r
    _check_decoder(r)
    rows = {c["target"]: c for c in report["checks"]}
    row = rows["capsule+decoder step / capsule step"]
    assert row["value"] == r["decoder_step_ratio"] and row["limit"] == 1.15 and isinstance(row["met"], bool)


@pytest.mark.torch
def test_bench_table_torch_pool_only(capsys):
    code, out, _ = run_cli(["bench", "--backend", "torch", "--head", "pool", *TINY_ARGS, "--windows", "1"],
                           capsys)
    assert code == 0
    assert "img/s" in out and "torch" in out and "sgemm" in out and "peak RSS: training" in out
    assert "naive loop" not in out and "capsule step" not in out  # no capsule head: no routing, no ratio


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch"), (["--head", "dense"], "--head"), (["--backend", ","], "--backend"),
    (["--sgemm", "1"], "--sgemm"), (["--backend", "torch,nope"], "unknown backend 'nope'"),
])
def test_bench_bad_options(capsys, args, message):
    code, out, err = run_cli(["bench", *args], capsys)
    assert_one_line_error(code, out, err, message)


@pytest.mark.parametrize("name", [pytest.param("torch", marks=pytest.mark.torch),
                                  pytest.param("keras", marks=[pytest.mark.keras, pytest.mark.slow])])
def test_bench_image_size(capsys, name):
    """`--image-size HxW`: every model trains on HxW images, inference times HxW and 2H x W.
    (A size whose capsule grid, 9x10, is about 28x28's: Keras traces the naive routing loop once per input
    capsule.)"""
    code, out, err = run_cli(["bench", "--backends", name, "--heads", "capsule,pool", "--image-size", "30x32",
                              *TINY_ARGS, "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["config"]["image_size"] == [30, 32]
    caps = flops.count(variant_spec("capsule"), 30, 32)
    assert report["flops_per_image"]["capsule"]["forward"] == caps.forward != 79_597_408
    r = report["backends"][name]
    assert r["available"] is True and "error" not in r, r
    for head in ("capsule", "pool"):
        assert set(r["heads"][head]["infer_images_per_s"]) == {"30x32", "60x32"}
        assert r["heads"][head]["train_gflop_per_image"] == pytest.approx(
            flops.count(variant_spec(head), 30, 32).train_step / 1e9)
    assert r["capsule_head_flop_share"] == pytest.approx(caps.head / caps.forward)
    assert r["routing"]["naive_ms"] > 0 and r["routing"]["vectorised_ms"] > 0


def test_variants_at_an_image_size():
    assert variant_size("capsule", (40, 36)) == (40, 36) and variant_size("capsule") == (28, 28)
    assert variant_size("arch:efficient-multimnist") == (36, 36)
    assert variant_spec(DECODER, (40, 36)).decoder.image_shape == (40, 36, 1)  # type: ignore[union-attr]
    # non-shared weights: one per input capsule of that size (sabour2017: 32 types on a 10x10 grid at 36x36)
    assert variant_spec("arch:sabour2017", (36, 36)).capsule.num_inputs == 3200
    assert variant_spec("arch:sabour2017").capsule.num_inputs == 1152


@pytest.mark.parametrize("args, message", [
    (["--image-size", "8x8"], "--image-size 8x8: the capsule head: images are 8x8, too small for the model "
                              "(it needs at least 14x14)"),
    (["--arch", "sabour2017", "--image-size", "16x16"],
     "--image-size 16x16: sabour2017: image 16x16 is too small"),
    (["--image-size", "36"], "--image-size must be HxW"),
])
def test_bench_image_size_refused(capsys, args, message):
    code, out, err = run_cli(["bench", *args], capsys)
    assert_one_line_error(code, out, err, message)


def test_checks_compare_backends_and_limits():
    report = {
        "a": {"available": True, "capsule_step_ratio": 1.05, "train_peak_rss_mb": 900.0,
              "heads": {"capsule": {"sgemm_fraction": 0.8, "train_images_per_s": 600.0,
                                    "train_step_cpu_ms": 400.0}}},
        "b": {"available": True, "capsule_step_ratio": 1.2, "train_peak_rss_mb": 2000.0,
              "heads": {"capsule": {"sgemm_fraction": 0.95, "train_images_per_s": 500.0,
                                    "train_step_cpu_ms": 420.0}}},
        "c": {"available": False, "reason": "not installed"},
    }
    rows = {(r["target"], r["backend"]): r for r in checks(report)}
    assert rows[("capsule step / pool step", "a")]["met"] is True
    assert rows[("capsule step / pool step", "b")]["met"] is False
    assert rows[("train FLOP rate / sgemm", "a")]["met"] is False
    assert rows[("train FLOP rate / sgemm", "b")]["met"] is True
    assert rows[("train peak RSS MB", "b")]["met"] is False
    both = rows[("train img/s, fast/slow (capsule)", "a,b")]
    assert both["value"] == pytest.approx(1.2) and both["met"] is False
    assert both["value_cpu"] == pytest.approx(1.05) and both["met_cpu"] is True
    assert rows[("capsule step / pool step", "a")]["met_cpu"] is None  # no CPU-time figure given
    assert not any(r["backend"] == "c" for r in rows.values())


def test_checks_decoder_ratio():
    base = {"available": True, "heads": {}}
    rows = checks({
        "a": base | {"decoder_step_ratio": 1.10, "decoder_step_ratio_cpu": 1.2, "decoder_trained": True},
        "b": base | {"decoder_step_ratio": 1.05, "decoder_step_ratio_cpu": 1.0, "decoder_trained": False},
        "c": base,
    })
    by = {r["backend"]: r for r in rows if r["target"] == "capsule+decoder step / capsule step"}
    assert set(by) == {"a", "b"}
    assert by["a"]["met"] is True and by["a"]["met_cpu"] is False and by["a"]["limit"] == 1.15
    assert by["b"]["met"] is False and by["b"]["met_cpu"] is False  # the decoder never trained: not valid


def test_decoder_variant_order_and_spec():
    assert BenchConfig().heads == ("capsule", "pool", DECODER)
    assert BenchConfig().trained() == ("capsule", DECODER, "pool")
    assert BenchConfig(heads=(DECODER,)).trained() == ("capsule", DECODER)  # its reference is added
    assert BenchConfig(heads=("pool", DECODER)).trained() == ("pool", "capsule", DECODER)
    assert BenchConfig(heads=("pool", "capsule")).trained() == ("pool", "capsule")
    trained = ("capsule", DECODER, "pool")
    assert [window_order(trained, w) for w in range(3)] == [
        ["capsule", DECODER, "pool"], [DECODER, "capsule", "pool"], ["capsule", DECODER, "pool"]]
    assert window_order(("capsule", "pool"), 1) == ["capsule", "pool"]  # unchanged without the decoder
    spec = variant_spec(DECODER)
    assert spec.replace(decoder=None) == variant_spec("capsule")
    assert spec.decoder is not None and spec.decoder.hidden == (512, 1024)
    assert spec.decoder.image_shape == (28, 28, 1)
    assert flops.count(spec).decoder == 2_818_048


def test_decoder_trained_looks_at_the_last_bias():
    import numpy as np

    from capsctl.model.weights import init_weights

    spec = variant_spec(DECODER)
    w = init_weights(spec, 0)
    assert decoder_trained(w, spec) is False
    w["decoder.dense2.bias"][3] = 1e-6
    assert decoder_trained(w, spec) is True
    assert np.all(init_weights(spec, 0)["decoder.dense2.bias"] == 0)


def test_config_defaults_match_the_issue():
    cfg = BenchConfig()
    assert cfg.batch == 128 and cfg.infer_batch == 512 and set(cfg.backends) == {"torch", "keras"}
    assert (peak_rss_mb() or 1.0) > 0


@pytest.mark.torch
@pytest.mark.parametrize("routing", ["su", "sabour", "su-unit"])
def test_naive_torch_routing_computes_the_same_scores(routing):
    import torch
    from capsctl_torch._bench import naive_scores
    from capsctl_torch._layers import CapsuleHead

    from capsctl.model.spec import default_spec

    spec = default_spec().with_capsule(routing=routing)
    head = CapsuleHead(spec)
    with torch.no_grad():
        head.kernel.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        f = torch.rand(3, spec.trunk_channels, 4, 5, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(naive_scores(f, head.kernel, spec), head(f)[0])


@pytest.mark.keras
@pytest.mark.parametrize("routing", ["su", "sabour", "su-unit"])
def test_naive_and_input_space_keras_routing_compute_the_same_scores(routing):
    import capsctl_keras._bench as bk
    import numpy as np

    from capsctl.model.spec import default_spec
    from capsctl.model.weights import init_weights
    spec = default_spec().with_capsule(routing=routing)
    f = bk.tf.random.stateless_uniform((3, 4, 5, spec.trunk_channels), seed=(1, 2))
    head = bk.capsule_head(spec)
    head.build(f.shape)
    head.kernel.assign(init_weights(spec, 0)["head.capsule.kernel"])
    ours = head(f).numpy()
    np.testing.assert_allclose(bk.naive_scores(f, head.kernel, spec).numpy(), ours, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bk.input_space_scores(f, head.kernel, spec).numpy(), ours, rtol=1e-5,
                               atol=1e-6)


def test_a_failed_measurement_is_not_a_success(capsys, monkeypatch):
    """A backend's child that died (out of memory, a timeout) showed a 'failed' row, exit 0."""
    from capsctl.bench import report

    monkeypatch.setattr(report, "run_child",
                        lambda name, cfg: {"backend": name, "available": True, "error": "MemoryError"})
    code, out, err = run_cli(["bench", "--backend", "torch", *TINY_ARGS, "--json"], capsys)
    assert code == 1 and json.loads(out)["backends"]["torch"]["error"] == "MemoryError"
    assert err.strip().splitlines()[-1] == "error: the measurement failed on torch"
    code, out, err = run_cli(["bench", "--backend", "torch", *TINY_ARGS], capsys)
    assert code == 1 and "failed" in out


def test_the_sgemm_fraction_is_the_median_of_the_per_window_ratios():
    """The module (and docs/PERFORMANCE.md) say every ratio is the median of per-window ratios; the
    fraction was the quotient of two medians, which under load differs (a slow step window beside a slow
    sgemm window is one fair window, not two medians' worth of noise)."""
    from capsctl.bench.measure import sgemm_fraction

    # three windows: each step as fast, relative to its own window's sgemm, as half the sgemm
    step_s = [1.0, 2.0, 4.0]
    gemm_s = [0.5, 1.0, 2.0]  # (load slowed both alike)
    assert sgemm_fraction(10.0, step_s, 10.0, gemm_s) == pytest.approx(0.5)
    # the quotient of medians would say 0.5 here too; with the load moving between windows it does not
    step_s, gemm_s = [1.0, 3.0, 1.2], [0.5, 2.0, 0.3]
    per_window = sorted(g / t for t, g in zip(step_s, gemm_s, strict=True))
    assert sgemm_fraction(10.0, step_s, 10.0, gemm_s) == pytest.approx(per_window[1])
    assert per_window[1] != pytest.approx(sorted(gemm_s)[1] / sorted(step_s)[1])
    assert sgemm_fraction(10.0, [0.0], 10.0, [1.0]) is None
