"""The `nxserve` subcommands, one module per group."""
