"""The `lorakit` command line: one small module per command, each only parses and calls the library."""
