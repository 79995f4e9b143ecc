"""One node, several devices, no Dask: the shards of a run explained with Lightning DDP (``trainer.strategy=ddp``).

``python -m pipeline stage=extract trainer.strategy=ddp trainer.devices=N`` starts N processes (Lightning
relaunches the command once per extra rank). For every unfinished shard, Lightning's unpadded distributed
predict sampler gives each rank a disjoint share of the shard's clips, and each rank publishes its share as
``part-NNNNN-rankR.parquet`` (readers see every row once). After each shard the ranks meet at a barrier and
rank 0 records the shard in the ledger; a shard is finished only when all its ranks' parts are there.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from tqdm import tqdm

from pipeline.runtime.builders import build_explainer, quiet_lightning
from pipeline.runtime.engine import shard_log
from pipeline.runtime.job import ShardJob
from pipeline.runtime.resolve import torch_threads
from pipeline.runtime.shard import shard_job
from pipeline.store.run_dir import RunDir

log = logging.getLogger(__name__)


class CurrentShardWriter(BasePredictionWriter):
    """Hands each batch to the writer of the shard being explained (a Trainer's callbacks are fixed)."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.target = None

    def write_on_batch_end(self, *args, **kwargs):
        self.target.write_on_batch_end(*args, **kwargs)

    def on_predict_end(self, trainer, pl_module):
        self.target.on_predict_end(trainer, pl_module)


def run_shards(cfg, run_dir, todo: dict[int, pd.DataFrame], classes: list[str], config_hash: str, on_shard_done) -> int:
    """Explain the shards of ``todo`` with one DDP Trainer; ``on_shard_done(shard, rows)`` runs on rank 0 after each.
    Returns this process's rank."""
    torch.set_num_threads(torch_threads(cfg))
    quiet_lightning()
    forward = CurrentShardWriter()
    trainer = pl.Trainer(
        accelerator=str(cfg.trainer.accelerator),
        devices=int(cfg.trainer.devices),
        strategy=str(cfg.trainer.strategy),
        precision=cfg.trainer.precision,
        callbacks=[forward],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=True,  # predict: Lightning's unpadded sampler, no clip on two ranks
        inference_mode=not build_explainer(cfg).method.needs_grad,
    )
    bar = None
    for shard, rows in todo.items():
        with shard_log(RunDir(run_dir).shard_log("extract", shard)) as slog:
            job = ShardJob(
                run_dir, shard, rows, classes, config_hash, rank=trainer.global_rank, ranks=trainer.world_size
            )
            module, loader, writer = shard_job(cfg, job, log=slog)
            forward.target = writer
            if loader is None:
                writer.on_predict_end(None, None)
            else:
                try:
                    trainer.predict(module, loader, return_predictions=False)
                except BaseException as err:
                    slog.error("shard %d, rank %d failed: %s: %s", shard, trainer.global_rank, type(err).__name__, err)
                    writer.abort()
                    raise
        trainer.strategy.barrier()  # the ranks (started by the first predict) have published their shares
        if trainer.global_rank == 0:
            bar = bar or tqdm(
                total=sum(len(r) for r in todo.values()), desc=f"extract (ddp x{trainer.world_size})", unit="clip"
            )
            bar.update(len(rows))
            on_shard_done(shard, rows)
    if bar is not None:
        bar.close()
    return trainer.global_rank
