"""``raycv compress``: pruning, quantization and distillation of a trained model, measured."""
