"""``softsplat demo``: summation, average, linear, softmax and max splatting side by side.

With no arguments the demo renders an embedded synthetic scene: two textured objects moving over
a textured, panning background. Because the scene is generated in code, the forward flow is
exact, occlusions are known, and the true frame exists at any time ``t``, so every mode's result
is scored by its PSNR against the truth. Frame one is warped to ``t`` with the five modes; the
metric follows the paper: brightness constancy ``|I0 - backwarp(I1, F)|``, used as
``-alpha * error`` by ``soft``, as a clipped positive weight by ``linear`` and as ``-error`` by
``max`` (the best match wins outright).
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from . import api
from .modes import Mode

MODES = ("sum", "avg", "linear", "soft", "max")


@dataclasses.dataclass(frozen=True)
class Layer:
    """A rigidly translating textured shape; ``None`` shape means the whole (background) plane."""

    velocity: tuple[float, float]  # pixels per unit time (x, y); the flow from t=0 to t=1
    centre: tuple[float, float] = (0.0, 0.0)  # at t = 0
    shape: str | None = None  # "disc" or "box"
    size: tuple[float, float] = (0.0, 0.0)  # radius, or half width and half height
    seed: int = 0


def _texture(u: torch.Tensor, v: torch.Tensor, seed: int) -> torch.Tensor:
    """An RGB texture of the coordinates (u, v), values in [0, 1]: [3, H, W]. Seed 1 gives a
    muted, smooth background; other seeds bold two-colour patterns (checks or stripes) that
    stand out from it."""
    generator = torch.Generator().manual_seed(seed)
    detail = torch.zeros_like(u)
    for _ in range(5):
        fu, fv = (torch.rand(2, generator=generator) - 0.5) * 0.6
        phase = torch.rand(1, generator=generator).item() * 2 * math.pi
        detail = detail + torch.sin(u * fu + v * fv + phase) / 5
    if seed == 1:
        base = torch.tensor([0.35, 0.45, 0.55], dtype=u.dtype).view(3, 1, 1)
        return (base + 0.15 * detail + 0.05 * torch.sign(torch.sin(0.2 * u - 0.1 * v))).clamp(0, 1)
    if seed % 2 == 0:  # checks
        pattern = (torch.floor(u / 9) + torch.floor(v / 9)) % 2
        first, second = torch.tensor([0.95, 0.8, 0.1]), torch.tensor([0.8, 0.1, 0.15])
    else:  # stripes
        pattern = (torch.floor((u + 0.5 * v) / 7) % 2)
        first, second = torch.tensor([0.1, 0.85, 0.4]), torch.tensor([0.95, 0.95, 0.9])
    colour = torch.where(pattern.bool(), first.to(u.dtype).view(3, 1, 1), second.to(u.dtype).view(3, 1, 1))
    return (colour + 0.08 * detail).clamp(0, 1)


def _inside(layer: Layer, x: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    if layer.shape is None:
        return torch.ones_like(x, dtype=torch.bool)
    cx = layer.centre[0] + layer.velocity[0] * t
    cy = layer.centre[1] + layer.velocity[1] * t
    if layer.shape == "disc":
        return (x - cx) ** 2 + (y - cy) ** 2 <= layer.size[0] ** 2
    return ((x - cx).abs() <= layer.size[0]) & ((y - cy).abs() <= layer.size[1])


@dataclasses.dataclass
class Scene:
    height: int = 270
    width: int = 480
    layers: tuple[Layer, ...] = ()  # back to front

    @classmethod
    def default(cls, height: int = 270, width: int = 480) -> Scene:
        s = min(height, width) / 270
        return cls(height, width, (
            Layer(velocity=(6.0 * s, -3.0 * s), seed=1),  # panning background
            Layer(velocity=(32.0 * s, 10.0 * s), centre=(0.36 * width, 0.45 * height), shape="disc", size=(48 * s, 0), seed=2),
            Layer(velocity=(-30.0 * s, 6.0 * s), centre=(0.64 * width, 0.55 * height), shape="box", size=(58 * s, 40 * s), seed=3),
        ))

    def _grid(self):
        y, x = torch.meshgrid(torch.arange(self.height, dtype=torch.float64), torch.arange(self.width, dtype=torch.float64), indexing="ij")
        return x, y

    def frame(self, t: float) -> torch.Tensor:
        """The exact frame at time ``t``: [1, 3, H, W] float32 in [0, 1]."""
        x, y = self._grid()
        image = torch.zeros(3, self.height, self.width, dtype=torch.float64)
        for layer in self.layers:
            u = x - layer.velocity[0] * t - layer.centre[0]
            v = y - layer.velocity[1] * t - layer.centre[1]
            image = torch.where(_inside(layer, x, y, t), _texture(u, v, layer.seed), image)
        return image.float().unsqueeze(0)

    def flow(self, backward: bool = False) -> torch.Tensor:
        """The exact flow of the visible surface: from t=0 to t=1, or with ``backward`` from
        t=1 to t=0: [1, 2, H, W]."""
        x, y = self._grid()
        flow = torch.zeros(2, self.height, self.width, dtype=torch.float64)
        sign, start = (-1.0, 1.0) if backward else (1.0, 0.0)
        for layer in self.layers:
            moving = sign * torch.tensor(layer.velocity, dtype=torch.float64).view(2, 1, 1).expand_as(flow)
            flow = torch.where(_inside(layer, x, y, start), moving, flow)
        return flow.float().unsqueeze(0)


def backwarp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``image`` sampled at ``p + flow(p)`` (bilinear, border padding): [N, C, H, W]."""
    N, _, H, W = image.shape
    y, x = torch.meshgrid(torch.arange(H, dtype=image.dtype), torch.arange(W, dtype=image.dtype), indexing="ij")
    gx = (x + flow[:, 0]) / max(W - 1, 1) * 2 - 1
    gy = (y + flow[:, 1]) / max(H - 1, 1) * 2 - 1
    return F.grid_sample(image, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border", align_corners=True)


def metrics(one: torch.Tensor, two: torch.Tensor, flow: torch.Tensor, alpha: float) -> dict[str, torch.Tensor | None]:
    """The per-pixel metric of each mode: brightness constancy, as the paper uses it."""
    error = (one - backwarp(two, flow)).abs().mean(1, keepdim=True)
    # max: the source that matches best wins outright (only the order of the metric matters)
    return {"sum": None, "avg": None, "linear": (1.0 - alpha * error).clamp(1e-3, 1.0), "soft": -alpha * error,
            "max": -error}


def psnr(result: torch.Tensor, truth: torch.Tensor) -> float:
    mse = float(((result.clamp(0, 1) - truth) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def warp_all(one, flow, metric_by_mode, t: float, backend: str) -> dict[str, torch.Tensor]:
    return {
        mode: api.splat(one, flow * t, metric_by_mode[mode], mode=mode, backend=backend)
        for mode in MODES
    }


def warp_both(one, two, flow, flow_back, metric_one, metric_two, t: float, backend: str) -> dict[str, torch.Tensor]:
    """Joint splatting (``splat_many``): frame one forward to ``t`` and frame two backward to
    ``t``, normalised together, so each fills the other's disocclusions."""
    return {
        mode: api.splat_many(
            [(one, flow * t, metric_one[mode]), (two, flow_back * (1 - t), metric_two[mode])], mode=mode, backend=backend
        )
        for mode in MODES
    }


def flow_to_rgb(flow: torch.Tensor) -> torch.Tensor:
    """Direction as hue, magnitude as saturation: [H, W, 3] in [0, 1]."""
    from matplotlib.colors import hsv_to_rgb

    fx, fy = flow[0, 0], flow[0, 1]
    magnitude = torch.sqrt(fx**2 + fy**2)
    hue = (torch.atan2(-fy, -fx) / math.pi + 1) / 2
    saturation = (magnitude / magnitude.max().clamp_min(1e-6)).clamp(0, 1)
    return torch.from_numpy(hsv_to_rgb(torch.stack([hue, saturation, torch.ones_like(hue)], -1).numpy()))


def figure(path, one, two, flow, reference, results, scores, t, backend_name, joint=False) -> None:
    """The frames, the flow (with a colour-wheel key), each mode's result and, where a reference
    exists (``reference``: ``(image, title)``, else None), its PSNR and error map (with a colour
    scale). ``joint``: the results splat both frames (``splat_many``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def show(axis, image, title):
        axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        axis.set_title(title, fontsize=12)
        axis.axis("off")

    rows = 3 if reference is not None else 2
    columns = len(MODES)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.1 * rows + 0.6))
    for column in range(4, columns):  # the first row has four panels
        axes[0, column].axis("off")
    show(axes[0, 0], one[0], "frame one (t = 0)")
    show(axes[0, 1], two[0], "frame two (t = 1)")
    axes[0, 2].imshow(flow_to_rgb(flow).numpy())
    axes[0, 2].set_title("forward flow", fontsize=12)
    axes[0, 2].axis("off")
    key = axes[0, 2].inset_axes([0.78, 0.02, 0.2, 0.2 * one.shape[3] / one.shape[2]])
    key.imshow(flow_to_rgb(colour_wheel()).numpy())
    key.axis("off")
    if reference is not None:
        show(axes[0, 3], reference[0][0], reference[1])
    else:
        axes[0, 3].axis("off")
        axes[0, 3].text(0.5, 0.5, f"no ground truth at t = {t:g}\nfor these frames: no PSNR", ha="center",
                        va="center", fontsize=12, transform=axes[0, 3].transAxes)
    error_image = None
    for column, mode in enumerate(MODES):
        title = f"{mode} splatting" + (f": PSNR {scores[mode]:.2f} dB" if reference is not None else "")
        show(axes[1, column], results[mode][0], title)
        if reference is not None:
            error = (results[mode][0].clamp(0, 1) - reference[0][0]).abs().mean(0)
            error_image = axes[2, column].imshow(error.numpy(), cmap="magma", vmin=0, vmax=0.5)
            axes[2, column].set_title(f"{mode}: |error|", fontsize=12)
            axes[2, column].axis("off")
    what = "frames one and two splatted jointly (splat_many)" if joint else "frame one warped"
    fig.suptitle(f"softsplat demo: {what} to t = {t:g} (backend: {backend_name})", fontsize=14)
    fig.tight_layout()
    if error_image is not None:  # the error maps' scale, beside the last one
        fig.subplots_adjust(right=0.95)
        scale = axes[2, columns - 1].inset_axes([1.03, 0.0, 0.04, 1.0])
        fig.colorbar(error_image, cax=scale, label="mean |error| over RGB")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def colour_wheel(size: int = 64) -> torch.Tensor:
    """A flow field whose colours are flow_to_rgb's key: direction as hue, length as saturation."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    inside = (x**2 + y**2 <= 1).float()
    return torch.stack([x * inside, y * inside]).unsqueeze(0)


def animation(path, one, results_at, times, joint: bool) -> None:
    """The time sweep as a GIF: per frame, the five modes' results at t, as the figure shows
    them (``results_at(t, joint)``; with ``joint``, both frames splatted by splat_many), and a
    title that says which."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    H, W = one.shape[2:]
    panel = 4.0  # inches per panel's width; the height follows the frames' aspect
    fig, axes = plt.subplots(1, len(MODES), figsize=(len(MODES) * panel, panel * H / W + 0.6))
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=1 - 0.55 / (panel * H / W + 0.6), wspace=0.02)
    images = []
    for axis, mode in zip(axes, MODES):
        axis.axis("off")
        axis.set_title(mode, fontsize=12)
        images.append(axis.imshow(one[0].permute(1, 2, 0).numpy()))

    what = "frames one and two splatted jointly (splat_many)" if joint else "frame one warped"

    def draw(t):
        for image, result in zip(images, results_at(t, joint).values()):
            image.set_data(result[0].clamp(0, 1).permute(1, 2, 0).numpy())
        fig.suptitle(f"{what}, t = {t:.2f}", fontsize=12)
        return images

    FuncAnimation(fig, draw, frames=list(times)).save(path, writer=PillowWriter(fps=4))
    plt.close(fig)


def load_image(path) -> torch.Tensor:
    import matplotlib.image

    image = torch.from_numpy(matplotlib.image.imread(path)).float()
    if image.dim() == 2:
        image = image.unsqueeze(-1).expand(-1, -1, 3)
    image = image[..., :3]
    if image.max() > 1:
        image = image / 255
    return image.permute(2, 0, 1).unsqueeze(0).contiguous()


def estimate_flow(one: torch.Tensor, two: torch.Tensor) -> torch.Tensor:
    """Forward flow one -> two with OpenCV's DIS optical flow (the ``demo`` extra)."""
    try:
        import cv2
    except ImportError as error:
        raise SystemExit(
            "softsplat demo: --flow was not given and OpenCV is not installed to estimate it; "
            'install the demo extra (pip install "softsplat[demo]") or pass --flow F.flo'
        ) from error
    import numpy as np

    def grey(image):
        return (image[0].mean(0).numpy() * 255).astype(np.uint8)

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flow = dis.calc(grey(one), grey(two), None)
    return torch.from_numpy(flow).permute(2, 0, 1).unsqueeze(0).float()


def _written(console, what: str, path: str, existed: bool) -> None:
    console.print(f"{what}: {path}" + (" (replaced the earlier file)" if existed else ""))


def check_ready(args) -> None:
    """Before any work: the packages the demo needs, and the named backend able to run here."""
    import importlib.util

    from . import backends, options
    from .modes import Mode

    if importlib.util.find_spec("matplotlib") is None:
        raise options.DependencyError("demo needs matplotlib (the figure): pip install 'softsplat[demo]'")
    if args.one and not (args.flow and (args.flow_back or not args.bidirectional)) and importlib.util.find_spec("cv2") is None:
        raise options.DependencyError("demo needs OpenCV to estimate the flow of --one/--two (or pass --flow): "
                                  "pip install 'softsplat[demo]'")
    if args.backend != "auto":
        reasons = backends.get(args.backend).not_supported_reasons(
            backends.Signature("cpu", torch.float32, Mode.parse("soft")))
        if reasons:
            raise options.UsageError(f"argument --backend: expected a backend that can run here, got {args.backend!r}: "
                                 + "; ".join(reasons))


def run(args) -> int:
    import os

    from rich.console import Console
    from rich.table import Table

    from . import flo, options

    check_ready(args)
    console = Console()
    started = time.perf_counter()
    times = [float(v) for v in args.times.split(",")] if args.times else [args.t]
    if args.one or args.two:
        if not (args.one and args.two):
            raise options.UsageError("--one and --two go together: expected both, got only one")
        one, two = load_image(args.one), load_image(args.two)
        if one.shape != two.shape:
            raise options.UsageError(f"--two: expected an image of --one's size {tuple(one.shape[2:])}, got {tuple(two.shape[2:])}")
        flow = flo.read_flo(args.flow).unsqueeze(0) if args.flow else estimate_flow(one, two)
        if not args.flow:
            console.print("forward flow: estimated with OpenCV's DIS optical flow (pass --flow F.flo to give it)")
        flow_back = None
        if args.bidirectional:
            flow_back = flo.read_flo(args.flow_back).unsqueeze(0) if args.flow_back else estimate_flow(two, one)
            if not args.flow_back:
                console.print("backward flow: estimated with OpenCV's DIS optical flow (pass --flow-back F.flo to give it)")
        for option, field in (("--flow", flow), ("--flow-back", flow_back)):
            if field is not None and field.shape[2:] != one.shape[2:]:
                raise options.UsageError(f"{option}: expected a flow of the images' size {tuple(one.shape[2:])}, got {tuple(field.shape[2:])}")

        def reference_at(t):  # your frames: only frame two, at t = 1
            return (two, "frame two (the reference at t = 1)") if t == 1 else None
    else:
        if args.flow_back:
            raise options.UsageError("--flow-back: expected it with --one, --two and --bidirectional, got it with the embedded scene")
        scene = Scene.default(args.height, args.width)
        one, two, flow, flow_back = scene.frame(0.0), scene.frame(1.0), scene.flow(), scene.flow(backward=True)

        def reference_at(t):
            return scene.frame(t), f"true frame at t = {t:g}"
    metric_by_mode = metrics(one, two, flow, args.alpha)
    metric_two = metrics(two, one, flow_back, args.alpha) if args.bidirectional else None
    backend = api.resolve_backend(one, Mode.SOFT, args.backend)
    console.print(f"softsplat demo: backend [bold]{backend}[/] ({'picked by auto' if args.backend == 'auto' else 'chosen'})")

    warped = {}  # (t, joint) -> the five modes' results, each computed once

    def results_at(t, joint):
        if (t, joint) not in warped:
            warped[t, joint] = (warp_both(one, two, flow, flow_back, metric_by_mode, metric_two, t, backend) if joint
                                else warp_all(one, flow, metric_by_mode, t, backend))
        return warped[t, joint]

    shown_t = args.t if args.t in times else times[0]
    references = {t: reference_at(t) for t in {*times, shown_t}}  # each rendered once
    scored = [t for t in times if references[t] is not None]
    variants = [False, True] if args.bidirectional else [False]
    if scored:
        console.print("PSNR (dB) against " + ("the true frame" if args.one is None else "frame two, your frames' reference at t = 1"))
    for joint in variants:
        if scored:
            table = Table(title="both frames (splat_many)" if joint else "frame one warped")
            table.add_column("t")
            for mode in MODES:
                table.add_column(mode, justify="right")
            for t in scored:
                reference = references[t][0]
                scores = {m: psnr(r, reference) for m, r in results_at(t, joint).items()}
                best = max(scores.values())
                table.add_row(f"{t:g}", *(f"[bold]{scores[m]:.2f}[/]" if scores[m] == best else f"{scores[m]:.2f}" for m in MODES))
            console.print(table)
    unscored = [t for t in times if references[t] is None]
    if unscored:
        console.print(f"no PSNR at t = {', '.join(f'{t:g}' for t in unscored)}: your frames have no ground truth there "
                      "(at t = 1 frame two is compared)")
    joint = bool(args.bidirectional)
    results = results_at(shown_t, joint)
    reference = references[shown_t]
    scores = {m: psnr(r, reference[0]) for m, r in results.items()} if reference is not None else {}
    existed = os.path.exists(args.out)
    figure(args.out, one, two, flow, reference, results, scores, shown_t, backend, joint=joint)
    _written(console, "figure", args.out, existed)
    if args.gif:
        sweep = times if len(times) > 1 else [i / 8 for i in range(9)]
        existed = os.path.exists(args.gif)
        animation(args.gif, one, results_at, sweep, joint)
        _written(console, "animation", args.gif, existed)
    console.print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def add_arguments(parser) -> None:
    from . import options

    parser.add_argument("--t", type=options.unit_time, default=0.5, help="time to warp frame one to (default 0.5)")
    parser.add_argument("--times", default="", type=options.times, help="comma-separated times for a sweep, e.g. 0,0.25,0.5,0.75,1")
    parser.add_argument("--alpha", type=options.non_negative_float, default=20.0, help="metric scale: soft uses -alpha * brightness error")
    parser.add_argument("--out", default="softsplat-demo.png", type=options.output_file, help="figure to write (default softsplat-demo.png)")
    parser.add_argument("--gif", default=None, type=options.output_file, help="also write the time sweep as an animated GIF")
    parser.add_argument("--backend", default="auto", type=options.backend_name, help="backend to use (default auto)")
    parser.add_argument("--one", type=options.image_file, help="first frame (PNG) instead of the embedded scene")
    parser.add_argument("--two", type=options.image_file, help="second frame (PNG)")
    parser.add_argument("--flow", type=options.flo_file, help="forward flow one -> two (.flo); estimated with OpenCV if omitted")
    parser.add_argument("--flow-back", type=options.flo_file,
                        help="backward flow two -> one (.flo) for --bidirectional; estimated with OpenCV if omitted")
    parser.add_argument("--bidirectional", action="store_true",
                        help="also warp frame two backward and splat both jointly (splat_many): its PSNR, and the figure shows it")
    parser.add_argument("--height", type=options.positive_int, default=270, help="embedded scene height (default 270)")
    parser.add_argument("--width", type=options.positive_int, default=480, help="embedded scene width (default 480)")
