"""LightningDataModule over the WebDataset shards of a world folder (see `flamingo-data`)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from flamingo_lab.data.shards import load_world, make_eval_dataset, make_train_dataset
from flamingo_lab.models import load_tokenizer


class FlamingoDataModule(pl.LightningDataModule):
    """Mixed training stream (infinite, seeded) and a finite validation pass, both at fixed shapes.

    The training stream is re-seeded with the global step at which it starts, so a resumed run
    continues on fresh samples instead of replaying the ones it has already seen.
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.cfg = cfg
        self.data = cfg["data"]
        self.tokenizer = None
        self.world = None

    def setup(self, stage: str | None = None) -> None:
        if self.world is None:
            self.world = load_world(self.data["root"])
            self.tokenizer = load_tokenizer(self.cfg["model"]["lm"])

    def _shards(self, split: str) -> dict[str, list[str]]:
        available = self.world["shards"][split]
        unknown = sorted(set(self.data["sources"]) - set(available))
        if unknown:
            raise ValueError(
                f"data.sources names {unknown}, which the world at {self.data['root']} does not have; "
                f"valid sources: {sorted(available)}"
            )
        return {s: list(available[s]) for s in self.data["sources"]}

    def _shape(self) -> dict[str, int]:
        return dict(
            seq_len=int(self.data["seq_len"]),
            max_images=int(self.data["max_images"]),
            image_size=int(self.cfg["model"]["vision"]["image_size"]),
        )

    def _loader(self, dataset, shuffle_workers: bool) -> DataLoader:
        workers = int(self.data["num_workers"])
        return DataLoader(
            dataset,
            batch_size=int(self.data["batch_size"]),
            num_workers=workers,
            persistent_workers=workers > 0 and shuffle_workers,
            drop_last=True,  # fixed batch shape
        )

    def train_dataloader(self) -> DataLoader:
        start_step = self.trainer.global_step if self.trainer is not None else 0
        dataset = make_train_dataset(
            self._shards("train"),
            {s: float(w) for s, w in self.data["sources"].items()},
            self.tokenizer,
            seed=int(self.cfg["seed"]) * 1_000_003 + start_step,
            **self._shape(),
        )
        return self._loader(dataset, shuffle_workers=True)

    def val_dataloader(self) -> DataLoader:
        dataset = make_eval_dataset(self._shards("val"), self.tokenizer, **self._shape())
        return self._loader(dataset, shuffle_workers=False)
