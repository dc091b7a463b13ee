"""The main job from Python: the same calls the CLI makes, with the same defaults.

Usage: python examples/quickstart.py [OUTPUT_FOLDER] [EXAMPLES]
  OUTPUT_FOLDER default featx-out/quickstart-py; EXAMPLES: a folder holding ants_bees/ and new_images/ (default: this one)
"""
import sys
from pathlib import Path

import featx

HERE = Path(__file__).resolve().parent


def main(out: Path, examples: Path = HERE) -> None:
    res = featx.extract_features(examples / "ants_bees", out / "features.npz")
    print(f"{res.n_images} images -> {res.feature_dim}-d features ({res.backbone})")

    fs = featx.load_features(out / "features.npz")  # .features .paths .labels .splits .classes .meta
    fit = featx.fit_head(fs, head="logistic", output=out / "head.skops")
    print(f"logistic head: val accuracy {fit.scores['val']['accuracy']:.3f}")

    pred = featx.predict_folder(examples / "new_images", model=out / "head.skops", output=out / "predictions.csv")
    for row in pred:
        print(f"{row['path']}: {row['label']} ({row['confidence']:.2f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("featx-out/quickstart-py"),
         Path(sys.argv[2]) if len(sys.argv) > 2 else HERE)
