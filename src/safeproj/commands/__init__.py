"""The `safeproj` subcommands, one module (or small package) each: basis, project, overlap, eval,
activations, prereq, sweep, report. Each exposes a `*_command` function whose typed, documented
arguments jsonargparse turns into flags; `fit` and `validate` are LightningCLI's (commands/fit.py)."""

# name -> "module:function", beside LightningCLI's Trainer subcommands.
COMMANDS = {
    "basis": "safeproj.commands.basis:basis_command",
    "project": "safeproj.commands.project:project_command",
    "overlap": "safeproj.commands.overlap:overlap_command",
    "eval": "safeproj.commands.eval:eval_command",
    "judge": "safeproj.commands.judge:judge_command",
    "activations": "safeproj.commands.activations:activations_command",
    "sweep": "safeproj.commands.sweep:sweep_command",
    "report": "safeproj.commands.report:report_command",
    "prereq": "safeproj.commands.prereq:prereq_command",
}

# Commands whose one required argument reads naturally without its flag (`safeproj sweep SPEC`,
# `safeproj judge EVAL.json`); every other argument, and every argument of the other commands, is a flag.
POSITIONAL = frozenset({"sweep", "report", "judge", "prereq"})

# LightningCLI's subcommands that SafeprojLM supports (it has no test_step or predict_step).
TRAINER_COMMANDS = ("fit", "validate")
