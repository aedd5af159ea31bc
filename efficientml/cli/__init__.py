"""The ``efficientml`` command. One module per subcommand, each thin over the library."""
