"""Feature extraction engine and the feature store (the only package that knows the features file format)."""
