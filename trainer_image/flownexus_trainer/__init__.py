"""Flow Nexus trainer image: DDP training, the validation gate and the TorchServe handler.

Entry points: ``python -m flownexus_trainer.train`` (the torchrun target in every worker pod) and
``python -m flownexus_trainer.validate`` (the validator Job).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
