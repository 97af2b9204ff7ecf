"""`vtprune stability` and `vtprune show` on the shipped toy models (a few items each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vtprune import toyvqa
from vtprune.cli import main
from vtprune.eval.stability import jaccard, perturb

SHIPPED = [a for a in toyvqa.ARCHS if (toyvqa.checkpoint_path(a) / "config.json").exists()]


def test_perturbations_are_small_and_deterministic():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    pixels = np.asarray(image, dtype=np.float32)
    noisy = np.asarray(perturb(image, "noise", seed=1), dtype=np.float32)
    assert 1.0 < np.abs(noisy - pixels).mean() < 3.0  # sigma 2/255 of the range: ~1.6 grey levels on average
    assert np.array_equal(np.asarray(perturb(image, "noise", seed=1)), noisy)
    shifted = np.asarray(perturb(image, "shift"))
    assert np.array_equal(shifted[:, 1:], pixels[:, :-1]) and np.array_equal(shifted[:, 0], pixels[:, 0])
    assert perturb(image, "jpeg").size == image.size
    with pytest.raises(ValueError, match="noise"):
        perturb(image, "blur")
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and jaccard([], []) == 1.0


@pytest.mark.parametrize("arch", SHIPPED)
def test_stability_on_the_shipped_toy_models(arch, tmp_path):
    out = tmp_path / "stability.json"
    assert (
        main(["stability", "--model", arch, "--policies", "random", "divprune", "--keep", "16", "--n", "2", "--json", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    assert result["model"] == arch and result["n"] == 2 and set(result["unpruned"]["agreement"]) == {"noise", "shift", "jpeg"}
    by_name = {p["policy"]: p for p in result["policies"]}
    assert by_name["random"]["jaccard"] == {"noise": 1.0, "shift": 1.0, "jpeg": 1.0}  # does not read the image
    assert all(0.0 <= v <= 1.0 for v in by_name["divprune"]["jaccard"].values())
    assert by_name["divprune"]["kept_tokens"] == 16


@pytest.mark.parametrize("arch", SHIPPED)
def test_show_writes_a_captioned_png_per_stage(arch, tmp_path, capsys):
    from vtprune.toyvqa.models import IMAGE_SIZE

    item, image, _ = toyvqa.make_item("test", 0, size=IMAGE_SIZE[arch])
    image.save(tmp_path / "scene.png")
    out = tmp_path / "kept.png"
    assert (
        main(
            [
                "show",
                str(tmp_path / "scene.png"),
                "--model",
                arch,
                "--policy",
                "transprune",
                "--keep",
                "16",
                "--question",
                item.question,
                "--out",
                str(out),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "llm@1" in printed and "->16" in printed  # three stages, the last one at the budget
    with Image.open(out) as png:
        assert png.size[0] > 3 * png.size[1] // 2  # one panel per stage, side by side


def test_show_video_strip_draws_kept_cells_bright_and_refuses_bad_videos(tmp_path, capsys):
    from vtprune.eval.show import render_video

    frames = [np.full((56, 56, 3), 200, dtype=np.uint8) for _ in range(4)]
    brightness = {}
    for name, kept in (("all", list(range(4 * 16))), ("first", list(range(16))), ("none_but_one", [0])):
        out = tmp_path / f"{name}.png"
        render_video(frames, (4, 4), {"kept": kept, "merged": kept[:2], "before": 64, "after": len(kept)}, "t", out)
        with Image.open(out) as png:
            assert png.size[0] > 2 * png.size[1]  # four panels side by side
            brightness[name] = float(np.asarray(png.convert("L"), dtype=np.float32).mean())
    assert brightness["all"] > brightness["first"] > brightness["none_but_one"]  # dropped cells are dimmed
    Image.fromarray(frames[0]).save(tmp_path / "f.png")
    assert (
        main(
            [
                "show",
                str(tmp_path / "f.png"),
                "--video",
                "3",
                "--model",
                "qwen2_5_vl",
                "--policy",
                "evs",
                "--keep",
                "0.5",
                "--out",
                str(tmp_path / "v.png"),
            ]
        )
        == 2
    )
    assert "even number of frames" in capsys.readouterr().err
    assert (
        main(
            [
                "show",
                str(tmp_path / "f.png"),
                "--video",
                "4",
                "--model",
                "llava",
                "--policy",
                "evs",
                "--keep",
                "0.5",
                "--out",
                str(tmp_path / "v.png"),
            ]
        )
        == 2
    )
    assert "qwen2_5_vl" in capsys.readouterr().err


@pytest.mark.parametrize("arch", SHIPPED)
def test_show_draws_what_pixelprune_dropped(arch, tmp_path, capsys):
    """A flat picture with one square: pixelprune keeps few units; show prints its counts and draws one panel."""
    from vtprune.toyvqa.models import IMAGE_SIZE

    side = IMAGE_SIZE[arch]
    pixels = np.full((side, side, 3), 255, dtype=np.uint8)
    pixels[side // 4 : side // 2, side // 4 : side // 2] = (200, 30, 30)
    Image.fromarray(pixels).save(tmp_path / "flat.png")
    out = tmp_path / "dropped.png"
    assert (
        main(
            [
                "show",
                str(tmp_path / "flat.png"),
                "--model",
                arch,
                "--policy",
                "pixelprune",
                "--out",
                str(out),
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    before, after = (int(v) for v in printed.split("vision ")[1].split(";")[0].split("->"))
    assert after < before // 2  # most units of a flat picture equal their prediction
    with Image.open(out) as png:
        assert png.size[0] > 0
    assert (
        main(
            [
                "show",
                str(tmp_path / "flat.png"),
                "--model",
                arch,
                "--policy",
                "pixelprune+random",
                "--keep",
                "4",
                "--out",
                str(out),
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert "->4" in capsys.readouterr().out
