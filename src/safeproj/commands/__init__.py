"""The `safeproj` subcommands, one module (or small package) each: basis, project, overlap, eval,
activations, prereq, sweep, report. Each exposes a `*_command` function whose typed, documented
arguments jsonargparse turns into flags."""

# name -> "module:function", beside LightningCLI's Trainer subcommands.
COMMANDS = {
    "basis": "safeproj.commands.basis:basis_command",
    "project": "safeproj.commands.project:project_command",
    "overlap": "safeproj.commands.overlap:overlap_command",
    "eval": "safeproj.commands.eval:eval_command",
    "activations": "safeproj.commands.activations:activations_command",
    "sweep": "safeproj.commands.sweep:sweep_command",
    "report": "safeproj.commands.report:report_command",
    "prereq": "safeproj.commands.prereq:prereq_command",
}
