"""Run an exported anomalib(-ext) OpenVINO model over images, on the edge device.

Imports only OpenVINO, NumPy and OpenCV (no torch, no anomalib), so it runs where only
``pip install openvino opencv-python-headless numpy`` is possible. Writes, under ``--output``:

- ``predictions.csv``: one row per image (path, score, label), flushed as it goes;
- ``masks/<name>.png``: the binary predicted mask (when the model predicts one);
- ``overlays/<name>.png``: the image with the anomaly map as a heat map and the mask outlined;
- ``errors.csv``: images that could not be read, with the reason (they are skipped, not fatal).

Two modes, same results (tested): ``--mode sync`` infers one image at a time (lowest latency);
``--mode async`` (the default) is OpenVINO's throughput mode: a ring of asynchronous infer requests keeps several
inference requests in flight over ``--streams`` CPU streams while the next images are read and the finished ones are
written, in input order. A progress line on stderr gives images/s and the time left (``--no-progress``
turns it off).

Images of any size: each is resized to the export's input size exactly as the model's own pre-processor resizes it
in torch (torchvision ``Resize``: bilinear with antialiasing, or nearest, as the export records), so the scores are
torch's (within 1e-3 normalised, tested on images larger and smaller than the export, non-square).

Example::

    python tools/infer_openvino.py --model results/demo/export/weights/openvino/model.xml \\
        --input datasets/demo/synthetic/test --output results/demo/edge --streams 2 --threads 2
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openvino as ov

# a copy of anomalib_ext.data.validation.IMAGE_SUFFIXES: this tool must run without torch, anomalib or
# anomalib_ext installed (tests/test_benchmark.py asserts that the two lists are equal)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class InferenceError(RuntimeError):
    """A problem the user can fix; the message names the file."""


# copies of anomalib_ext.models.components.base's RESIZE_*_KEY: what an anomalib-ext export records (rt_info
# "framework" of model.xml) about its pre-processor's resize (tests/test_edge_resize.py asserts they are equal)
RESIZE_INTERPOLATION_KEY = "anomalib_ext.resize_interpolation"
RESIZE_ANTIALIAS_KEY = "anomalib_ext.resize_antialias"
RESIZE_SIZE_KEY = "anomalib_ext.resize_size"
RESIZE_MODES = ("bilinear", "nearest")


@dataclass(frozen=True)
class ResizeRecipe:
    """How the model's pre-processor resizes an image (torchvision ``Resize``); ``size`` is the size it resizes to
    (``None``: not recorded). ``recorded`` is False for an export that does not say (anomalib's own models, older
    anomalib-ext): then bilinear with antialiasing, torchvision's and anomalib's default."""

    interpolation: str = "bilinear"
    antialias: bool = True
    size: tuple[int, int] | None = None
    recorded: bool = False

    @classmethod
    def of(cls, model: ov.Model) -> ResizeRecipe:
        def value(key: str) -> str | None:
            path = ["framework", key]
            return model.get_rt_info(path).astype(str) if model.has_rt_info(path) else None

        interpolation = value(RESIZE_INTERPOLATION_KEY)
        if interpolation is None:
            return cls()
        size = value(RESIZE_SIZE_KEY)
        return cls(
            interpolation=interpolation,
            antialias=value(RESIZE_ANTIALIAS_KEY) == "true",
            size=tuple(int(side) for side in size.split(",")) if size else None,  # type: ignore[arg-type]
            recorded=True,
        )


def _resize_taps(in_size: int, out_size: int, interpolation: str, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights, ``(out_size, taps)`` each, of torch's 1-D resize along one axis.

    torch's own arithmetic in float32, so the pixels agree to ~1e-6 (tests/test_edge_resize.py): ``nearest`` is
    ``floor(i * in / out)``; bilinear ``align_corners=False`` with antialiasing is torch's
    ``_upsample_bilinear2d_aa`` (PIL's triangle filter, its support widened by the downscale factor, weights
    normalised per output pixel); without it, the two nearest source pixels (torch fuses ``scale * (i + .5) - .5``,
    hence float64 there).
    """
    out = np.arange(out_size)
    if interpolation == "nearest":
        if out_size == 2 * in_size:
            index = out >> 1
        else:
            scale = np.float32(in_size) / np.float32(out_size)
            index = np.minimum(np.floor(out.astype(np.float32) * scale).astype(np.int64), in_size - 1)
        return index[:, None], np.ones((out_size, 1), np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    if antialias:
        support = max(scale, np.float32(1.0))
        inverse_scale = np.float32(1.0) / support
        centre = scale * (out.astype(np.float32) + np.float32(0.5))
        first = np.maximum((centre.astype(np.float64) - support + 0.5).astype(np.int64), 0)
        stop = np.minimum((centre.astype(np.float64) + support + 0.5).astype(np.int64), in_size)
        index = first[:, None] + np.arange(int((stop - first).max()))[None]
        distance = ((index - centre[:, None]).astype(np.float32) + np.float32(0.5)) * inverse_scale
        weight = np.where(np.abs(distance) < 1, 1 - np.abs(distance), 0).astype(np.float32)
        weight[index >= stop[:, None]] = 0
        return np.minimum(index, in_size - 1), weight / weight.sum(axis=1, keepdims=True, dtype=np.float32)
    source = np.maximum((np.float64(scale) * (out + 0.5) - 0.5).astype(np.float32), np.float32(0))
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    fraction = np.clip(source - low.astype(np.float32), 0, 1).astype(np.float32)
    return np.stack([low, np.minimum(low + 1, in_size - 1)], 1), np.stack([1 - fraction, fraction], 1)


def resize_like_torch(image: np.ndarray, size: tuple[int, int], recipe: ResizeRecipe) -> np.ndarray:
    """``(H, W, C)`` float32 -> ``(*size, C)``, as torchvision ``Resize(size, interpolation, antialias)`` on the
    ``(C, H, W)`` float tensor (OpenCV has no antialiased bilinear; ``INTER_AREA`` is a box filter, not torch's).
    Separable: width first, then height, each a weighted sum of a few gathered columns/rows."""
    for axis in (1, 0):
        in_size, out_size = image.shape[axis], size[axis]
        if in_size == out_size:
            continue
        index, weight = _resize_taps(in_size, out_size, recipe.interpolation, recipe.antialias)
        shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
        resized = np.take(image, index[:, 0], axis=axis) * weight[:, 0].reshape(shape)
        for tap in range(1, index.shape[1]):
            resized += np.take(image, index[:, tap], axis=axis) * weight[:, tap].reshape(shape)
        image = resized
    return image


@dataclass
class Prediction:
    score: float
    label: bool
    anomaly_map: np.ndarray | None
    mask: np.ndarray | None


def read_rgb(path: Path) -> np.ndarray:
    """Any readable image as 8-bit RGB (grayscale, palette, RGBA and 16-bit are converted, like anomalib)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        msg = f"{path}: empty file (0 bytes)"
        raise InferenceError(msg)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        msg = f"{path}: not a readable image (corrupt, truncated, or not an image format OpenCV reads)"
        raise InferenceError(msg)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def iter_images(source: Path) -> Iterator[Path]:
    if source.is_file():
        yield source
        return
    if not source.is_dir():
        msg = f"{source}: no such file or folder"
        raise InferenceError(msg)
    found = False
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found = True
            yield path
    if not found:
        msg = f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder"
        raise InferenceError(msg)


OUTPUT_NAMES = ("pred_score", "pred_label", "anomaly_map", "pred_mask")


def output_name_of(output: ov.Output) -> str:
    """The anomalib name of an output (an output may carry several tensor names, e.g. after a reshape)."""
    names = output.get_names()
    return next((name for name in OUTPUT_NAMES if name in names), min(names))


class EdgeModel:
    """A compiled OpenVINO anomaly model; ``precision`` f32 gives the same answers as torch.

    ``mode`` ``sync`` compiles for latency (one request at a time); ``async`` compiles for throughput
    (``PERFORMANCE_HINT: THROUGHPUT``, ``streams`` CPU streams, default OpenVINO's choice) and
    :meth:`requests` says how many requests to keep in flight. ``threads`` caps OpenVINO's CPU threads (0 = all).
    """

    def __init__(
        self,
        model_path: Path,
        device: str = "CPU",
        precision: str = "f32",
        mode: str = "sync",
        streams: int = 0,
        threads: int = 0,
    ) -> None:
        if not model_path.is_file():
            msg = f"{model_path}: model file not found (expected the model.xml written by anomalib export)"
            raise InferenceError(msg)
        core = ov.Core()
        config: dict[str, str] = {"PERFORMANCE_HINT": "THROUGHPUT" if mode == "async" else "LATENCY"}
        if device.upper() == "CPU":
            config["INFERENCE_PRECISION_HINT"] = precision
            if threads:
                config["INFERENCE_NUM_THREADS"] = str(threads)
        if streams:
            config["NUM_STREAMS"] = str(streams)
        try:
            model = core.read_model(str(model_path))
        except RuntimeError as error:
            msg = f"{model_path}: OpenVINO cannot read this model: {error}"
            raise InferenceError(msg) from error
        shape = model.input(0).get_partial_shape()
        self.input_size = (
            (shape[2].get_length(), shape[3].get_length()) if shape[2].is_static and shape[3].is_static else None
        )
        self.model_path = model_path
        self.resize = ResizeRecipe.of(model)
        self._warned = False
        if self.resize.interpolation not in RESIZE_MODES:
            print(
                f"warning: {model_path}: its model resizes with '{self.resize.interpolation}', which this tool does "
                "not reproduce; resizing bilinear (antialiased): scores of images of another size will differ from "
                "torch's",
                file=sys.stderr,
            )
            self.resize = ResizeRecipe(size=self.resize.size, recorded=self.resize.recorded)
        if self.resize.size is not None and self.input_size is not None and self.resize.size != self.input_size:
            height, width = self.resize.size
            print(
                f"warning: {model_path}: the export takes {self.input_size[0]}x{self.input_size[1]} images but its "
                f"model resizes to {height}x{width}, so its scores differ from torch's; export with "
                f'--input_size "[{height},{width}]"',
                file=sys.stderr,
            )
        if self.input_size is not None and shape[0].is_dynamic:
            # one image per request: a static input lets OpenVINO plan every tensor once (faster than dynamic)
            model.reshape({model.input(0): ov.PartialShape([1, shape[1].get_length(), *self.input_size])})
        self.compiled = core.compile_model(model, device, config)
        self.output_names = [output_name_of(output) for output in self.compiled.outputs]

    def requests(self) -> int:
        """How many inference requests the compiled model wants in flight (1 in latency mode)."""
        return max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """The (1, 3, H, W) float input in [0, 1], resized to the model's input size as its pre-processor does in
        torch (on the [0, 1] floats, like anomalib, and not clamped: torch's model sees the overshoot too)."""
        image = rgb.astype(np.float32) / np.float32(255.0)
        if self.input_size is not None and image.shape[:2] != self.input_size:
            if not self.resize.recorded and not self._warned:
                self._warned = True
                print(
                    f"warning: {self.model_path}: the export does not record how its model resizes (anomalib's own "
                    "models, or an older anomalib-ext): resizing bilinear, antialiased (anomalib's default); re-export "
                    "with this anomalib-ext for scores equal to torch's on images of another size",
                    file=sys.stderr,
                )
            image = resize_like_torch(image, self.input_size, self.resize)
        return np.ascontiguousarray(image.transpose(2, 0, 1)[None])

    def decode(self, arrays: list[np.ndarray]) -> Prediction:
        """The model's outputs (in ``output_names`` order) as a :class:`Prediction`."""
        outputs = dict(zip(self.output_names, arrays, strict=True))
        anomaly_map = outputs.get("anomaly_map")
        mask = outputs.get("pred_mask")
        score = float(np.ravel(outputs["pred_score"])[0])
        label = bool(np.ravel(outputs["pred_label"])[0]) if "pred_label" in outputs else score >= 0.5
        return Prediction(
            score=score,
            label=label,
            anomaly_map=None if anomaly_map is None else np.asarray(anomaly_map, np.float32).squeeze(),
            mask=None if mask is None else np.asarray(mask).squeeze().astype(bool),
        )

    def predict(self, rgb: np.ndarray) -> Prediction:
        """One image, synchronously."""
        return self.decode(list(self.compiled(self.prepare(rgb)).to_tuple()))

    def predict_all(self, items: Iterator[tuple[Path, np.ndarray]]) -> Iterator[tuple[Path, np.ndarray, Prediction]]:
        """Every ``(path, rgb)`` through a ring of infer requests run asynchronously; yields in input order.

        No Python callback runs on OpenVINO's threads (an ``AsyncInferQueue`` callback does): its worker threads
        then never need the GIL, so releasing the compiled model cannot deadlock on one of them waiting for it
        (seen at exit: ``~CPUStreamsExecutor`` joining a worker that waited for the GIL the main thread held).
        """
        requests = [self.compiled.create_infer_request() for _ in range(self.requests())]
        in_flight: deque[tuple[ov.InferRequest, Path, np.ndarray]] = deque()

        def collect() -> tuple[Path, np.ndarray, Prediction]:
            request, path_out, rgb_out = in_flight.popleft()
            request.wait()
            # copies: the request's output tensors are reused by the next image it runs
            return path_out, rgb_out, self.decode([np.array(tensor.data) for tensor in request.output_tensors])

        for index, (path, rgb) in enumerate(items):
            if len(in_flight) == len(requests):
                yield collect()
            request = requests[index % len(requests)]  # the oldest one: just collected, or not used yet
            request.start_async(self.prepare(rgb))
            in_flight.append((request, path, rgb))
        while in_flight:
            yield collect()


class Progress:
    """``done/total images, N img/s, M:SS left`` on stderr: redrawn in place on a terminal, a line every
    ``every`` seconds (and at the end) otherwise, so logs stay short."""

    def __init__(self, total: int, enabled: bool = True, every: float = 5.0) -> None:
        self.total, self.enabled, self.every = total, enabled, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        seconds_left = int((self.total - self.done) / rate) if rate > 0 else 0
        left = f"{seconds_left // 60}:{seconds_left % 60:02d}"
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        return f"[{bar}] {self.done}/{self.total} images, {rate:.1f} img/s, {left if rate > 0 else '?'} left"

    def update(self, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            print("\r" + self.line(), end="", file=sys.stderr, flush=True)
        elif now - self.last >= self.every:
            print(self.line(), file=sys.stderr, flush=True)
            self.last = now

    def close(self) -> None:
        if self.enabled:
            print(("\r" if self.tty else "") + self.line(), file=sys.stderr, flush=True)


def overlay(rgb: np.ndarray, prediction: Prediction) -> np.ndarray:
    """Heat map of the anomaly map blended over the image, predicted mask outlined, score written."""
    height, width = rgb.shape[:2]
    canvas = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if prediction.anomaly_map is not None:
        heat = cv2.resize(np.clip(prediction.anomaly_map, 0, 1), (width, height))
        colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
        canvas = cv2.addWeighted(canvas, 0.6, colour, 0.4, 0)
    if prediction.mask is not None and prediction.mask.any():
        mask = cv2.resize(prediction.mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, (255, 255, 255), 1)
    text = f"{'ANOMALY' if prediction.label else 'normal'} {prediction.score:.2f}"
    cv2.putText(canvas, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def output_name(path: Path, source: Path) -> str:
    """Unique, flat file name: the path below the input folder with separators replaced."""
    relative = path.relative_to(source) if source.is_dir() else Path(path.name)
    return "__".join(relative.with_suffix("").parts) + ".png"


def run(
    model_path: Path,
    source: Path,
    output: Path,
    device: str = "CPU",
    precision: str = "f32",
    overwrite: bool = False,
    mode: str = "async",
    streams: int = 0,
    threads: int = 0,
    progress: bool = True,
) -> int:
    """Predict every image; return the number of images that failed."""
    if output.exists() and any(output.iterdir()) and not overwrite:
        msg = f"{output}: folder exists and is not empty; choose another --output or pass --overwrite"
        raise InferenceError(msg)
    model = EdgeModel(model_path, device, precision, mode, streams, threads)
    paths = list(iter_images(source))
    (output / "masks").mkdir(parents=True, exist_ok=True)
    (output / "overlays").mkdir(parents=True, exist_ok=True)
    failures = 0
    meter = Progress(len(paths), progress)
    with (
        (output / "predictions.csv").open("w", newline="") as handle,
        (output / "errors.csv").open("w", newline="") as error_handle,
    ):
        writer, error_writer = csv.writer(handle), csv.writer(error_handle)
        writer.writerow(["image", "score", "label"])
        error_writer.writerow(["image", "error"])

        def readable() -> Iterator[tuple[Path, np.ndarray]]:
            nonlocal failures
            for path in paths:
                try:
                    yield path, read_rgb(path)
                except InferenceError as error:
                    failures += 1
                    error_writer.writerow([str(path), str(error)])
                    print(f"skipped: {error}", file=sys.stderr)
                    meter.update()

        if mode == "async":
            results = model.predict_all(readable())
        else:
            results = ((path, rgb, model.predict(rgb)) for path, rgb in readable())
        for path, rgb, prediction in results:
            name = output_name(path, source)
            writer.writerow([str(path), f"{prediction.score:.6f}", int(prediction.label)])
            handle.flush()
            if prediction.mask is not None:
                cv2.imwrite(str(output / "masks" / name), prediction.mask.astype(np.uint8) * 255)
            cv2.imwrite(str(output / "overlays" / name), overlay(rgb, prediction))
            meter.update()
    meter.close()
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model.xml written by anomalib export")
    parser.add_argument("--input", type=Path, required=True, help="an image or a folder of images (recursive)")
    parser.add_argument("--output", type=Path, required=True, help="folder for predictions.csv, masks, overlays")
    parser.add_argument("--device", default="CPU", help="OpenVINO device: CPU, GPU, NPU, AUTO")
    parser.add_argument(
        "--precision",
        default="f32",
        choices=["f32", "bf16", "f16"],
        help="CPU inference precision; f32 matches torch, bf16 is faster where the CPU has it",
    )
    parser.add_argument(
        "--mode",
        default="async",
        choices=["async", "sync"],
        help="async: OpenVINO throughput mode, several images in flight (default); sync: one at a time",
    )
    parser.add_argument("--streams", type=int, default=0, help="CPU streams in async mode (0 = OpenVINO's choice)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads OpenVINO may use (0 = all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    args = parser.parse_args(argv)
    if args.streams < 0 or args.threads < 0:
        parser.error("--streams and --threads must be >= 0")
    try:
        failures = run(
            args.model,
            args.input,
            args.output,
            args.device,
            args.precision,
            args.overwrite,
            args.mode,
            args.streams,
            args.threads,
            not args.no_progress,
        )
    except InferenceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output / 'predictions.csv'}" + (f" ({failures} unreadable images skipped)" if failures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
