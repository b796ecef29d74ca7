"""Everything that takes tensors: loading checkpoints, the captioner, the scorer, the Q-Former and its losses,
EfficientNet-Lite0. Once built, nothing here touches a path."""
