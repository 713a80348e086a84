"""Data sources, image decoding and augmentation, all run inside Ray Data."""
