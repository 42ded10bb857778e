"""``python -m anomalib_ext.augment.histaugan fit --config configs/histaugan/<name>.yaml``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .data import HistAuGANDataModule
from .module import HistAuGAN


class HistAuGANCLI(LightningCLI):
    """LightningCLI whose model takes its domain count and image size from the datamodule."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_domains", "model.num_domains", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size")


def main(args: list[str] | None = None) -> None:
    """Run the CLI on ``args`` (default: ``sys.argv``)."""
    HistAuGANCLI(HistAuGAN, HistAuGANDataModule, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":
    main()
