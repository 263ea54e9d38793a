"""Command-line tools (run them as scripts: python tools/<tool>.py ...; tests import their main(argv))."""
