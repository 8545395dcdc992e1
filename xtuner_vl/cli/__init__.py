"""Command line interface: ``xtuner-vl <command>``."""
