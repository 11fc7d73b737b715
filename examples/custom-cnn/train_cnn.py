"""A small convolutional network on scikit-learn's digits, trained as a Flow Nexus custom trainer.

The TrainingJob (trainingjob.yaml) sets ``model.architecture: custom`` and ``trainer.command:
[/opt/example/train_cnn.py]``; torchrun runs this script in every process of every worker pod. The SDK
(``flownexus_trainer.sdk``) gives it the job's config and data and takes its progress, checkpoints and final
model, so the validation gate, the model archive and serving treat the result like a built-in model.

Digits rows are 64 pixel intensities (an 8x8 image, row by row); the network reads each row as a 1x8x8 image.
Run it on one machine with: ``FLOWNEXUS_CONFIG=job.json torchrun --nproc-per-node 2 train_cnn.py``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flownexus_trainer import sdk


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, and a small classifier head."""

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Standardized pixel rows [N, 64] -> images [N, 1, 8, 8].
        out: torch.Tensor = self.head(self.features(x.reshape(x.shape[0], 1, 8, 8)))
        return out


def main() -> None:
    with sdk.init() as ctx:  # joins the process group; on an exception the TrainingJob's status says why
        cfg = ctx.config.training  # the TrainingJob's spec.training: epochs, batchSize, learningRate, ...
        data = ctx.load_data()  # train and validation rows only, standardized; the test rows are the gate's
        if data.num_features != 64:
            raise ValueError(
                f"this network reads 8x8 images: it needs 64 features, the dataset has {data.num_features}"
            )
        x_train, y_train, _, _ = data.tensors(ctx.device)

        torch.manual_seed(ctx.config.dataset.seed)
        net = DigitsCNN(data.num_classes).to(ctx.device)
        steps_per_epoch = math.ceil(len(ctx.epoch_indices(1)) / ctx.per_process_batch)
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
        early = sdk.EarlyStopping(cfg.patience, cfg.min_delta, cfg.early_stopping)
        best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}

        start = 0
        resumed = ctx.load_checkpoint()  # every rank: the gang resumes from rank 0's latest checkpoint
        if resumed is not None:
            net.load_state_dict(resumed.state["model"])
            optimizer.load_state_dict(resumed.state["optimizer"])
            scheduler.load_state_dict(resumed.state["scheduler"])
            early.load_state_dict(resumed.state["early_stopping"])
            best_state = resumed.state["best_model"]
            start = resumed.epoch
        # DDP broadcasts rank 0's weights when it wraps the network: restore first, then wrap.
        gpu = [ctx.device.index] if ctx.device.type == "cuda" else None
        model: nn.Module = DistributedDataParallel(net, device_ids=gpu) if ctx.distributed else net

        stopped = start > 0 and early.should_stop
        epoch = start
        while epoch < cfg.epochs and not stopped:
            epoch += 1
            model.train()
            totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, rows
            for batch in torch.split(ctx.epoch_indices(epoch).to(ctx.device), ctx.per_process_batch):
                xb, yb = x_train[batch], y_train[batch]
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                scheduler.step()
                totals += torch.stack(
                    [loss.detach().double() * len(batch), (logits.argmax(-1) == yb).sum().double(),
                     torch.tensor(float(len(batch)), dtype=torch.float64, device=ctx.device)]
                )  # fmt: skip
            if ctx.distributed:
                dist.all_reduce(totals)
            loss_sum, correct, rows = totals.tolist()
            val = ctx.evaluate(net, "val")  # loss and accuracy on the validation rows
            ctx.report_epoch(
                epoch, loss_sum / rows, val["loss"], train_accuracy=correct / rows, val_accuracy=val["accuracy"],
                lr=scheduler.get_last_lr()[0], samples=int(rows),
            )  # fmt: skip
            if early.update(epoch, val["loss"]):
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            stopped = early.should_stop
            ctx.save_checkpoint(
                epoch,
                {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "early_stopping": early.state_dict(), "best_model": best_state},
            )  # fmt: skip

        net.load_state_dict(best_state)  # the epoch with the lowest validation loss
        ctx.export(net, stopped_early=stopped)  # rank 0: TorchScript on raw pixel rows, plus the metadata


if __name__ == "__main__":
    main()
