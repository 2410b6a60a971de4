"""CLI subcommands: one module per command, each with ``register(subparsers)``.

A module appears in :data:`COMMANDS` only once the command works; there are no stubs.
The module's ``register`` adds a subparser and sets ``func=run`` where ``run(args) -> int``.
Modules import heavy dependencies inside ``run`` so ``clerf --help`` stays fast.
"""

COMMANDS: list[str] = [
    "prepare",
    "real_anchor",
    "pretrain",
    "generate",
    "inspect",
    "evaluate",
    "predict",
    "export",
    "preview",
    "finetune",
    "pipeline",
    "curves",
    "probe",
    "landmark_fit",
]
