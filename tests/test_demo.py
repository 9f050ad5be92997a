"""The main job: `softsplat demo`, and the .flo reader/writer it uses for user data."""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from softsplat import demo, flo


def _arguments(tmp_path, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args([])
    args.out = str(tmp_path / "figure.png")
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_soft_beats_avg_beats_sum_on_the_embedded_scene() -> None:
    scene = demo.Scene.default()
    one, two, flow = scene.frame(0.0), scene.frame(1.0), scene.flow()
    metric = demo.metrics(one, two, flow, alpha=20.0)
    for t in (0.5, 0.75):  # the default time, and one later
        results = demo.warp_all(one, flow, metric, t, backend="auto")
        truth = scene.frame(t)
        scores = {mode: demo.psnr(result, truth) for mode, result in results.items()}
        assert scores["soft"] > scores["avg"] > scores["sum"], (t, scores)


def test_scene_flow_is_exact_where_nothing_is_occluded() -> None:
    """Backward-warping frame two by the exact flow gives frame one wherever the background
    stays visible (its motion is a whole number of pixels at the default size: no resampling)."""
    scene = demo.Scene.default()
    one, two, flow = scene.frame(0.0), scene.frame(1.0), scene.flow()
    background = scene.layers[0].velocity
    x, y = scene._grid()
    far = torch.ones_like(one[:, :1], dtype=torch.bool)
    for layer in scene.layers[1:]:  # background at p at t=0, and still visible where it goes at t=1
        far &= ~demo._inside(layer, x, y, 0.0)
        far &= ~demo._inside(layer, x + background[0], y + background[1], 1.0)
    far[..., :12, :] = far[..., -12:, :] = far[..., :, :12] = far[..., :, -12:] = False
    error = (demo.backwarp(two, flow) - one).abs().mean(1, keepdim=True)
    assert background != (0, 0) and far.sum() > 0.5 * far.numel()
    assert float(error[far].max()) < 1e-5  # grid_sample's coordinate rounding


def test_demo_command_writes_figure_table_and_gif(tmp_path) -> None:
    out, gif = tmp_path / "demo.png", tmp_path / "sweep.gif"
    result = subprocess.run(
        [sys.executable, "-m", "softsplat", "demo", "--out", str(out), "--gif", str(gif), "--times", "0.25,0.5",
         "--height", "90", "--width", "160", "--backend", "torch"],
        capture_output=True, text=True, timeout=300, env={"COLUMNS": "120", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert "backend torch (chosen)" in result.stdout and "PSNR" in result.stdout
    assert out.stat().st_size > 10_000 and gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")


def test_demo_on_user_frames_with_a_flo_file(tmp_path) -> None:
    import matplotlib.image

    scene = demo.Scene.default(60, 100)
    for name, t in (("a.png", 0.0), ("b.png", 1.0)):
        matplotlib.image.imsave(tmp_path / name, scene.frame(t)[0].permute(1, 2, 0).numpy())
    flo.write_flo(tmp_path / "f.flo", scene.flow())
    args = _arguments(tmp_path, one=str(tmp_path / "a.png"), two=str(tmp_path / "b.png"), flow=str(tmp_path / "f.flo"), backend="torch")
    assert demo.run(args) == 0 and (tmp_path / "figure.png").exists()


def test_flo_round_trip(tmp_path) -> None:
    flow = torch.randn(2, 7, 11)
    flow[0, 0, 0] = float("inf")
    flo.write_flo(tmp_path / "x.flo", flow)
    assert torch.equal(flo.read_flo(tmp_path / "x.flo"), flow)
    flo.write_flo(tmp_path / "y.flo", flow.unsqueeze(0))
    assert torch.equal(flo.read_flo(tmp_path / "y.flo"), flow)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "expected a .flo header of 12 bytes, got a file of 0 bytes"),
        (b"JUNK" + struct.pack("<ii", 2, 2), "expected the .flo magic 202021.25"),
        (struct.pack("<fii", 202021.25, 3, 2) + b"\0" * 40, r"a 3 x 2 flow needs 60 bytes, the file has 52 \(truncated\)"),
        (struct.pack("<fii", 202021.25, 1, 1) + b"\0" * 12, r"needs 20 bytes, the file has 24 \(trailing data\)"),
        (struct.pack("<fii", 202021.25, -1, 5), r"expected a width and height in \[0, 65536\], got -1 x 5"),
    ],
)
def test_flo_rejects_corrupt_files(tmp_path, content, message) -> None:
    path = tmp_path / "bad.flo"
    path.write_bytes(content)
    with pytest.raises(flo.FloError, match=message) as error:
        flo.read_flo(path)
    assert str(path) in str(error.value) and isinstance(error.value, ValueError)


def test_write_flo_rejects_bad_shapes(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^flow: expected a tensor \[2, H, W\], got shape \(3, 4, 5\)"):
        flo.write_flo(tmp_path / "z.flo", torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match=r"^flow: expected a numpy array \[H, W, 2\] \(OpenCV's layout\)"):
        flo.write_flo(tmp_path / "z.flo", np.zeros((2, 4, 5), np.float32))
    with pytest.raises(TypeError, match=r"^flow: expected a torch.Tensor \[2, H, W\] or a numpy array"):
        flo.write_flo(tmp_path / "z.flo", [[0.0]])


def test_write_flo_takes_opencvs_flow_layout(tmp_path) -> None:
    """OpenCV's optical flow is a numpy array [H, W, 2]: written as is, read back as [2, H, W]."""
    flow = np.random.default_rng(0).standard_normal((4, 5, 2)).astype(np.float32)
    flo.write_flo(tmp_path / "cv.flo", flow)
    assert torch.equal(flo.read_flo(tmp_path / "cv.flo"), torch.from_numpy(flow).permute(2, 0, 1))


def test_bidirectional_joint_splatting_fills_the_holes() -> None:
    scene = demo.Scene.default(135, 240)
    one, two = scene.frame(0.0), scene.frame(1.0)
    flow, flow_back = scene.flow(), scene.flow(backward=True)
    metric_one, metric_two = demo.metrics(one, two, flow, 20.0), demo.metrics(two, one, flow_back, 20.0)
    truth = scene.frame(0.5)
    single = demo.warp_all(one, flow, metric_one, 0.5, backend="auto")
    both = demo.warp_both(one, two, flow, flow_back, metric_one, metric_two, 0.5, backend="auto")
    for mode in ("avg", "linear", "soft"):
        assert demo.psnr(both[mode], truth) > demo.psnr(single[mode], truth) + 3, mode


def _figure_texts(monkeypatch) -> list[str]:
    """Every text of the figures the demo draws (titles, suptitle, annotations), collected as
    each figure is closed."""
    import matplotlib.pyplot as plt

    texts, close = [], plt.close

    def collect(fig=None):
        if fig is not None and hasattr(fig, "get_axes"):
            texts.append(fig._suptitle.get_text() if fig._suptitle else "")
            for axis in fig.get_axes():
                texts.append(axis.get_title())
                texts.extend(text.get_text() for text in axis.texts)
        return close(fig)

    monkeypatch.setattr(plt, "close", collect)
    return texts


def _user_frames(tmp_path) -> dict[str, str]:
    import matplotlib.image

    scene = demo.Scene.default(60, 100)
    for name, t in (("a.png", 0.0), ("b.png", 1.0)):
        matplotlib.image.imsave(tmp_path / name, scene.frame(t)[0].permute(1, 2, 0).numpy())
    flo.write_flo(tmp_path / "f.flo", scene.flow())
    flo.write_flo(tmp_path / "b.flo", scene.flow(backward=True))
    return {"one": str(tmp_path / "a.png"), "two": str(tmp_path / "b.png"), "flow": str(tmp_path / "f.flo")}


def test_user_frames_without_ground_truth_show_no_nan_and_no_true_frame(tmp_path, monkeypatch, capsys) -> None:
    texts = _figure_texts(monkeypatch)
    monkeypatch.setenv("COLUMNS", "200")  # table titles on one line
    args = _arguments(tmp_path, **_user_frames(tmp_path), times="0.5,1", backend="torch")
    assert demo.run(args) == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower() and "no PSNR at t = 0.5" in printed
    assert "against frame two, your frames' reference at t = 1" in printed  # the one reference, named
    assert texts and not any("nan" in text.lower() or "true frame" in text for text in texts), texts
    assert any("no ground truth" in text for text in texts)


def test_bidirectional_shows_the_joint_result_in_the_figure(tmp_path, monkeypatch) -> None:
    texts = _figure_texts(monkeypatch)
    frames = _user_frames(tmp_path)
    figures = {}
    for joint in (False, True):
        out = tmp_path / f"figure-{joint}.png"
        extra = {"bidirectional": True, "flow_back": str(tmp_path / "b.flo")} if joint else {}
        assert demo.run(_arguments(tmp_path, **frames, **extra, backend="torch", out=str(out))) == 0
        figures[joint] = out.read_bytes()
    assert figures[True] != figures[False]
    assert any("jointly (splat_many)" in text for text in texts)


def test_an_existing_figure_is_replaced_with_a_word(tmp_path, capsys) -> None:
    args = _arguments(tmp_path, height=40, width=64, backend="torch")
    (tmp_path / "figure.png").write_bytes(b"old")
    assert demo.run(args) == 0
    assert "(replaced the earlier file)" in capsys.readouterr().out


def test_the_bidirectional_gif_animates_what_the_figure_shows(tmp_path, monkeypatch) -> None:
    """With --bidirectional the figure shows both frames splatted jointly; the GIF's frames are
    those same joint results (not frame one's warps, with their holes), and its title says so."""
    from softsplat import demo
    from softsplat.cli import main

    shown, animated = {}, {}
    monkeypatch.setattr(demo, "figure", lambda path, one, two, flow, reference, results, scores, t, backend, joint=False:
                        shown.update(results=results, joint=joint, t=t))

    def fake_animation(path, one, results_at, times, joint):
        animated.update(joint=joint, results={t: results_at(t, joint) for t in times})

    monkeypatch.setattr(demo, "animation", fake_animation)
    assert main(["demo", "--bidirectional", "--times", "0.25,0.5", "--height", "48", "--width", "64",
                 "--out", str(tmp_path / "d.png"), "--gif", str(tmp_path / "d.gif"), "--backend", "torch"]) == 0
    assert shown["joint"] is True and animated["joint"] is True
    assert animated["results"][shown["t"]] is shown["results"]
