"""Write a random Stable Diffusion 1.x checkpoint in the LDM single-file layout, for tests, demos and benchmarks.

    python tools/make_checkpoint.py --config tiny --seed 1 --out weights/tiny.safetensors
    python tools/make_checkpoint.py --config sd15 --dtype float16 --out /tmp/sd15-random.safetensors

`tiny` pairs with a tiny tokenizer (`--tokenizer-out DIR` writes one); `sd15` has SD 1.5's exact shapes and
works with the real CLIP vocabulary or the tiny one. The weights are random: the images are abstract.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tools.*` when run as a script

from magicfusion.checkpoint import DTYPES
from tools.random_weights import CONFIGS, write_checkpoint, write_tiny_vocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--tokenizer-out", help="also write the tiny tokenizer (vocab.json + merges.txt) here")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.suffix != ".safetensors":
        print(f"make_checkpoint: error: --out {out} must end in .safetensors", file=sys.stderr)
        return 2
    if out.exists() and not a.overwrite:
        print(f"make_checkpoint: error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if not out.parent.is_dir():
        print(f"make_checkpoint: error: folder {out.parent} does not exist; create it first", file=sys.stderr)
        return 2
    write_checkpoint(out, a.config, a.seed, DTYPES[a.dtype])
    if a.tokenizer_out:
        Path(a.tokenizer_out).mkdir(parents=True, exist_ok=True)
        write_tiny_vocab(a.tokenizer_out)
    print(f"wrote {out} (random {a.config}, seed {a.seed}, {a.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
