"""Images in: folder discovery (discover.py), robust decoding (decode.py) and the pixel recipe (preprocess.py)."""
