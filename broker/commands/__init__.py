"""The `broker` command's subcommands: the service, and the people commands."""
