"""Does a trained HistAuGAN render each domain's style? Renderings into a domain against its real images.

For every domain ``d``: the held-out images of the *other* domains are re-rendered into ``d`` and their
statistics are compared with those of ``d``'s real images (all of them, at the training size):

- mean intensity: the mean of the grey level (channel mean), 0-255;
- contrast: the standard deviation of the grey level within an image, averaged over images, 0-255;
- colour: the mean of each channel, 0-255 (only when the data have colour; grey data stored as RGB do not).

A domain is *within tolerance* when every difference is at most ``tolerance`` grey levels (default 2, the
goal the dice lighting study sets: its sessions differ by about 12). The sources' own mean intensity is kept
too, so a report shows how far the rendering had to move and how far it moved.

The sources' content differs from the domain's (on dice, the classes' mean grey spans 45 levels, so 48 sources
carry about 1.7 levels of noise from their class mix alone). ``expected_mean_intensity`` removes it: each source's
own intensity moved by the gap between its domain's real mean and the target's. The tolerance is judged on the
plain comparison with the real images; the expected one says how much of a miss is the sources' content.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_TOLERANCE = 2.0  # grey levels (0-255)
RENDER_BATCH = 64

Renderer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (N, 3, H, W) in [0, 1], (N,) -> same shape


def stats_path(checkpoint: str | Path) -> Path:
    """Where the check is written: beside the checkpoint, ``<checkpoint>.domain_stats.json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".domain_stats.json")


def image_statistics(images: torch.Tensor, colour: bool) -> dict[str, Any]:
    """Mean intensity, contrast and (with ``colour``) per-channel means of a float (N, 3, H, W) batch, 0-255."""
    grey = images.mean(dim=1)
    statistics: dict[str, Any] = {
        "mean_intensity": round(grey.mean().item() * 255, 2),
        "contrast": round(grey.flatten(1).std(dim=1).mean().item() * 255, 2),
    }
    if colour:
        statistics["channel_means"] = [round(value * 255, 2) for value in images.mean(dim=(0, 2, 3)).tolist()]
    return statistics


def _differences(rendered: dict[str, Any], real: dict[str, Any]) -> dict[str, Any]:
    differences: dict[str, Any] = {key: round(rendered[key] - real[key], 2) for key in ("mean_intensity", "contrast")}
    if "channel_means" in real:
        differences["channel_means"] = [
            round(a - b, 2) for a, b in zip(rendered["channel_means"], real["channel_means"], strict=True)
        ]
    return differences


def _largest(differences: dict[str, Any]) -> float:
    values = [abs(differences["mean_intensity"]), abs(differences["contrast"])]
    values += [abs(value) for value in differences.get("channel_means", [])]
    return max(values)


@torch.no_grad()
def check_domain_styles(
    render: Renderer,
    images: np.ndarray,
    domains: np.ndarray,
    held: np.ndarray,
    domain_names: list[str],
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> dict[str, Any]:
    """Render the held images of the other domains into each domain and compare with its real images.

    Args:
        render: re-renders a float (N, 3, H, W) batch in [0, 1] into the given domains.
        images: every image, (N, H, W, 3) uint8 RGB at the training size.
        domains: domain index per image.
        held: True for the images held out of training (the sources); when none are, every image is a source.
        domain_names: one name per domain index.
        tolerance: the largest difference, in grey levels, that still counts as the domain's style.
        seed: seed of the attribute draws, so a report is reproducible.
    """
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    colour = bool((images.max(axis=-1) != images.min(axis=-1)).any())
    sources_mask = held if held.any() else np.ones(len(images), dtype=bool)
    report: dict[str, Any] = {"tolerance_grey_levels": tolerance, "colour": colour, "domains": {}}
    grey_means = tensors.mean(dim=(1, 2, 3)).numpy() * 255
    domain_means = np.array(
        [
            grey_means[domains == index].mean() if (domains == index).any() else np.nan
            for index in range(len(domain_names))
        ]
    )
    for index, name in enumerate(domain_names):
        real_images = tensors[torch.from_numpy(domains == index)]
        others = sources_mask & (domains != index)
        if not others.any():  # a single domain: its own held images are all there is to re-render
            others = sources_mask & (domains == index)
        if len(real_images) == 0 or not others.any():
            report["domains"][name] = {"skipped": "no images"}
            continue
        sources = tensors[torch.from_numpy(others)]
        with torch.random.fork_rng():
            torch.manual_seed(seed + index)
            rendered = torch.cat(
                [
                    render(batch, torch.full((len(batch),), index, dtype=torch.long))
                    for batch in sources.split(RENDER_BATCH)
                ]
            )
        real = {**image_statistics(real_images, colour), "images": len(real_images)}
        rendered_statistics = {**image_statistics(rendered, colour), "sources": len(sources)}
        differences = _differences(rendered_statistics, real)
        expected = float(np.mean(grey_means[others] + domain_means[index] - domain_means[domains[others]]))
        report["domains"][name] = {
            "real": real,
            "rendered": rendered_statistics,
            "sources_mean_intensity": image_statistics(sources, colour=False)["mean_intensity"],
            "expected_mean_intensity": round(expected, 2),
            "mean_intensity_difference_from_expected": round(rendered_statistics["mean_intensity"] - expected, 2),
            "difference": differences,
            "within_tolerance": _largest(differences) <= tolerance,
        }
    checked = [entry for entry in report["domains"].values() if "within_tolerance" in entry]
    report["all_within_tolerance"] = all(entry["within_tolerance"] for entry in checked)
    report["max_abs_mean_intensity_difference"] = max(
        (abs(entry["difference"]["mean_intensity"]) for entry in checked), default=0.0
    )
    return report


def report_lines(report: dict[str, Any]) -> list[str]:
    """A small table, one row per domain (grey levels, 0-255)."""
    lines = [
        f"HistAuGAN style check (renderings of other domains' held images vs the domain's real images; "
        f"tolerance {report['tolerance_grey_levels']:g} grey levels):",
        f"{'domain':>14} {'sources':>8} {'rendered':>9} {'real':>7} {'diff':>6} {'vs expected':>11} | "
        f"{'contrast':>8} {'real':>6} {'diff':>6} | ok",
    ]
    for name, entry in report["domains"].items():
        if "skipped" in entry:
            lines.append(f"{name:>14} skipped: {entry['skipped']}")
            continue
        rendered, real, difference = entry["rendered"], entry["real"], entry["difference"]
        row = (
            f"{name:>14} {entry['sources_mean_intensity']:8.1f} {rendered['mean_intensity']:9.1f} "
            f"{real['mean_intensity']:7.1f} {difference['mean_intensity']:+6.1f} "
            f"{entry['mean_intensity_difference_from_expected']:+11.1f} | {rendered['contrast']:8.1f} "
            f"{real['contrast']:6.1f} {difference['contrast']:+6.1f} | {'yes' if entry['within_tolerance'] else 'NO'}"
        )
        if "channel_means" in difference:
            row += " | channel diffs " + " ".join(f"{value:+.1f}" for value in difference["channel_means"])
        lines.append(row)
    return lines


def warning_lines(report: dict[str, Any], checkpoint: str | Path | None = None) -> list[str]:
    """One line per domain whose renderings are off, naming what is off and by how much."""
    where = f" ({checkpoint})" if checkpoint is not None else ""
    lines = []
    for name, entry in report["domains"].items():
        if entry.get("within_tolerance", True):
            continue
        difference = entry["difference"]
        parts = [f"mean intensity {difference['mean_intensity']:+.1f}", f"contrast {difference['contrast']:+.1f}"]
        if "channel_means" in difference:
            parts.append("channel means " + "/".join(f"{value:+.1f}" for value in difference["channel_means"]))
        lines.append(
            f"WARNING: HistAuGAN renders domain '{name}' off its real images by {', '.join(parts)} grey levels "
            f"(tolerance {report['tolerance_grey_levels']:g}){where}: train longer or check this domain's data"
        )
    return lines


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
