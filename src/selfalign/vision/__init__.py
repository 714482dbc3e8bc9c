"""Visual features: EfficientNet-Lite0 backbone, RoIAlign, YOLOX-Nano boxes, region extraction into the feature store."""
