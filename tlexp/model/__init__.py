"""The model: backbones (torchvision, timm, offline weights), the LightningModule, strategies and phases."""
