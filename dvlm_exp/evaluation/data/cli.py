"""Write the synthetic DocVQA-style dataset used by the ``synth_docvqa`` lmms-eval task.

    python scripts/make_synth_data.py --out outputs/data/synth_docvqa --n 64 --seed 0

Reuses an existing complete dataset with the same n/seed (unless --overwrite).  The last
line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataset folder to create (save_to_disk layout)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if a matching dataset exists")
    args = p.parse_args(argv)

    from dvlm_exp.evaluation.data import synth_docvqa as sd

    t0 = time.perf_counter()
    reused = (not args.overwrite) and sd.is_complete(args.out, args.n, args.seed)
    path = sd.generate(args.out, n=args.n, seed=args.seed, overwrite=args.overwrite)
    meta = sd.read_meta(path) or {}
    print(path)
    summary = {
        "path": str(path),
        "task": sd.TASK_NAME,
        "n": meta.get("n"),
        "seed": meta.get("seed"),
        "version": meta.get("version"),
        "reused": reused,
        "bytes": sum(meta.get("files", {}).values()),
        "seconds": round(time.perf_counter() - t0, 3),
        "task_entry": {"task": sd.TASK_NAME, "dataset_path": str(path)},
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
