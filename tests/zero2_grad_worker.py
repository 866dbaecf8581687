"""One rank of the ZeRO-2 gradient check (run by ``torch.distributed.run``; not a test module).

``python -m torch.distributed.run --nproc-per-node N zero2_grad_worker.py BATCHES TOK OUT
BUCKET [BUCKET ...]``: rank ``r`` trains one step on micro-batch ``r`` of ``BATCHES`` (a
``torch.save``d list of :class:`~mvtrain.data.loader.MicroBatch`) through the trainer's own
:class:`~mvtrain.step.WindowRunner` and DeepSpeed ZeRO-2 engine, once per reduce bucket size.
The optimizer is SGD with lr 1 and no clipping, so ``weights before - weights after`` is the
gradient ZeRO-2 reduced; rank 0 saves it per bucket size to ``OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mvtrain.budgets import Budgets
from mvtrain.deepspeed_config import deepspeed_config
from mvtrain.distributed import dist_info
from mvtrain.engine import DeepSpeedEngine, init_process_group
from mvtrain.metrics import BatchLog
from mvtrain.model.adapters import adapter_for
from mvtrain.model.tiny import build_tiny_model
from mvtrain.precision import engine_precision
from mvtrain.step import WindowRunner


def reduced_gradient(batches: list, tok_dir: str, bucket: int) -> dict[str, torch.Tensor]:
    info = dist_info()
    model, tokenizer = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    config = deepspeed_config(
        grad_accum=1,
        zero_stage=2,
        grad_clip=0.0,
        user_config={
            "zero_optimization": {"reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
        },
    )
    precision = engine_precision("fp32", deepspeed=True)
    engine = DeepSpeedEngine(model, optimizer, scheduler, config, info, precision)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = WindowRunner(
        engine, adapter_for("minicpmv-4.6", tokenizer), info, torch.device("cpu"), BatchLog(None)
    )
    runner.run([batches[info.rank]], Budgets(1 << 30, 1 << 30), step=0)
    return {n: before[n] - p.detach() for n, p in engine.module.named_parameters()}


def main() -> None:
    batches_file, tok_dir, out, *buckets = sys.argv[1:]
    torch.set_num_threads(1)
    info = dist_info()
    init_process_group(info, use_deepspeed=True)
    batches = torch.load(batches_file, weights_only=False)
    found = {int(b): reduced_gradient(batches, tok_dir, int(b)) for b in buckets}
    if info.rank == 0:
        torch.save(found, Path(out))


if __name__ == "__main__":
    main()
