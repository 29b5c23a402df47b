"""Networks fastdiff ships: a small class-conditional U-Net (:class:`UNet`) and the registry the checkpoint
loader uses to rebuild an architecture from its config (:data:`ARCHITECTURES`)."""

from fastdiff.nets.unet import UNet

ARCHITECTURES = {"unet": UNet}

__all__ = ["ARCHITECTURES", "UNet"]
