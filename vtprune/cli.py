"""The `vtprune` command: demo, bench, eval, sweep, stability, show, calibrate-ecl, toyvqa."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("vtprune.demo", "every family on a real photo, unpruned and at a few budgets"),
    "bench": ("vtprune.eval.bench", "prefill time, selection time, KV cache per policy and budget"),
    "eval": ("vtprune.eval.lmms", "lmms-eval tasks on a pruned model (policy and budget in --model_args)"),
    "sweep": ("vtprune.eval.sweep", "ablation grid (models x policies x budgets x tasks), resumable, with plots"),
    "stability": ("vtprune.eval.stability", "Jaccard of kept sets and answer agreement under noise, 1-px shift, JPEG"),
    "calibrate-ecl": ("vtprune.ecl", "per-layer matrix entropy of visual tokens; proposes EntropyPrune's layer"),
    "toyvqa": ("vtprune.toyvqa.cli", "the synthetic VQA task: train, score, export"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: vtprune COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
