"""Transfer learning: pretrained-weight sources and fine-tune strategies."""
