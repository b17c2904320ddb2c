"""`capsctl inspect` end to end: table, --json, --out, pooling head, and bad input -> exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsctl.model.spec import ModelSpec
from capsctl.model.weights import init_weights, save_model

from ._helpers import assert_one_line_error, huge_png, run_cli


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained models (no training needed to look at the routing), capsule kernel scaled up so
    the couplings move visibly."""
    d = tmp_path_factory.mktemp("models")
    out = {}
    caps = ModelSpec()
    w = init_weights(caps, 0)
    w["head.capsule.kernel"] *= 6.0
    save_model(d / "caps.safetensors", caps, w)
    out["caps"] = d / "caps.safetensors"
    pool = ModelSpec(head="pool")
    save_model(d / "pool.safetensors", pool, init_weights(pool, 0))
    out["pool"] = d / "pool.safetensors"
    fixed = ModelSpec().with_capsule(shared=False, num_inputs=64)
    save_model(d / "fixed.safetensors", fixed, init_weights(fixed, 0))
    out["fixed"] = d / "fixed.safetensors"
    return out


@pytest.fixture()
def two_digits(tmp_path: Path) -> Path:
    """Black ink on white, 56x28: a bar on top and a box below (inverted automatically)."""
    a = np.full((56, 28), 255, np.uint8)
    a[4:24, 12:16] = 0
    a[32:52, 6:22] = 0
    a[36:48, 10:18] = 255
    Image.fromarray(a).save(tmp_path / "two.png")
    return tmp_path / "two.png"


@pytest.mark.torch
def test_json_couplings_sum_to_one_for_every_input_and_iteration(models, two_digits, capsys):
    code, out, err = run_cli(["inspect", two_digits, "--model", models["caps"], "--json", "--top", "2"],
                             capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["image_shape"] == [56, 28] and d["grid"] == [22, 8] and d["head"] == "capsule"
    c, a = np.array(d["couplings"]), np.array(d["agreement"])
    assert c.shape == a.shape == (3, 10, 22 * 8)
    np.testing.assert_allclose(c.sum(axis=1), 1.0, atol=1e-5)
    assert len(d["lengths"]) == 10 and all(0 <= x < 1 for x in d["lengths"])
    assert d["predicted"] == [j for j in np.argsort(d["lengths"])[::-1].tolist() if d["lengths"][j] > 0.5]
    assert len(d["top"]) == 2 and sorted(d["order"]) == sorted(d["top"])
    assert d["direction"] == "top-to-bottom"
    assert [it["iteration"] for it in d["iterations"]] == [1, 2, 3]
    assert d["iterations"][0]["mean_abs_delta"] is None and d["iterations"][1]["mean_abs_delta"] > 0


@pytest.mark.torch
def test_routings_override_and_table(models, two_digits, capsys):
    code, out, err = run_cli(["inspect", two_digits, "--model", models["caps"], "--routings", "5", "--json"],
                             capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["routings"] == 5 and np.array(d["couplings"]).shape[0] == 5
    code, out, err = run_cli(["inspect", two_digits, "--model", models["caps"], "--top", "2"], capsys)
    assert code == 0, err
    assert "mean |Δc|" in out and "mean entropy" in out and "reading order (top-to-bottom)" in out
    for j in range(10):
        assert f"│ {j:>5} │" in out  # one row per class
    assert out.count("#1") == 1 and out.count("#2") == 1


@pytest.mark.torch
def test_figure_is_written_atomically(models, two_digits, tmp_path, capsys):
    fig = tmp_path / "figs" / "maps.png"
    fig.parent.mkdir()
    code, _, err = run_cli(["inspect", two_digits, "--model", models["caps"], "--top", "2", "--out", fig],
                           capsys)
    assert code == 0, err
    data = fig.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert [p.name for p in fig.parent.iterdir()] == ["maps.png"]  # no temporary left behind
    with Image.open(fig) as im:
        assert im.size[0] > 600 and im.size[1] > 600


@pytest.mark.torch
def test_pooling_head_shows_scores_only(models, two_digits, tmp_path, capsys):
    code, out, err = run_cli(["inspect", two_digits, "--model", models["pool"], "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert d["head"] == "pool" and d["couplings"] is None and d["order"] is None and d["routings"] == 0
    assert len(d["lengths"]) == 10
    code, out, err = run_cli(["inspect", two_digits, "--model", models["pool"], "--out", tmp_path / "p.png"],
                             capsys)
    assert code == 0, err
    assert "pooling head: no routing" in out and (tmp_path / "p.png").exists()
    code, out, err = run_cli(["inspect", two_digits, "--model", models["pool"], "--routings", "3"], capsys)
    assert_one_line_error(code, out, err, "pooling head")


@pytest.mark.torch
def test_per_position_weights_need_the_training_size(models, two_digits, capsys):
    code, out, err = run_cli(["inspect", two_digits, "--model", models["fixed"]], capsys)
    assert_one_line_error(code, out, err, "try --resize 28x28")
    code, out, err = run_cli(["inspect", two_digits, "--model", models["fixed"], "--resize", "28x28",
                              "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["grid"] == [8, 8]


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    (tmp / "notes.png").write_text("not an image")
    (tmp / "empty.png").write_bytes(b"")
    huge_png(tmp / "huge.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp / "full.png")
    data = (tmp / "full.png").read_bytes()
    (tmp / "cut.png").write_bytes(data[: len(data) // 2])
    np.save(tmp / "stack.npy", np.zeros((5, 28, 28), np.float32))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp / "tiny.png")
    return {
        "not an image": (tmp / "notes.png", "not an image"),
        "empty": (tmp / "empty.png", "empty file"),
        "20000x20000": (tmp / "huge.png", "400,000,000 pixels"),
        "truncated": (tmp / "cut.png", "truncated or corrupt"),
        "3-D array": (tmp / "stack.npy", "3-D array"),
        "too small": (tmp / "tiny.png", "too small"),
    }


@pytest.mark.parametrize("case",
                         ["not an image", "empty", "20000x20000", "truncated", "3-D array", "too small"])
def test_bad_images_give_one_line_and_exit_2(models, tmp_path, capsys, case):
    path, message = _bad_inputs(tmp_path)[case]
    code, out, err = run_cli(["inspect", path, "--model", models["caps"]], capsys)
    assert_one_line_error(code, out, err, message)
    assert err.startswith(f"error: {path}")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resize", "big"], "--resize"),
        (["--fit"], "--fit scales to fit the --resize size"),
        (["--top", "0"], "--top"),
        (["--top", "11"], "--top"),
        (["--routings", "0"], "--routings"),
        (["--invert", "maybe"], "--invert"),
        (["--order", "sideways"], "--order"),
        (["--out", "fig.gif"], "must end in"),
        (["--out", "no/such/folder/fig.png"], "does not exist"),
        (["--backend", "jax"], "unknown backend"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(models, two_digits, tmp_path, capsys, monkeypatch, extra,
                                              message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["inspect", two_digits, "--model", models["caps"], *extra], capsys)
    assert_one_line_error(code, out, err, message)
    assert not (tmp_path / "fig.gif").exists()


def test_missing_model_is_one_line(two_digits, tmp_path, capsys):
    code, out, err = run_cli(["inspect", two_digits, "--model", tmp_path / "none.safetensors"], capsys)
    assert_one_line_error(code, out, err, "none.safetensors")


def test_help_documents_the_decisions(capsys):
    code, out, _ = run_cli(["inspect", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "Pooling-head models have no routing" in text and "stack of images is refused" in text


@pytest.mark.keras
def test_keras_json_agrees_with_torch(models, two_digits, capsys):
    args = ["inspect", two_digits, "--model", models["caps"], "--json", "--top", "2"]
    code, out_t, err = run_cli([*args, "--backend", "torch"], capsys)
    assert code == 0, err
    code, out_k, err = run_cli([*args, "--backend", "keras"], capsys)
    assert code == 0, err
    t, k = json.loads(out_t), json.loads(out_k)
    np.testing.assert_allclose(k["lengths"], t["lengths"], atol=1e-4)
    np.testing.assert_allclose(k["couplings"], t["couplings"], atol=1e-4)
    # The same top-2 (in order) and reading order follow from the closeness above only away from
    # ties: torch's margins must exceed twice the backends' actual difference.
    ranked = np.sort(t["lengths"])[::-1]
    length_diff = np.abs(np.subtract(k["lengths"], t["lengths"])).max()
    assert min(ranked[0] - ranked[1], ranked[1] - ranked[2]) > 2 * length_diff, (ranked, length_diff)
    assert k["top"] == t["top"]
    axis = 0 if t["direction"] == "top-to-bottom" else 1
    first, second = (np.array(t["centres"][str(j)]) for j in t["top"])
    centre_diff = max(np.abs(np.subtract(k["centres"][str(j)], t["centres"][str(j)])).max() for j in t["top"])
    assert abs(first[axis] - second[axis]) > 2 * centre_diff, t["centres"]
    assert k["order"] == t["order"]


@pytest.mark.torch
def test_rgb_model_figure_shows_the_input_in_colour_and_json_names_classes(tmp_path, capsys):
    """A colour model's figure draws the input as the model sees it, in colour (the maps outline its
    gray mean), and --json names every class it reports; a gray model of the same image is the control."""
    names = ("cat", "dog", "eel")
    rgb = ModelSpec(in_channels=3, num_classes=3, class_names=names)
    save_model(tmp_path / "rgb.safetensors", rgb, init_weights(rgb, 0))
    gray = ModelSpec(num_classes=3)
    save_model(tmp_path / "gray.safetensors", gray, init_weights(gray, 0))
    img = np.zeros((28, 28, 3), np.uint8)
    img[:] = (255, 0, 255)  # magenta: no colour map, bar or marker of the figure uses it
    img[6:22, 10:18] = (0, 255, 255)
    Image.fromarray(img).save(tmp_path / "magenta.png")

    def magenta_pixels(model: str) -> int:
        fig = tmp_path / f"{model}.png"
        code, out, err = run_cli(["inspect", tmp_path / f"{model}.safetensors", tmp_path / "magenta.png",
                                  "--invert", "no", "--top", "2", "--out", fig, "--json"], capsys)
        assert code == 0, err
        d = json.loads(out)
        want = list(names) if model == "rgb" else ["0", "1", "2"]
        assert d["class_names"] == want and len(d["lengths"]) == 3
        assert d["top_names"] == [want[j] for j in d["top"]]
        assert d["predicted_names"] == [want[j] for j in d["predicted"]]
        assert d["order_names"] == [want[j] for j in d["order"]]
        with Image.open(fig) as im:
            px = np.asarray(im.convert("RGB")).astype(int)
        near = (np.abs(px - (255, 0, 255)).max(axis=2) < 40)
        rows, cols = np.nonzero(near)
        if len(rows):  # the input panel is the figure's top-left
            assert rows.max() < px.shape[0] / 2 and cols.max() < px.shape[1] / 2
        return len(rows)

    assert magenta_pixels("rgb") > 2000
    assert magenta_pixels("gray") == 0


def test_out_may_not_be_the_input_image(models, two_digits, capsys):
    """`inspect MODEL a.png --out a.png` replaced the digit with the figure, exit 0."""
    before = two_digits.read_bytes()
    code, out, err = run_cli(["inspect", models["caps"], two_digits, "--out", two_digits], capsys)
    assert_one_line_error(code, out, err, f"--out {two_digits}: is the input image")
    assert two_digits.read_bytes() == before


def test_an_attention_model_refuses_routings_and_counts_its_capsules(tmp_path, capsys):
    """`efficient` routes by attention in one pass: --routings was ignored (it showed 1 iteration); its
    figure's title counts every primary capsule (it said 1x1 = 1 of its 16)."""
    from capsctl.cli._inspect import _title
    from capsctl.inspect.analysis import inspect_one
    from capsctl.model.fit import with_training_inputs
    from capsctl.model.presets import preset

    spec = with_training_inputs(preset("efficient"), 28, 28, composed=False)
    model = tmp_path / "eff.safetensors"
    save_model(model, spec, init_weights(spec, 0))
    digit = tmp_path / "d.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(digit)
    code, out, err = run_cli(["inspect", model, digit, "--routings", "7"], capsys)
    assert_one_line_error(code, out, err, "--routings", "routes by attention")
    gh, gw, types = spec.capsule_grid(28, 28)
    n = gh * gw * types
    res = inspect_one(spec, np.full(10, 0.5), (28, 28), np.full((1, 10, n), 0.1), np.ones((1, 10, n)))
    assert f"{gh}×{gw}×{types} = {n} input capsules" in _title(digit, model, spec, res, "torch")


@pytest.mark.torch
def test_names_with_dollars_brackets_and_non_utf8_bytes_are_shown_as_written(tmp_path, capsys):
    """A `$` in a file name started matplotlib's mathtext ('a$_$.png': a traceback, no figure); a file
    name that is not UTF-8 was a TypeError in the figure's title and a UnicodeEncodeError on a strict
    terminal; a class name holding Rich markup ('[/]') was a MarkupError in inspect's notes, and
    'fig[b].png' was announced as 'fig.png'."""
    import os

    from capsctl.model.spec import DecoderSpec

    spec = ModelSpec(num_classes=3, class_names=("[/]", "[misc]", "$x$"),
                     decoder=DecoderSpec(hidden=(8,), image_shape=(28, 28, 1)))
    model = tmp_path / "m.safetensors"
    save_model(model, spec, init_weights(spec, 0))
    ink = np.zeros((28, 28), np.uint8)
    ink[6:22, 12:16] = 255
    dollar = tmp_path / "a$_$.png"
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/\xff\xfe.png"))
    for image in (dollar, odd):
        Image.fromarray(ink).save(image)
    runs = [
        ([dollar, "--out", tmp_path / "fig[b].png"], tmp_path / "fig[b].png"),
        ([odd, "--out", tmp_path / "odd.png"], tmp_path / "odd.png"),
        ([dollar, "--reconstruct", "--class", "0"], None),
        ([dollar, "--perturb", "--class", "0", "--steps", "3"], None),
        ([dollar, "--reconstruct", "--class", "1", "--out", tmp_path / "r.png"], tmp_path / "r.png"),
        ([dollar, "--perturb", "--class", "2", "--steps", "3", "--out", tmp_path / "p.png"],
         tmp_path / "p.png"),
    ]
    for args, figure in runs:
        code, out, err = run_cli(["inspect", model, *args], capsys)
        assert code == 0, err
        if figure is not None:
            assert figure.read_bytes().startswith(b"\x89PNG")
            assert f"figure: {figure}" in "".join(err.split("\n"))
    code, out, err = run_cli(["inspect", model, odd], capsys)
    assert code == 0 and "\\xff\\xfe.png" in out
    out.encode("utf-8")  # (strict: what a UTF-8 terminal takes)
    code, out, err = run_cli(["inspect", model, dollar, "--reconstruct", "--class", "0"], capsys)
    assert "reconstructed from capsules: [/]" in err


def test_a_model_file_alone_is_known_by_its_suffix_in_any_case(models, tmp_path, capsys):
    """`inspect MODEL.SAFETENSORS` (no image) took the model file for the image, scored by the shipped
    model: 'no such file', where a lower-case suffix said the image was forgotten."""
    upper = tmp_path / "CAPS.SAFETENSORS"
    upper.write_bytes(models["caps"].read_bytes())
    code, _out, err = run_cli(["inspect", upper], capsys)
    assert code == 2 and "give the image after the model" in err, err
