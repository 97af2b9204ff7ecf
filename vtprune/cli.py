"""The `vtprune` command: demo, bench, eval, sweep, stability, show, calibrate-ecl, toyvqa."""

from __future__ import annotations

import os
import sys

COMMANDS = {
    "demo": ("vtprune.demo", "every family on a real photo, unpruned and at a few budgets"),
    "bench": ("vtprune.eval.bench", "prefill time, selection time, KV cache per policy and budget"),
    "eval": ("vtprune.eval.lmms", "lmms-eval tasks on a pruned model (policy and budget in --model_args)"),
    "sweep": ("vtprune.eval.sweep", "ablation grid (models x policies x budgets x tasks), resumable, with plots"),
    "stability": ("vtprune.eval.stability", "Jaccard of kept sets and answer agreement under noise, 1-px shift, JPEG"),
    "show": ("vtprune.eval.show", "PNG of the patches a policy keeps, per stage, captioned"),
    "calibrate-ecl": ("vtprune.ecl", "per-layer matrix entropy of visual tokens; proposes EntropyPrune's layer"),
    "toyvqa": ("vtprune.toyvqa.cli", "the synthetic VQA task: train, score, export"),
    "doctor": ("vtprune.doctor", "self-check: the core invariants on tiny models of every family, with your versions"),
}
#: commands whose --policy / --policies name registry policies (``name`` or ``name:variant``)
POLICY_COMMANDS = ("demo", "bench", "stability", "show")
DEBUG = "VTPRUNE_DEBUG"


def _policy_names(argv: list[str]) -> list[str]:
    """The values given to ``--policy`` / ``--policies`` (either ``--policy X`` or ``--policy=X``)."""
    names, current = [], None
    for arg in argv:
        if arg.startswith("--"):
            flag, eq, value = arg.partition("=")
            current = flag if flag in ("--policy", "--policies") else None
            if current and eq:
                names.append(value)
                current = None if flag == "--policy" else current
        elif current:
            names.append(arg)
            current = None if current == "--policy" else current
    return names


def check_policies(command: str, argv: list[str]) -> str | None:
    """A one-line error for a misspelt policy name, or None."""
    from .policies.base import unknown_policy

    names = _policy_names(argv)
    if command == "bench":  # the bench chains policies with "+" (a Pipeline)
        names = [part for name in names for part in name.split("+")]
    error = unknown_policy(names, variants=True)
    return f"vtprune {command}: {error}" if error else None


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

    command, rest = argv[0], argv[1:]
    if command in POLICY_COMMANDS and (error := check_policies(command, rest)):
        print(error, file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    from .checks import UserInputError

    try:
        return int(module.main(rest) or 0)
    except UserInputError as exc:  # bad input is raised where it enters, with the allowed range; a bug keeps its traceback
        if os.environ.get(DEBUG):
            raise
        hint = f"(set {DEBUG}=1 for the traceback)"
        text = f"vtprune {command}: error: {exc}"
        print(f"{text}\n{hint}" if "\n" in text else f"{text} {hint}", file=sys.stderr)  # a list: one item a line
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
