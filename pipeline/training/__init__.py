"""`rayseg train unet DATA --out WEIGHTS`: train or fine-tune our U-Net on Ray Train.

The data path mirrors `rayseg segment`'s: the driver lists (image, label) pairs once
(data.py), Ray Data decodes them in `map_batches` tasks (pairs.py; fractional CPUs, so they
run beside the training workers on a small machine), and each Ray Train worker
(`TorchTrainer`, DDP over gloo on CPUs, NCCL on GPUs) reads its shard with
`ray.train.get_dataset_shard` (loop.py). DATA's layouts are described in data.py, WEIGHTS'
in checkpoints.py.

`--resume-from CKPT` continues a run from a checkpoint directory: with its
training_state.pt the epoch counter and optimizer state are restored and training goes on
up to `--epochs` in total; without one (e.g. the demo weights) the weights are fine-tuned
from epoch 0 with a fresh optimizer.
"""

from .data import TrainingError
from .driver import DEFAULT_DEPTH, DEFAULT_WIDTH, TrainSummary, parse_size, train_unet

__all__ = ["DEFAULT_DEPTH", "DEFAULT_WIDTH", "TrainSummary", "TrainingError", "parse_size", "train_unet"]
