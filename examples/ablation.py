"""The paper's three findings in miniature, one command (Beyond the 80/20 Rule, arXiv 2506.01939).

    # the CPU miniature (about 30 minutes on 2 cores): tiny Qwen3 warm-started on two-step arithmetic,
    # arms all / top 0.2 / bottom 0.8 / random 0.2, 5 seeds each
    python examples/ablation.py --config examples/recipes/ablation_cpu.yaml --output_dir outputs/ablation
    make ablation                                     # the same

    # every stage on a small setting, under a minute (the test suite runs this)
    python examples/ablation.py --config examples/recipes/ablation_cpu.yaml --output_dir /tmp/ablation --quick true

    # flags override the YAML: other seeds, arms, learning rate...
    python examples/ablation.py --config examples/recipes/ablation_cpu.yaml --output_dir out \
        --seeds 0 1 2 --arms all top

    # one report from several commands of the same experiment (another day's seeds, an added arm)
    python examples/ablation.py merge --output_dir outputs/real_all outputs/real/results.json more/results.json

    # the same runner on a real model (GPU; GSM8K training split, MATH-500 held out)
    python examples/ablation.py --config examples/recipes/ablation_qwen3_0.6b.yaml --output_dir outputs/ablation-0.6b

Writes results.json, results.md, accuracy.png, entropy_training.png, start_entropy_histogram.png and
start_tokens.html to --output_dir; each run's model and log under runs/ARM-seedN/. The work is in
`forking_trl.ablation`; see its docstring for the stages.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from forking_trl.ablation import RunsFailed, merge_results, run_ablation  # noqa: E402


def merge(argv: list[str]) -> dict:
    """`merge --output_dir OUT A/results.json B/results.json ...`: one report from several commands' results."""
    import argparse

    parser = argparse.ArgumentParser(prog="ablation.py merge", description=merge.__doc__)
    parser.add_argument("--output_dir", required=True, help="where the merged results go")
    parser.add_argument("results", nargs="+", help="results.json of each command, the first's start model shown")
    args = parser.parse_args(argv)
    try:
        return merge_results(args.results, args.output_dir)
    except ValueError as err:
        parser.error(str(err))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    merging = argv[:1] == ["merge"]
    ########################
    # every stage: start model, arms x seeds, measurements, results files; or merge earlier commands' results
    ########################
    try:
        report = merge(argv[1:]) if merging else run_ablation(argv)
    except RunsFailed as failure:  # the finished runs' results are written; say which failed, exit non-zero
        sys.exit(f"ablation: {failure}")
    out = report["output_dir"]
    print(open(os.path.join(out, "results.md")).read())
    made = (
        "results.json, results.md and the figures"
        if merging
        else "results.json, results.md, accuracy.png, entropy_training.png, start_tokens.html"
    )
    print(f"written: {out}/{made}")


if __name__ == "__main__":
    main()
