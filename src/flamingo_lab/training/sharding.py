"""Fully sharded data parallel training (``trainer=fsdp``): PyTorch's FSDP2 through Lightning's ModelParallelStrategy.

Every process holds a shard of each parameter, gradient and optimiser state (``torch.distributed.fsdp.fully_shard``
on each cross-attention block, the resampler, the vision encoder, each LM decoder layer and the whole model), and
gathers a unit's full parameters only while that unit runs. Unlike Lightning's ``strategy=fsdp`` (FSDP1), it runs
on CPU processes too (gloo), so the tests train a sharded model on 2 CPU processes and compare it with data
parallel training.

What reads parameters outside a forward pass must gather them, on every rank at the same point: the gate values
(:func:`flamingo_lab.models.xattn.gate_value`) and the evaluation at the end of training, which runs on rank 0
on an unsharded copy (:func:`unsharded_copy`; so does the eval curve of a one-process sharded run), and the
validation batches, whose forwards gather too, are those every rank has (``datamodule._Validation``).
Checkpoints hold the full state (gathered on rank 0 into one file), so a sharded run's ``last.ckpt`` loads into
an unsharded model (``flamingo-eval``), resumes sharded, and continues under DDP with ``force=true``; an unsharded
run's checkpoint cannot continue sharded, and ``check_resume`` says so.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

STRATEGY_NAME = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with every process in one data-parallel group (no tensor parallelism) and full-state
    checkpoints in one file (what the resume logic and ``flamingo-eval`` read)."""

    strategy_name = STRATEGY_NAME

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        # Lightning's "auto" data-parallel size is the number of nodes (with tensor parallelism within a node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(STRATEGY_NAME, FSDP2Strategy,
                              description="FSDP2 (fully_shard) over every process, full-state checkpoints")


def is_sharded(trainer) -> bool:
    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def check_strategy(trainer) -> None:
    """Refuse Lightning's FSDP1 (``trainer.strategy=fsdp``) on more than one process: outside a forward pass
    each rank holds only its shard of a parameter (none at all of some), and the gate logger, results.json's
    gates and the evaluation at the end read them there. ``trainer=fsdp`` (FSDP2) gathers them."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
        raise ValueError(f"trainer.strategy=fsdp (Lightning's FSDP1) on {trainer.world_size} processes is not "
                         f"supported: its parameters are shards outside a forward pass, where the gates and the "
                         f"evaluation read them. Use trainer=fsdp (strategy fsdp2: FSDP2, which gathers them), or "
                         f"trainer=ddp")


def shard_flamingo(model: nn.Module, mesh) -> None:
    """``fully_shard`` each cross-attention block, the resampler, the vision encoder and each LM decoder layer as
    a unit of its own, then the model (the rest: embeddings, the special-token rows, the LM's head)."""
    from torch.distributed.fsdp import fully_shard

    from flamingo_lab.models.lm import find_decoder_layers

    _, layers = find_decoder_layers(model.lm)
    for unit in [*model.xattn_layers, model.resampler, model.vision, *layers]:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


def unsharded_copy(model: nn.Module, model_cfg: dict, device: torch.device) -> nn.Module | None:
    """On rank 0, a new unsharded Flamingo holding ``model``'s full weights (None on the other ranks).

    A collective call: every rank gathers its shards. A sharded model cannot be evaluated on one rank (its
    units would wait for the other ranks to gather their parameters), and the evaluation runs on rank 0."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from flamingo_lab.models import build_flamingo

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    copy = build_flamingo(model_cfg)
    copy.load_state_dict(state, strict=True)
    copy.train(model.training)
    return copy.to(device)
