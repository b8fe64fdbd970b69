"""The thin command line: parses arguments, calls the library, prints. No ML imports at module level."""
