"""Image classification with SAM and gradient descent: MLP and CNN on TFDS image data sets."""
