"""Config, job driver, controller and the `offpg` command line."""

__version__ = "0.1.0"
