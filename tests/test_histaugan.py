"""HistAuGAN: training reduces reconstruction, the transform keeps structure and changes colour, bad
checkpoints fail clearly, and the transform works as ``train_augmentations`` of an anomalib datamodule.

One tiny GAN (32 px, 8 base channels, two colour domains) is trained once per module and shared.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from lightning import Trainer
from torchvision import tv_tensors

from anomalib_ext.augment.histaugan import (
    HistAuGAN,
    HistAuGANAugment,
    HistAuGANCheckpointError,
    HistAuGANDataModule,
)
from anomalib_ext.augment.histaugan.data import colour_statistics, kmeans
from anomalib_ext.augment.histaugan.figure import structure_similarity_on_edges
from anomalib_ext.data.synthetic import make_mvtec_dataset

IMAGE_SIZE = 32
TRAIN_STEPS = 30
TINT_BGR = np.array([0.5, 0.9, 1.4], np.float32)  # the "tinted" domain: warmer and brighter


@pytest.fixture(scope="module")
def two_domain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train/plain`` and ``train/tinted``: the same synthetic bottles, the second colour-shifted."""
    root = tmp_path_factory.mktemp("histaugan")
    category = make_mvtec_dataset(root / "source", image_size=IMAGE_SIZE, n_train=16, n_test_good=1, defects=())
    for path in sorted((category / "train" / "good").glob("*.png")):
        image = cv2.imread(str(path)).astype(np.float32)
        for domain, styled in (("plain", image), ("tinted", image * TINT_BGR + 30)):
            (root / "train" / domain).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "train" / domain / path.name), np.clip(styled, 0, 255).astype(np.uint8))
    return root / "train"


def _reconstruction_losses(model: HistAuGAN, images: torch.Tensor, domains: torch.Tensor) -> dict[str, float]:
    torch.manual_seed(0)
    with torch.no_grad():
        losses = model.generator_losses(model.translate(images, domains))
    return {name: float(losses[name]) for name in ("reconstruction", "cycle")}


@pytest.fixture(scope="module")
def trained(two_domain_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(0)
    datamodule = HistAuGANDataModule(two_domain_root, image_size=IMAGE_SIZE, batch_size=8, flip=False)
    out_dir = tmp_path_factory.mktemp("histaugan_run")
    model = HistAuGAN(
        num_domains=datamodule.num_domains,
        image_size=IMAGE_SIZE,
        base_channels=8,
        discriminator_channels=8,
        learning_rate=1e-3,
        export_path=str(out_dir / "generator.pt"),
    )
    images = torch.from_numpy(datamodule.images).permute(0, 3, 1, 2).float() / 255
    domains = torch.from_numpy(datamodule.domains)
    before = _reconstruction_losses(model, images, domains)
    trainer = Trainer(
        max_steps=2 * TRAIN_STEPS,  # manual optimisation counts both optimisers' steps
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model, datamodule)
    trainer.save_checkpoint(out_dir / "lightning.ckpt")
    after = _reconstruction_losses(model, images, domains)
    return {
        "datamodule": datamodule,
        "model": model,
        "checkpoint": out_dir / "generator.pt",
        "lightning_checkpoint": out_dir / "lightning.ckpt",
        "before": before,
        "after": after,
    }


def test_datamodule_finds_folder_domains(trained: dict) -> None:
    datamodule = trained["datamodule"]
    assert datamodule.domain_names == ["plain", "tinted"]
    assert np.bincount(datamodule.domains).tolist() == [16, 16]


def test_few_gan_steps_reduce_reconstruction_losses(trained: dict) -> None:
    before, after = trained["before"], trained["after"]
    assert after["reconstruction"] < 0.7 * before["reconstruction"], (before, after)
    assert after["cycle"] < 0.7 * before["cycle"], (before, after)


def test_attribute_statistics_are_fitted(trained: dict) -> None:
    renderer = trained["model"].renderer
    assert not torch.allclose(renderer.attribute_mean, torch.zeros_like(renderer.attribute_mean))
    assert (renderer.attribute_std > 0).all()


def test_transform_keeps_shape_dtype_and_range(trained: dict) -> None:
    augment = HistAuGANAugment(trained["checkpoint"], p=1.0)
    image = torch.rand(3, 48, 40)
    out = augment(image)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, image)

    batch = torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert augment(batch).shape == batch.shape
    gray = torch.rand(1, IMAGE_SIZE, IMAGE_SIZE)
    assert augment(gray).shape == gray.shape
    # a grey image stored as RGB gets no colour cast; a colour one in the same batch keeps its colours
    grey_rgb = torch.stack([gray.expand(3, -1, -1), torch.rand(3, IMAGE_SIZE, IMAGE_SIZE)])
    rendered = augment(grey_rgb)
    assert torch.equal(rendered[0, 0], rendered[0, 1]) and torch.equal(rendered[0, 1], rendered[0, 2])
    assert not torch.equal(rendered[1, 0], rendered[1, 1])
    as_uint8 = (torch.rand(3, IMAGE_SIZE, IMAGE_SIZE) * 255).to(torch.uint8)
    assert augment(as_uint8).dtype == torch.uint8

    # anomalib calls augmentations(image, mask): the image is re-rendered, the mask passes through untouched
    mask = tv_tensors.Mask(torch.ones(48, 40, dtype=torch.uint8))
    out_image, out_mask = augment(tv_tensors.Image(image), mask)
    assert isinstance(out_image, tv_tensors.Image) and out_image.shape == image.shape
    assert isinstance(out_mask, tv_tensors.Mask) and torch.equal(out_mask, mask)

    never = HistAuGANAugment(trained["checkpoint"], p=0.0)
    assert torch.equal(never(image), image)


def test_transform_keeps_structure_and_changes_colour(trained: dict) -> None:
    datamodule = trained["datamodule"]
    plain = torch.from_numpy(datamodule.images[datamodule.domains == 0]).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(0)
    rendered = HistAuGANAugment(trained["checkpoint"], p=1.0, domain=1)(plain)

    edge_ssim = structure_similarity_on_edges(plain, rendered)
    assert edge_ssim > 0.5, f"structure lost on edges: SSIM {edge_ssim:.3f}"

    colour_shift = (rendered.mean(dim=(0, 2, 3)) - plain.mean(dim=(0, 2, 3))).abs().max().item()
    assert colour_shift > 0.05, f"colour statistics barely changed: {colour_shift:.3f}"

    # and the shift goes the right way: the red mean moves most of the way towards the tinted domain's
    tinted = torch.from_numpy(datamodule.images[datamodule.domains == 1]).float() / 255
    red_plain, red_rendered, red_tinted = plain[:, 0].mean(), rendered[:, 0].mean(), tinted[..., 0].mean()
    assert (red_rendered - red_tinted).abs() < 0.5 * (red_plain - red_tinted).abs()


def test_lightning_checkpoint_loads_like_the_export(trained: dict) -> None:
    image = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    domains = torch.tensor([0, 1])
    attributes = torch.randn(2, trained["model"].hparams.attribute_dim)
    from_export = HistAuGANAugment(trained["checkpoint"]).generator.render(image, domains, attributes)
    from_lightning = HistAuGANAugment(trained["lightning_checkpoint"]).generator.render(image, domains, attributes)
    torch.testing.assert_close(from_export, from_lightning)
    assert HistAuGANAugment(trained["lightning_checkpoint"]).domain_names == ["plain", "tinted"]


def test_corrupt_or_wrong_checkpoint_gives_clear_error(trained: dict, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(HistAuGANCheckpointError, match="garbage.pt"):
        HistAuGANAugment(garbage)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained["checkpoint"].read_bytes()[:5000])
    with pytest.raises(HistAuGANCheckpointError, match="truncated.pt"):
        HistAuGANAugment(truncated)

    wrong = tmp_path / "wrong.pt"
    torch.save({"weights": torch.zeros(3)}, wrong)
    with pytest.raises(HistAuGANCheckpointError, match="wrong.pt.*not a HistAuGAN"):
        HistAuGANAugment(wrong)

    mismatched = tmp_path / "mismatched.pt"
    payload = torch.load(trained["checkpoint"], weights_only=True)
    payload["config"]["base_channels"] = 32
    torch.save(payload, mismatched)
    with pytest.raises(HistAuGANCheckpointError, match="mismatched.pt.*does not match"):
        HistAuGANAugment(mismatched)

    with pytest.raises(FileNotFoundError, match="missing.pt"):
        HistAuGANAugment(tmp_path / "missing.pt")


def test_bad_arguments_are_named(trained: dict) -> None:
    with pytest.raises(ValueError, match="p must be"):
        HistAuGANAugment(trained["checkpoint"], p=1.5)
    with pytest.raises(ValueError, match="domain must be in 0..1"):
        HistAuGANAugment(trained["checkpoint"], domain=5)
    with pytest.raises(ValueError, match="shape"):
        HistAuGANAugment(trained["checkpoint"], p=1.0)(torch.rand(5, 8, 8))


def test_works_as_anomalib_train_augmentations(trained: dict, two_domain_root: Path) -> None:
    from anomalib.data import MVTecAD

    mvtec_root = two_domain_root.parent / "source"
    plain = MVTecAD(root=mvtec_root, category="synthetic", train_batch_size=4, num_workers=0)
    plain.setup()
    augmented = MVTecAD(
        root=mvtec_root,
        category="synthetic",
        train_batch_size=4,
        num_workers=0,
        train_augmentations=HistAuGANAugment(trained["checkpoint"], p=1.0),
    )
    augmented.setup()
    original, item = plain.train_data[0], augmented.train_data[0]
    assert item.image.shape == original.image.shape and item.image.dtype == original.image.dtype
    assert not torch.allclose(item.image, original.image)
    assert item.gt_mask is None or not item.gt_mask.any()
    batch = next(iter(augmented.train_dataloader()))
    assert batch.image.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.image.min() >= 0 and batch.image.max() <= 1


def test_colour_clusters_separate_dark_from_bright() -> None:
    rng = np.random.default_rng(0)
    dark = rng.integers(10, 60, (6, 8, 8, 3), dtype=np.uint8)
    bright = rng.integers(180, 250, (6, 8, 8, 3), dtype=np.uint8)
    labels = kmeans(colour_statistics(np.concatenate([dark, bright])), 2)
    assert labels[:6].tolist() == [0] * 6 and labels[6:].tolist() == [1] * 6  # ordered by brightness


def test_domains_from_file_name_regex(tmp_path: Path) -> None:
    for session in ("16_09_21", "25_10_21"):
        for index in range(2):
            cv2.imwrite(str(tmp_path / f"03_{session}_03_{index:03d}.png"), np.zeros((16, 16, 3), np.uint8))
    datamodule = HistAuGANDataModule(tmp_path, image_size=16, domain_regex=r"_(\d\d_\d\d_\d\d)_")
    assert datamodule.domain_names == ["16_09_21", "25_10_21"] and datamodule.num_domains == 2
    with pytest.raises(ValueError, match="does not match file name"):
        HistAuGANDataModule(tmp_path, image_size=16, domain_regex=r"_(\d\d-\d\d)_")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        HistAuGANDataModule(tmp_path / "absent")


def test_anomalib_builtin_model_trains_with_the_augmentation(
    trained: dict, two_domain_root: Path, tmp_path: Path
) -> None:
    """anomalib's own Padim, through Engine: the datamodule appends the model's Resize after our transform."""
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from torchvision.transforms.v2 import Compose

    from anomalib_ext.weights import ensure_pretrained

    calls: list[tuple[int, ...]] = []

    class CountingAugment(HistAuGANAugment):
        def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
            calls.append(tuple(inpt.shape))
            return super().transform(inpt, params)

    ensure_pretrained("tf_efficientnet_lite0")
    model = Padim(
        backbone="tf_efficientnet_lite0",
        layers=["blocks.1", "blocks.2"],
        n_features=20,
        pre_processor=Padim.configure_pre_processor(image_size=(64, 64)),
    )
    datamodule = MVTecAD(
        root=two_domain_root.parent / "source",
        category="synthetic",
        train_batch_size=8,
        eval_batch_size=8,
        num_workers=0,
        train_augmentations=CountingAugment(trained["checkpoint"], p=1.0),
    )
    engine = Engine(max_epochs=1, accelerator="cpu", logger=False, default_root_dir=tmp_path)
    engine.fit(model=model, datamodule=datamodule)
    assert isinstance(datamodule.train_data.augmentations, Compose)
    assert len(calls) >= 16 and set(calls) == {(3, IMAGE_SIZE, IMAGE_SIZE)}


def test_cli_fit_exports_a_loadable_generator(
    two_domain_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m anomalib_ext.augment.histaugan fit --config ...``, in-process; domains come from folders."""
    from anomalib_ext.augment.histaugan.__main__ import main

    monkeypatch.setattr("sys.argv", ["histaugan"])  # pytest's own arguments are not the CLI's

    config = Path(__file__).resolve().parents[1] / "configs" / "histaugan" / "synthetic.yaml"
    export = tmp_path / "generator.pt"
    main(
        [
            "fit",
            "--config",
            str(config),
            "--data.root",
            str(two_domain_root),
            "--data.num_domains",
            "null",
            "--data.domain_source",
            "auto",
            "--trainer.max_steps",
            "4",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.export_path",
            str(export),
        ]
    )
    augment = HistAuGANAugment(export)
    assert augment.domain_names == ["plain", "tinted"]
    assert augment.image_size == IMAGE_SIZE


def test_trains_on_two_processes_with_statistics_from_both(two_domain_root: Path, tmp_path: Path) -> None:
    """``--trainer.devices 2 --trainer.strategy ddp_spawn`` (gloo on CPU): each optimiser step leaves the other
    networks' parameters unused, which DDP refuses unless told; the domains' attribute statistics are summed over
    both ranks before they are fitted, and rank 0 exports the generator."""
    import subprocess
    import sys

    config = Path(__file__).resolve().parents[1] / "configs" / "histaugan" / "synthetic.yaml"
    export = tmp_path / "generator.pt"
    command = [sys.executable, "-m", "anomalib_ext.augment.histaugan", "fit", "--config", str(config)]
    command += ["--data.root", str(two_domain_root), "--data.num_domains", "null", "--data.domain_source", "auto"]
    command += ["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn", "--trainer.max_steps", "4"]
    command += ["--trainer.max_time", "null", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    command += ["--trainer.default_root_dir", str(tmp_path), "--model.export_path", str(export)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # noqa: S603
    assert done.returncode == 0, done.stderr[-3000:]
    augment = HistAuGANAugment(export)
    assert augment.domain_names == ["plain", "tinted"]
    statistics = torch.load(export, map_location="cpu", weights_only=False)
    state = statistics.get("state_dict", statistics)
    stds = [value for key, value in state.items() if key.endswith("attribute_std")]
    assert stds and all(bool((std != 1).any()) for std in stds)  # fitted from the training images, not the init


def test_progress_bar_names_the_time_budget(two_domain_root: Path, tmp_path: Path) -> None:
    """With ``max_time`` and a huge ``max_epochs`` (the configs), the bar says when the run ends, not 'of 1000'."""
    from anomalib_ext.augment.histaugan.progress import TimeBudgetRichProgressBar, budget_description

    datamodule = HistAuGANDataModule(two_domain_root, image_size=IMAGE_SIZE, batch_size=8, flip=False)
    model = HistAuGAN(
        num_domains=datamodule.num_domains,
        image_size=IMAGE_SIZE,
        base_channels=8,
        discriminator_channels=8,
        export_path=str(tmp_path / "generator.pt"),
    )
    trainer = Trainer(
        max_epochs=1000,
        max_time={"minutes": 10},
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule)
    assert type(trainer.progress_bar_callback) is TimeBudgetRichProgressBar  # Lightning's default bar is rich's
    description = budget_description(trainer)
    assert description.startswith(f"Epoch {trainer.current_epoch} · ")
    # which limit ends the run depends on how fast the epochs were; the budget is named either way
    assert " of 10:00 · " in description and description.endswith(("(max_time)", "(max_epochs)")), description
    plain = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    assert budget_description(plain) == "Epoch 0"  # no budget: nothing invented


def _write_domain(folder: Path, count: int, grey_level: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = np.clip(grey_level + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{index:03d}.png"), image)


def test_sampler_draws_domains_uniformly_when_one_is_ten_times_smaller(tmp_path: Path) -> None:
    """100 images in ``big``, 10 in ``small``: balanced sampling draws each domain about half the time; sampling
    images (the old behaviour, still ``domain_balanced=False``) draws ``small`` about one time in eleven."""
    rng = np.random.default_rng(0)
    _write_domain(tmp_path / "big", 100, 80, rng)
    _write_domain(tmp_path / "small", 10, 180, rng)

    def small_share(**options: object) -> float:
        datamodule = HistAuGANDataModule(tmp_path, image_size=16, batch_size=10, check_images=0, **options)
        draws = torch.cat([batch["domain"] for _ in range(20) for batch in datamodule.train_dataloader()])
        assert len(draws) >= 2000
        return (draws == datamodule.domain_names.index("small")).float().mean().item()

    balanced = small_share()
    assert 0.45 < balanced < 0.55, balanced
    assert small_share(seed=1) != balanced  # seeded: another seed, another draw
    assert small_share() == balanced  # and the same seed, the same draw
    assert small_share(domain_balanced=False) < 0.15


def test_check_images_are_held_out_per_domain(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _write_domain(tmp_path / "big", 100, 80, rng)
    _write_domain(tmp_path / "small", 10, 180, rng)
    datamodule = HistAuGANDataModule(tmp_path, image_size=16, check_images=16)
    held = datamodule.check_mask
    assert np.bincount(datamodule.domains[held]).tolist() == [16, 2]  # a quarter at most of the small domain
    datamodule.setup()
    assert len(datamodule.train_dataset) == 110 - 18
    # with max_images, the images the cap leaves out are held first: the training set keeps all it loaded
    capped = HistAuGANDataModule(tmp_path, image_size=16, check_images=4, max_images=60)
    capped.setup()
    assert len(capped.train_dataset) == 60 and len(capped.check_paths) >= 4
    assert not set(capped.check_paths) & set(capped.image_paths)
    assert np.bincount(capped.domains[capped.check_mask]).tolist() == [4, 4]


def _fit_cli(config_root: Path, tmp_path: Path, export: Path, extra: list[str]) -> None:
    from anomalib_ext.augment.histaugan.__main__ import main

    config = Path(__file__).resolve().parents[1] / "configs" / "histaugan" / "synthetic.yaml"
    arguments = ["fit", "--config", str(config), "--data.root", str(config_root), "--data.num_domains", "null"]
    arguments += ["--data.domain_source", "auto", "--trainer.logger", "false", "--trainer.enable_checkpointing"]
    arguments += ["false", "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    main([*arguments, "--model.export_path", str(export), *extra])


def test_training_command_checks_every_domain_style_and_warns_when_off(
    two_domain_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Two steps leave the generator far from the tinted style: the command prints a warning for the domain
    that is off and writes ``<checkpoint>.domain_stats.json`` with every domain; with a tolerance no rendering
    can miss, the same check passes silently and ``stop_at_style_match`` ends the run at its first check."""
    import json

    monkeypatch.setattr("sys.argv", ["histaugan"])
    export = tmp_path / "generator.pt"
    _fit_cli(two_domain_root, tmp_path, export, ["--trainer.max_steps", "4", "--model.style_check_every_n_steps", "1"])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "generator.pt.domain_stats.json").read_text())
    assert set(report["domains"]) == {"plain", "tinted"}
    for entry in report["domains"].values():
        assert entry["rendered"]["sources"] == 4 and entry["real"]["images"] == 16
        assert {"mean_intensity", "contrast", "channel_means"} <= set(entry["difference"])
    off = [name for name, entry in report["domains"].items() if not entry["within_tolerance"]]
    assert off, report  # an almost untrained generator cannot match a 2-grey-level tolerance
    for name in off:
        assert f"WARNING: HistAuGAN renders domain '{name}'" in printed
    assert "style check, step 1:" in printed and "style check written to" in printed
    assert report["samples_per_domain"] and sum(report["samples_per_domain"].values()) == 2 * 8

    # a tolerance no rendering can miss: no warning, and the stopping rule ends the run at the first check
    lenient = tmp_path / "lenient.pt"
    extra = ["--trainer.max_steps", "20", "--model.style_tolerance", "255", "--model.style_check_every_n_steps", "2"]
    _fit_cli(two_domain_root, tmp_path, lenient, [*extra, "--model.stop_at_style_match", "true"])
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "lenient.pt.domain_stats.json").read_text())
    assert report["all_within_tolerance"] and report["training_steps"] == 2, report["training_steps"]
    assert "WARNING" not in printed and "within tolerance at step 2: stopping" in printed


def test_style_check_measures_renderings_against_each_domain() -> None:
    """A renderer that paints every image the target domain's exact grey passes; one that returns its input fails
    by the gap between the domains."""
    from anomalib_ext.augment.histaugan.style_check import check_domain_styles, warning_lines

    images = np.concatenate([np.full((8, 8, 8, 3), 60, np.uint8), np.full((8, 8, 8, 3), 180, np.uint8)])
    domains = np.repeat([0, 1], 8)
    held = np.zeros(16, dtype=bool)
    held[[0, 1, 8, 9]] = True
    levels = torch.tensor([60, 180]) / 255

    def perfect(batch: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return levels[targets][:, None, None, None].expand_as(batch).clone()

    report = check_domain_styles(perfect, images, domains, held, ["dark", "bright"])
    assert report["all_within_tolerance"] and report["max_abs_mean_intensity_difference"] < 0.01
    assert report["domains"]["dark"]["expected_mean_intensity"] == pytest.approx(60, abs=0.01)
    assert not report["colour"] and "channel_means" not in report["domains"]["dark"]["real"]

    identity = check_domain_styles(lambda batch, _: batch, images, domains, held, ["dark", "bright"])
    assert identity["domains"]["dark"]["difference"]["mean_intensity"] == pytest.approx(120, abs=0.01)
    assert identity["domains"]["bright"]["difference"]["mean_intensity"] == pytest.approx(-120, abs=0.01)
    assert len(warning_lines(identity)) == 2
