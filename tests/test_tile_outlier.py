"""TileOutlier beyond the shared harness: tile geometry, bank caps, coreset, and where a planted defect lands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalib_ext.models.components.sampling import (
    ReservoirSampler,
    greedy_coreset_indices,
    grouped_greedy_coreset_indices,
)
from anomalib_ext.models.components.tiling import TileGrid, paint_tile_scores, painting_operators


def _torch_model(**options):
    """``TileOutlierModel`` with ``TileOutlier``'s defaults (declared there only).

    ``options``: ``TileOutlier`` arguments or keys of its settings groups (``tile_size``, ``num_neighbors``, ...).
    """
    from dataclasses import fields

    from anomalib_ext.models import TileOutlier
    from anomalib_ext.models.tile_outlier import MemoryBankSettings, SearchSettings, TilingSettings

    groups = {"tiling": TilingSettings, "search": SearchSettings, "memory_bank": MemoryBankSettings}
    grouped = {
        name: {key: options.pop(key) for key in [field.name for field in fields(kind)] if key in options}
        for name, kind in groups.items()
    }
    return TileOutlier(**grouped, **options, visualizer=False).model


# ------------------------------------------------------------------------------------------------ tiling
@pytest.mark.parametrize(
    ("grid", "size"),
    [
        (lambda size: TileGrid.from_num_parts(size, 3), (100, 100)),
        (lambda size: TileGrid.from_num_parts(size, 7), (250, 123)),
        (lambda size: TileGrid.from_tile_size(size, 32, 24), (100, 77)),
        (lambda size: TileGrid.from_tile_size(size, 30, 7), (256, 256)),
    ],
)
def test_tiles_cover_the_whole_image_for_sizes_not_divisible(grid, size: tuple[int, int]) -> None:
    tiles = grid(size)
    covered = np.zeros(size, dtype=int)
    for y0, x0, y1, x1 in tiles.boxes().tolist():
        assert 0 <= y0 < y1 <= size[0]
        assert 0 <= x0 < x1 <= size[1]
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1, "some pixels belong to no tile"
    # painting a constant score back gives that constant everywhere, i.e. coverage counts are right
    painted = paint_tile_scores(torch.full((1, *tiles.shape), 0.7), *painting_operators(tiles))
    assert painted.shape == (1, *size)
    torch.testing.assert_close(painted, torch.full_like(painted, 0.7))


@pytest.mark.parametrize("size", [(64, 64), (100, 72)])
def test_blur_folded_into_painting_equals_painting_then_blurring(size: tuple[int, int]) -> None:
    """The TileOutlier map is painted and smoothed by two matrices: the same map as painting, then blurring."""
    from anomalib_ext.models.components import GaussianBlur

    tiles = TileGrid.from_tile_size(size, 16, 8)
    blur = GaussianBlur(4.0, truncate=4.0)
    scores = torch.rand(2, *tiles.shape)
    painted_then_blurred = blur(paint_tile_scores(scores, *painting_operators(tiles)).unsqueeze(1)).squeeze(1)
    folded = paint_tile_scores(scores, *painting_operators(tiles, blur))
    torch.testing.assert_close(folded, painted_then_blurred, atol=1e-6, rtol=0)


def test_num_parts_tiles_do_not_overlap_and_differ_by_at_most_one_pixel() -> None:
    tiles = TileGrid.from_num_parts((100, 101), 3)
    heights = [end - start for start, end in tiles.row_bands]
    widths = [end - start for start, end in tiles.col_bands]
    assert sum(heights) == 100
    assert sum(widths) == 101
    assert max(heights) - min(heights) <= 1
    assert max(widths) - min(widths) <= 1


def test_pooling_matrices_average_over_the_tile_area() -> None:
    tiles = TileGrid.from_tile_size((64, 64), 16, 8)
    row_pool, col_pool = tiles.pooling_matrices((8, 8))  # a /8 feature map
    torch.testing.assert_close(row_pool.sum(1), torch.ones(tiles.shape[0]))
    feature = torch.zeros(1, 1, 8, 8)
    feature[..., 3, 5] = 1.0  # one feature cell = pixels 24..32 x 40..48
    pooled = (row_pool @ feature @ col_pool.T)[0, 0]
    assert pooled.max() == pytest.approx(0.25)  # a 16 px tile holds 2 x 2 cells of 8 px
    rows, cols = torch.nonzero(pooled).T.tolist()
    for row, col in zip(rows, cols, strict=True):
        (y0, y1), (x0, x1) = tiles.row_bands[row], tiles.col_bands[col]
        assert y0 < 32 and y1 > 24 and x0 < 48 and x1 > 40


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"num_parts": 300}, "num_parts"),
        ({"tile_size": 40, "stride": 50}, "stride"),
        ({"num_parts": 4, "tile_size": 16}, "exactly one"),
        ({"embed": "sift"}, "embed"),
        ({"num_neighbors": 0}, "num_neighbors"),
    ],
)
def test_bad_parameters_are_named_in_the_error(kwargs: dict, word: str) -> None:
    arguments = {"image_size": (64, 64), "pre_trained": False, "tile_size": 16, "stride": 8}
    if "num_parts" in kwargs:
        arguments.update(tile_size=None, stride=None)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=word):
        _torch_model(**arguments)


def test_a_misspelt_settings_key_is_named_in_the_error() -> None:
    from anomalib_ext.models import TileOutlier

    with pytest.raises(ValueError, match=r"TilingSettings: unknown keys \['tile_sise'\]"):
        TileOutlier(tiling={"tile_sise": 16}, pre_trained=False)


# ---------------------------------------------------------------------------------------- memory bank
def test_greedy_coreset_covers_better_than_a_random_subset() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 16, generator=generator) * 10
    points = centres.repeat_interleave(200, 0) + torch.randn(4000, 16, generator=generator)
    picked = greedy_coreset_indices(points, 40, group_size=100_000)
    assert picked.unique().numel() == 40

    def covering_radius(indices: torch.Tensor) -> float:
        return torch.cdist(points, points[indices]).min(1).values.max().item()

    random_subset = torch.randperm(4000, generator=generator)[:40]
    assert covering_radius(picked) < 0.6 * covering_radius(random_subset)
    # every one of the 20 clusters gets a centre
    assert (picked // 200).unique().numel() == 20


def test_grouped_coreset_picks_within_each_group() -> None:
    embeddings = torch.randn(5, 50, 8)
    picked = grouped_greedy_coreset_indices(embeddings, 10)
    assert picked.shape == (5, 10)
    assert all(row.unique().numel() == 10 for row in picked)
    assert grouped_greedy_coreset_indices(embeddings, 80).shape == (5, 50)  # fewer points than asked: all


def test_large_sets_are_split_into_groups_and_still_give_unique_indices() -> None:
    points = torch.randn(10_000, 32)
    picked = greedy_coreset_indices(points, 300, group_size=1000)
    assert picked.numel() == 300
    assert picked.unique().numel() == 300


def test_reservoir_keeps_at_most_its_capacity_and_samples_uniformly() -> None:
    reservoir = ReservoirSampler(capacity=100, seed=0)
    for start in range(0, 10_000, 50):
        reservoir.add(torch.arange(start, start + 50).float()[:, None])
    kept = reservoir.samples()
    assert kept.shape == (100, 1)
    assert reservoir.seen == 10_000
    assert kept.unique().numel() == 100
    assert 3000 < kept.mean().item() < 7000  # not just the first or last batches


def test_reservoir_sample_does_not_depend_on_the_stream_order() -> None:
    items = torch.randn(1_000, 4)
    samples = []
    for order in (torch.arange(1_000), torch.randperm(1_000, generator=torch.Generator().manual_seed(0))):
        reservoir = ReservoirSampler(capacity=50, seed=3)
        for chunk in order.split(37):
            reservoir.add(items[chunk])
        samples.append(reservoir.samples())
    torch.testing.assert_close(samples[0], samples[1])
    at_once = ReservoirSampler(capacity=50, seed=3)
    at_once.add(items)
    torch.testing.assert_close(at_once.samples(), samples[0])
    other_seed = ReservoirSampler(capacity=50, seed=4)
    other_seed.add(items)
    assert not torch.equal(other_seed.samples(), samples[0])


@pytest.mark.parametrize("position_aware", [True, False])
def test_bank_cap_is_respected(position_aware: bool) -> None:
    model = _torch_model(
        image_size=(64, 64),
        tile_size=16,
        stride=8,
        pre_trained=False,
        position_aware=position_aware,
        max_tiles=200,
    )
    rows, cols = model.grid.shape
    embeddings = torch.nn.functional.normalize(torch.randn(40, rows, cols, 12), dim=-1)
    model.fit(embeddings)
    assert 0 < model.bank_tiles <= 200
    model.eval()
    # a tile equal to a bank tile (at its own position) scores 0
    if position_aware:
        pad = model.neighborhood
        query = model.memory_bank[pad : pad + rows, pad : pad + cols, 0][None]
    else:
        query = model.memory_bank[0].expand(1, rows, cols, -1)
    assert model.tile_scores(query).abs().max() < 1e-5


def test_lightning_reservoir_caps_fit_memory() -> None:
    from anomalib_ext.models import TileOutlier

    model = TileOutlier(
        image_size=64,
        tiling={"tile_size": 16, "stride": 16},
        pre_trained=False,
        memory_bank={"max_fit_tiles": 160},
        visualizer=False,
    )
    assert model.model.grid.num_tiles == 16
    for _ in range(5):
        model._reservoir.add(torch.randn(8, 4, 4, 12))
    assert model._reservoir.samples().shape[0] == 10  # 160 tiles / 16 per image


# ----------------------------------------------------------------------------------- planted defect
@pytest.fixture(scope="module")
def fitted_tile_model(tmp_path_factory: pytest.TempPathFactory):
    """A 4 x 4 grid model fitted on synthetic normal bottles, plus the defective test images and masks."""
    from anomalib.data.utils import read_image, read_mask

    from anomalib_ext.data.synthetic import make_mvtec_dataset

    root = tmp_path_factory.mktemp("tiles")
    category = make_mvtec_dataset(root, image_size=128, n_train=24, n_test_good=2, n_test_per_defect=3, seed=3)
    model = _torch_model(image_size=(128, 128), num_parts=4, tile_size=None, stride=None).eval()

    def load(paths: list) -> torch.Tensor:  # raw [0, 1] images: the model normalises them for its backbone
        return torch.stack([read_image(path, as_tensor=True) for path in paths])

    with torch.no_grad():
        model.fit(model.embed(load(sorted((category / "train" / "good").glob("*.png")))))
    defective = sorted(path for path in (category / "test").glob("*/*.png") if path.parent.name != "good")
    masks = [
        read_mask(category / "ground_truth" / path.parent.name / f"{path.stem}_mask.png", as_tensor=True)
        for path in defective
    ]
    return model, load(defective), torch.stack(masks).float()


def test_planted_defect_lands_in_the_top_tile(fitted_tile_model) -> None:
    model, images, masks = fitted_tile_model
    with torch.no_grad():
        scores = model.tile_scores(model.embed(images)).flatten(1)  # (N, 16)
    boxes = model.grid.boxes()
    defect_pixels = torch.stack([masks[:, y0:y1, x0:x1].sum((1, 2)) for y0, x0, y1, x1 in boxes.tolist()], 1)
    top_tile = scores.argmax(1)
    hits = (defect_pixels.gather(1, top_tile[:, None]).squeeze(1) > 0).float()
    assert hits.mean() >= 0.9, f"top tile holds the defect in only {hits.mean():.0%} of images"
