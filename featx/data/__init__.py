"""Images in, in one place: discovery (discover), decoding (decode, jpeg_batch), the pixel recipe (preprocess),
datasets, augmentation, the one DataLoader factory (loader), training batch sources (batches) and the split rule."""
