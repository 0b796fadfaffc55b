"""The vision suite: EfficientNet-Lite0 and eight image-classification tasks from packaged data."""
