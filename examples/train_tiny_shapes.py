"""Train the embedded demo model from scratch (about 37 minutes on 2 CPU cores).

    python examples/train_tiny_shapes.py -o runs/tiny-shapes
    edgemm eval --model runs/tiny-shapes          # accuracy on the 1,000 held-out test questions

The shipped weights (edgemm/data/tiny-shapes) were made by this command with its defaults.
Same as `edgemm train-demo`.
"""
import argparse
import json

from edgemm.train import train_demo

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default="runs/tiny-shapes")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    result = train_demo(a.out, steps=a.steps, batch=a.batch, seed=a.seed, threads=a.threads)
    print(json.dumps(result, indent=1))
