"""HistAuGAN as a LightningModule: DRIT++ / MDMM training with two optimisers (manual optimisation).

Each batch is paired with itself rolled by one, so every image is both the content source and the
attribute source of a translation. One step = one discriminator update, then one encoder/generator update.
At the end of every epoch the per-domain attribute statistics (mean and spread of the attribute means seen
in that epoch) are written into the generator's buffers. At the end of fit they are fitted once more from
every training image with the final encoder (the per-epoch ones mix encoders of different ages), the small
generator checkpoint that ``HistAuGANAugment`` loads is exported, and the style check
(``style_check.check_domain_styles``) is printed and written beside it as ``<checkpoint>.domain_stats.json``.

Budget and stopping rule: ``max_time`` (or ``max_steps``) ends the run. ``min_samples_per_domain`` is the floor a
domain's style needs (each draw of a domain is one sample; with domain-balanced sampling every domain gets
``steps x batch_size / num_domains``); a run that ends below it says so. With ``style_check_every_n_steps`` the
check also runs during training (printed and logged as ``style/*``), and ``stop_at_style_match`` ends the run at
the first check that has every domain within ``style_tolerance`` once the floor is reached.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from .checkpoint import save_generator
from .losses import (
    adversarial_loss,
    content_confusion_loss,
    domain_classification_loss,
    kl_loss,
    reconstruction_loss,
    reparameterize,
)
from .networks import ContentDiscriminator, HistAuGANGenerator, ImageDiscriminator
from .progress import time_budget_bar
from .style_check import DEFAULT_TOLERANCE, check_domain_styles, report_lines, stats_path, warning_lines, write_report
from .transform import HistAuGANAugment, keep_grey

logger = logging.getLogger(__name__)

EXPORT_FILE_NAME = "histaugan_generator.pt"


class HistAuGAN(LightningModule):
    """Multi-domain disentangled image-to-image GAN for style (stain, lighting) augmentation.

    Args:
        num_domains: number of styles; linked from the datamodule by the CLI.
        image_channels: 3 (grayscale data is read as 3 equal channels).
        image_size: training side length, stored in the export so the transform knows its working size.
        base_channels: width of encoders and generator (16 trains at 64 px in minutes on 2 CPU cores).
        attribute_dim: length of the attribute (style) vector.
        num_residual_blocks: residual blocks in the content encoder and the generator.
        style_dim: width of the generator's style MLP.
        discriminator_channels: width of the first discriminator layer.
        learning_rate: Adam learning rate of both optimisers.
        lambda_*: loss weights (DRIT++ defaults scaled for small CPU batches).
        export_path: where the generator checkpoint goes at the end of fit; default
            ``<trainer log dir>/histaugan_generator.pt``.
        style_tolerance: grey levels (0-255) a rendering's mean intensity, contrast and channel means may be off
            the target domain's real images before the style check warns (2: the dice lighting goal).
        style_check_every_n_steps: also run the style check every so many training steps (0: only after fit).
        min_samples_per_domain: samples each domain needs before its style counts as trained; fewer at the end
            of the run gives a warning, and ``stop_at_style_match`` never stops below it.
        stop_at_style_match: end training at the first in-training check with every domain within tolerance.
    """

    def __init__(
        self,
        num_domains: int = 1,
        image_channels: int = 3,
        image_size: int = 64,
        base_channels: int = 16,
        attribute_dim: int = 8,
        num_residual_blocks: int = 2,
        style_dim: int = 64,
        discriminator_channels: int = 16,
        learning_rate: float = 2e-4,
        lambda_adversarial: float = 1.0,
        lambda_domain: float = 1.0,
        lambda_reconstruction: float = 10.0,
        lambda_cycle: float = 10.0,
        lambda_kl: float = 0.01,
        lambda_latent: float = 10.0,
        lambda_content: float = 1.0,
        export_path: str | None = None,
        style_tolerance: float = DEFAULT_TOLERANCE,
        style_check_every_n_steps: int = 0,
        min_samples_per_domain: int = 0,
        stop_at_style_match: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.renderer = HistAuGANGenerator(
            num_domains, image_channels, base_channels, attribute_dim, num_residual_blocks, style_dim
        )
        self.image_discriminator = ImageDiscriminator(image_channels, num_domains, discriminator_channels)
        self.content_discriminator = ContentDiscriminator(4 * base_channels, num_domains)
        self.domain_names = [f"domain{index}" for index in range(num_domains)]
        self._reset_attribute_accumulators()
        self.domain_samples = torch.zeros(num_domains, dtype=torch.long)  # draws of each domain over the whole fit
        self._training_batches = 0
        self.style_report: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        del stage
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy):  # each optimiser step leaves the other networks unused: tell DDP
            strategy._ddp_kwargs.setdefault("find_unused_parameters", True)  # noqa: SLF001  (no public setter)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "domain_names", None)
        if datamodule is not None and hasattr(datamodule, "images"):
            datamodule.images  # noqa: B018  (loads images and fixes cluster domains before names are read)
            names = datamodule.domain_names
        if names:
            if len(names) != self.hparams.num_domains:
                msg = f"the datamodule has {len(names)} domains but the model was built for {self.hparams.num_domains}"
                raise ValueError(msg)
            self.domain_names = list(names)

    def configure_callbacks(self) -> list[Callback]:
        """Replace Lightning's bar with one that names the ``max_time`` budget (configs end on time, not epochs)."""
        bar = time_budget_bar(self._trainer.progress_bar_callback if self._trainer is not None else None)
        return [bar] if bar is not None else []

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        generator_optimizer = torch.optim.Adam(self.renderer.parameters(), self.hparams.learning_rate, betas=betas)
        discriminator_parameters = [*self.image_discriminator.parameters(), *self.content_discriminator.parameters()]
        discriminator_optimizer = torch.optim.Adam(discriminator_parameters, self.hparams.learning_rate, betas=betas)
        return [generator_optimizer, discriminator_optimizer]

    # ---------------------------------------------------------------------------------------------- losses
    def translate(self, images: torch.Tensor, domains: torch.Tensor) -> dict[str, torch.Tensor]:
        """One DRIT++ forward pass over a batch paired with itself rolled by one."""
        net = self.renderer
        partner_images, partner_domains = images.roll(1, 0), domains.roll(1, 0)
        onehot, partner_onehot = net.onehot(domains), net.onehot(partner_domains)

        content = net.content_encoder(images)
        mean, logvar = net.attribute_encoder(images, onehot)
        attribute = reparameterize(mean, logvar)
        partner_content, partner_attribute = content.roll(1, 0), attribute.roll(1, 0)

        # own content in partner style (u) and partner content in own style (v)
        own_in_partner = net.generator(content, partner_attribute, partner_onehot)
        partner_in_own = net.generator(partner_content, attribute, onehot)
        self_reconstruction = net.generator(content, attribute, onehot)

        # cross cycle: swap back
        mean_v, logvar_v = net.attribute_encoder(partner_in_own, onehot)
        # (the partner's cycle is the same term for the neighbouring sample: each image is both a and b)
        cycle_own = net.generator(net.content_encoder(own_in_partner), reparameterize(mean_v, logvar_v), onehot)

        # random attribute in a random domain, for latent regression and diversity
        random_domains = torch.randint(0, net.num_domains, domains.shape, device=domains.device)
        random_attribute = torch.randn_like(attribute)
        random_render = net.generator(content, random_attribute, net.onehot(random_domains))
        regressed_mean, _ = net.attribute_encoder(random_render, net.onehot(random_domains))

        return {
            "images": images,
            "domains": domains,
            "partner_images": partner_images,
            "partner_domains": partner_domains,
            "content": content,
            "mean": mean,
            "logvar": logvar,
            "own_in_partner": own_in_partner,
            "partner_in_own": partner_in_own,
            "self_reconstruction": self_reconstruction,
            "cycle_own": cycle_own,
            "random_domains": random_domains,
            "random_attribute": random_attribute,
            "random_render": random_render,
            "regressed_mean": regressed_mean,
        }

    def _fakes(self, out: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (out["own_in_partner"], out["partner_domains"]),
            (out["partner_in_own"], out["domains"]),
            (out["random_render"], out["random_domains"]),
        ]

    def discriminator_loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        real_patch, real_domain = self.image_discriminator(out["images"])
        loss = hp.lambda_adversarial * adversarial_loss(real_patch, True)
        loss = loss + hp.lambda_domain * domain_classification_loss(real_domain, out["domains"])
        fakes = self._fakes(out)
        for fake, _ in fakes:
            fake_patch, _ = self.image_discriminator(fake.detach())
            loss = loss + hp.lambda_adversarial * adversarial_loss(fake_patch, False) / len(fakes)
        content_logits = self.content_discriminator(out["content"].detach())
        return loss + hp.lambda_content * domain_classification_loss(content_logits, out["domains"])

    def generator_losses(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every generator-side term, unweighted (weights are applied in ``training_step``)."""
        adversarial = out["mean"].new_zeros(())
        domain = out["mean"].new_zeros(())
        fakes = self._fakes(out)
        for fake, target_domains in fakes:
            fake_patch, fake_domain = self.image_discriminator(fake)
            adversarial = adversarial + adversarial_loss(fake_patch, True) / len(fakes)
            domain = domain + domain_classification_loss(fake_domain, target_domains) / len(fakes)
        cycle = reconstruction_loss(out["cycle_own"], out["images"])
        return {
            "adversarial": adversarial,
            "domain": domain,
            "content": content_confusion_loss(self.content_discriminator(out["content"])),
            "reconstruction": reconstruction_loss(out["self_reconstruction"], out["images"]),
            "cycle": cycle,
            "kl": kl_loss(out["mean"], out["logvar"]),
            "latent": reconstruction_loss(out["regressed_mean"], out["random_attribute"]),
        }

    def weighted_generator_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        return (
            hp.lambda_adversarial * losses["adversarial"]
            + hp.lambda_domain * losses["domain"]
            + hp.lambda_content * losses["content"]
            + hp.lambda_reconstruction * losses["reconstruction"]
            + hp.lambda_cycle * losses["cycle"]
            + hp.lambda_kl * losses["kl"]
            + hp.lambda_latent * losses["latent"]
        )

    # -------------------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        del batch_idx
        images, domains = batch["image"], batch["domain"]
        if len(images) < 2:
            return  # a pair is needed; a lone last sample carries no cross-domain signal
        generator_optimizer, discriminator_optimizer = self.optimizers()

        out = self.translate(images, domains)
        discriminator_optimizer.zero_grad()
        discriminator_loss = self.discriminator_loss(out)
        self.manual_backward(discriminator_loss)
        discriminator_optimizer.step()

        losses = self.generator_losses(out)
        generator_optimizer.zero_grad()
        self.manual_backward(self.weighted_generator_loss(losses))
        generator_optimizer.step()

        self._accumulate_attributes(out["mean"].detach(), domains)
        self.domain_samples += torch.bincount(domains.cpu(), minlength=self.hparams.num_domains)
        self._training_batches += 1
        every = self.hparams.style_check_every_n_steps
        if every > 0 and self._training_batches % every == 0:
            self._style_check_during_training()
        self.log("train/discriminator", discriminator_loss.detach(), on_step=True, on_epoch=True, sync_dist=True)
        for name, value in losses.items():
            self.log(
                f"train/{name}",
                value.detach(),
                on_step=True,
                on_epoch=True,
                prog_bar=name == "reconstruction",
                sync_dist=True,
            )

    # ------------------------------------------------------------------------------- attribute statistics
    def _reset_attribute_accumulators(self) -> None:
        num_domains, dim = self.hparams.num_domains, self.hparams.attribute_dim
        self._attribute_sum = torch.zeros(num_domains, dim, dtype=torch.float64)
        self._attribute_square_sum = torch.zeros(num_domains, dim, dtype=torch.float64)
        self._attribute_count = torch.zeros(num_domains, dtype=torch.float64)

    def _accumulate_attributes(self, means: torch.Tensor, domains: torch.Tensor) -> None:
        means, domains = means.cpu().double(), domains.cpu()
        self._attribute_sum.index_add_(0, domains, means)
        self._attribute_square_sum.index_add_(0, domains, means**2)
        self._attribute_count.index_add_(0, domains, torch.ones(len(domains), dtype=torch.float64))

    def on_train_epoch_start(self) -> None:
        self._reset_attribute_accumulators()

    def on_train_epoch_end(self) -> None:
        """Fit each domain's attribute Gaussian from this epoch's attribute means (domains seen only), summed over
        the DDP ranks first so every rank fits the same statistics from the whole epoch."""
        if self._trainer is not None and self.trainer.world_size > 1:
            for name in ("_attribute_sum", "_attribute_square_sum", "_attribute_count"):
                setattr(self, name, self.all_gather(getattr(self, name).to(self.device)).sum(0).cpu())
        self._fit_from_accumulators()

    @torch.no_grad()
    def attribute_statistics(
        self, images: torch.Tensor, domains: torch.Tensor, batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each domain's attribute Gaussian (mean, std) from the given float images, encoded by the current
        attribute encoder; a domain without images keeps the stored statistics."""
        net = self.renderer
        num_domains = net.num_domains
        total = torch.zeros(num_domains, net.attribute_dim, dtype=torch.float64)
        square = torch.zeros_like(total)
        count = torch.zeros(num_domains, dtype=torch.float64)
        for image_batch, domain_batch in zip(images.split(batch_size), domains.split(batch_size), strict=True):
            device_domains = domain_batch.to(self.device)
            encoded, _ = net.attribute_encoder(image_batch.to(self.device), net.onehot(device_domains))
            encoded = encoded.cpu().double()
            total.index_add_(0, domain_batch, encoded)
            square.index_add_(0, domain_batch, encoded**2)
            count.index_add_(0, domain_batch, torch.ones(len(domain_batch), dtype=torch.float64))
        mean, std = net.attribute_mean.detach().clone(), net.attribute_std.detach().clone()
        seen = count > 0
        if seen.any():
            fitted = total[seen] / count[seen, None]
            variance = (square[seen] / count[seen, None] - fitted**2).clamp_min(0)
            mean[seen.to(mean.device)] = fitted.float().to(mean)
            std[seen.to(std.device)] = variance.sqrt().clamp_min(1e-3).float().to(std)
        return mean, std

    def fit_attribute_statistics(self, images: torch.Tensor, domains: torch.Tensor) -> None:
        """Store ``attribute_statistics`` of these images in the generator's buffers (what the export carries)."""
        mean, std = self.attribute_statistics(images, domains)
        self.renderer.attribute_mean.copy_(mean)
        self.renderer.attribute_std.copy_(std)

    def _fit_from_accumulators(self) -> None:
        seen = self._attribute_count > 0
        if not seen.any():
            return
        count = self._attribute_count[seen, None]
        mean = self._attribute_sum[seen] / count
        variance = (self._attribute_square_sum[seen] / count - mean**2).clamp_min(0)
        buffers = self.renderer
        buffers.attribute_mean[seen.to(buffers.attribute_mean.device)] = mean.float().to(buffers.attribute_mean)
        buffers.attribute_std[seen.to(buffers.attribute_std.device)] = (
            variance.sqrt().clamp_min(1e-3).float().to(buffers.attribute_std)
        )

    def _check_data(self) -> tuple[Any, ...] | None:
        """The datamodule's images, domains and held-out mask, when it has them (``HistAuGANDataModule`` does)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not all(hasattr(datamodule, name) for name in ("images", "domains", "check_mask")):
            return None
        return datamodule.images, datamodule.domains, datamodule.check_mask

    @staticmethod
    def _training_tensors(data: tuple[Any, ...], per_domain: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images (not the held ones) as floats, at most ``per_domain`` of each domain (seeded)."""
        images, domains, held = data
        chosen = ~held
        if per_domain is not None:
            rng = np.random.default_rng(0)
            chosen = np.zeros_like(held)
            for domain in np.unique(domains):
                members = np.flatnonzero((domains == domain) & ~held)
                chosen[rng.choice(members, min(per_domain, len(members)), replace=False)] = True
        tensors = torch.from_numpy(images[chosen]).permute(0, 3, 1, 2).float() / 255
        return tensors, torch.from_numpy(domains[chosen])

    def _style_check_during_training(self) -> None:
        data = self._check_data()
        if data is None:
            return
        # statistics of the current encoder (as the export will have), from a subset of each domain: cheap
        attribute_mean, attribute_std = self.attribute_statistics(*self._training_tensors(data, per_domain=64))
        net = self.renderer

        def render(images: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
            images, domains = images.to(self.device), domains.to(self.device)
            attributes = attribute_mean[domains] + torch.randn_like(attribute_mean[domains]) * attribute_std[domains]
            return keep_grey(images, net.render(images, domains, attributes)).clamp(0, 1).cpu()

        report = check_domain_styles(render, *data, self.domain_names, self.hparams.style_tolerance)
        checked = [entry for entry in report["domains"].values() if "within_tolerance" in entry]
        within = sum(entry["within_tolerance"] for entry in checked)
        self.log("style/max_abs_mean_intensity_difference", report["max_abs_mean_intensity_difference"])
        self.log("style/domains_within_tolerance", float(within))
        floor_reached = bool((self.domain_samples >= self.hparams.min_samples_per_domain).all())
        if self.trainer.is_global_zero:
            differences = " ".join(
                f"{name} {entry['difference']['mean_intensity']:+.1f}"
                for name, entry in report["domains"].items()
                if "difference" in entry
            )
            print(  # noqa: T201  (the training command's running account of the style)
                f"style check, step {self._training_batches}: mean intensity off by {differences} grey levels; "
                f"{within}/{len(checked)} domains within {self.hparams.style_tolerance:g}",
                flush=True,
            )
        if self.hparams.stop_at_style_match and report["all_within_tolerance"] and floor_reached:
            if self.trainer.is_global_zero:
                print(f"style check: every domain within tolerance at step {self._training_batches}: stopping")  # noqa: T201
            self.trainer.should_stop = True

    def _final_style_check(self, checkpoint: Path) -> None:
        """Render held images of other domains into each domain with the exported generator; print and write."""
        data = self._check_data()
        if data is None:
            return
        augment = HistAuGANAugment(checkpoint, p=1.0)
        report = check_domain_styles(augment.render, *data, augment.domain_names, self.hparams.style_tolerance)
        report["checkpoint"] = str(checkpoint)
        report["training_steps"] = self._training_batches
        report["samples_per_domain"] = dict(zip(self.domain_names, self.domain_samples.tolist(), strict=True))
        report["min_samples_per_domain"] = self.hparams.min_samples_per_domain
        self.style_report = report
        written = write_report(report, stats_path(checkpoint))
        lines = report_lines(report)
        lines += [f"samples per domain: {report['samples_per_domain']} over {self._training_batches} steps"]
        floor = report["min_samples_per_domain"]
        short = [name for name, count in report["samples_per_domain"].items() if count < floor]
        if short:
            lines.append(
                f"WARNING: HistAuGAN domains {', '.join(short)} got fewer than min_samples_per_domain="
                f"{report['min_samples_per_domain']} samples: the budget ended before their style was trained"
            )
        lines += warning_lines(report, checkpoint)
        lines.append(f"style check written to {written}")
        for line in lines:
            print(line)  # noqa: T201  (the training command's report)

    # ------------------------------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["histaugan_domain_names"] = list(self.domain_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.domain_names = list(checkpoint.get("histaugan_domain_names", self.domain_names))

    def generator_config(self) -> dict[str, int]:
        """The constructor arguments of ``HistAuGANGenerator`` plus the training image size."""
        hp = self.hparams
        keys = ("num_domains", "image_channels", "base_channels", "attribute_dim", "num_residual_blocks", "style_dim")
        config = {key: int(hp[key]) for key in keys}
        config["image_size"] = int(hp.image_size)
        return config

    def export_generator(self, path: str | Path) -> Path:
        """Write the small checkpoint ``HistAuGANAugment`` loads (no discriminators, no optimiser state)."""
        return save_generator(self.renderer, self.generator_config(), self.domain_names, path)

    def on_fit_end(self) -> None:
        if self.hparams.export_path:
            path = Path(self.hparams.export_path)
        else:
            log_dir = self.trainer.log_dir or self.trainer.default_root_dir
            path = Path(log_dir) / EXPORT_FILE_NAME
        if self.trainer.is_global_zero:
            data = self._check_data()
            if data is not None:  # the final encoder's statistics over every training image
                self.fit_attribute_statistics(*self._training_tensors(data))
            written = self.export_generator(path)
            logger.info("HistAuGAN generator exported to %s", written)
            print(f"HistAuGAN generator exported to {written}")  # noqa: T201  (the CLI user needs the path)
            self._final_style_check(written)
