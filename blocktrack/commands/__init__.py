"""One module per CLI subcommand (borg's habit): each has ``register(subparsers)`` and ``run(args)``."""
